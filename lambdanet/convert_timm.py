"""timm weights -> lambdanet: Flax ``params`` and ``batch_stats`` from a timm ``state_dict``.

Architectures (`ARCHITECTURES`): ``resnet50`` (torchvision layout, timm's ``resnet50``),
``resnet26t`` (timm's ResNet-T), ``lambda_resnet26t``, ``lambda_resnet50ts`` and
``lambda_resnet26rpt_256`` (timm's byoanet lambda networks, ported by `lambdanet.models.ResNet`).

Conversion is a table of names: each Flax module path (blocks written ``{block}``) maps to a timm
module path, and leaves map ``kernel``/``scale`` -> ``weight``, ``bias`` -> ``bias``, ``mean`` ->
``running_mean``, ``var`` -> ``running_var``. Layouts: conv kernels [O, I, kh, kw] ->
[kh, kw, I, O]; linear weights and 1x1-conv ``qkv`` kernels [O, I(, 1, 1)] -> [I, O]; timm's lambda
convolution kernel [|k|, 1, r, r, 1] -> ``rel_embeddings`` [r, r, |k|, 1] (R[a, b, k, 0] =
w[k, 0, a, b, 0]) and its bias -> ``position_bias``; timm's relative ``pos_emb``
[2H-1, 2W-1, |k|] -> ``rel_embeddings`` [2H-1, 2W-1, |k|, 1]. Any missing or unused entry, or a
shape that does not match, fails with a ValueError that lists them all.

Weights are written as an orbax checkpoint in the workdir layout of `lambdanet.checkpoint`:
``OUT/checkpoints/0/state`` = {'params': ..., 'batch_stats': ...} (a weights-only state) and
``OUT/checkpoints/0/config`` = {'model_name', 'num_classes', 'image_size', 'crop_fraction',
'source'}.
torch is needed only to read ``.pth`` files; ``.safetensors`` files are read with numpy.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lambdanet import checkpoint
from lambdanet.models import create_model, model_entry, parse_placement
from lambdanet.models.placement import stage_names

WEIGHTS_STEP = 0
_BLOCK = re.compile(r"^c(\d+)_block(\d+)$")
_LEAVES = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}
_IGNORED_SUFFIXES = (".num_batches_tracked",)
_MAX_LISTED = 25

_BOTTLENECK = {  # torchvision / timm ResNet bottleneck: the same names
    f"{{block}}/{layer}": f"{{block}}.{layer}"
    for layer in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")
}
_TORCHVISION_RESNET = {
    "stem_conv1": "conv1",
    "stem_bn1": "bn1",
    **_BOTTLENECK,
    "{block}/downsample_conv": "{block}.downsample.0",
    "{block}/downsample_bn": "{block}.downsample.1",
    "head": "fc",
}
_TIMM_RESNET_T = {  # deep tiered stem is one nn.Sequential (conv, bn, act, ...) + bn1; avg_down
    "stem_conv1": "conv1.0",
    "stem_bn1": "conv1.1",
    "stem_conv2": "conv1.3",
    "stem_bn2": "conv1.4",
    "stem_conv3": "conv1.6",
    "stem_bn3": "bn1",
    **_BOTTLENECK,
    "{block}/downsample_conv": "{block}.downsample.1",  # downsample.0 is the average pool
    "{block}/downsample_bn": "{block}.downsample.2",
    "head": "fc",
}
_TIMM_BYOB_LAMBDA = {
    **{f"stem_conv{i}": f"stem.conv{i}.conv" for i in (1, 2, 3)},
    **{f"stem_bn{i}": f"stem.conv{i}.bn" for i in (1, 2, 3)},
    "{block}/conv1": "{block}.conv1_1x1.conv",
    "{block}/bn1": "{block}.conv1_1x1.bn",
    "{block}/conv2": "{block}.conv2_kxk.conv",
    "{block}/bn2": "{block}.conv2_kxk.bn",
    "{block}/lambda_layer/qkv": "{block}.self_attn.qkv",
    "{block}/lambda_layer/norm_q": "{block}.self_attn.norm_q",
    "{block}/lambda_layer/norm_v": "{block}.self_attn.norm_v",
    "{block}/lambda_layer/rel_embeddings": "{block}.self_attn.conv_lambda.weight",
    "{block}/lambda_layer/position_bias": "{block}.self_attn.conv_lambda.bias",
    "{lambda_block}/bn2": "{block}.post_attn",  # the BN after a lambda slot
    "{block}/conv3": "{block}.conv3_1x1.conv",
    "{block}/bn3": "{block}.conv3_1x1.bn",
    "{block}/downsample_conv": "{block}.shortcut.conv",
    "{block}/downsample_bn": "{block}.shortcut.bn",
    "head": "head.fc",
}
_TIMM_BYOB_RELPOS = {
    **_TIMM_BYOB_LAMBDA,
    "{block}/lambda_layer/rel_embeddings": "{block}.self_attn.pos_emb",
}


@dataclasses.dataclass(frozen=True)
class Architecture:
    """How one lambdanet model maps onto a timm model.

    names: Flax module path (or full parameter path) -> timm module path (or full key).
    block_prefix: timm prefix of Flax block ``c{stage}_block{index}`` (format fields ``stage0``,
      ``stage1``: 0- and 1-based stage of c2..c5; ``index0``: 0-based block index).
    image_size, crop_fraction: the evaluation input side and centre-crop fraction of timm's
      default pretrained weights (``pretrained_cfg`` input_size and crop_pct); the model is built
      at this size.
    """

    names: Mapping[str, str]
    block_prefix: str
    image_size: int
    crop_fraction: float


ARCHITECTURES: dict[str, Architecture] = {
    "resnet50": Architecture(_TORCHVISION_RESNET, "layer{stage1}.{index0}", 224, 0.95),
    "resnet26t": Architecture(_TIMM_RESNET_T, "layer{stage1}.{index0}", 256, 0.94),
    "lambda_resnet26t": Architecture(_TIMM_BYOB_LAMBDA, "stages.{stage0}.{index0}", 256, 0.94),
    "lambda_resnet50ts": Architecture(_TIMM_BYOB_LAMBDA, "stages.{stage0}.{index0}", 256, 0.95),
    "lambda_resnet26rpt_256": Architecture(
        _TIMM_BYOB_RELPOS, "stages.{stage0}.{index0}", 256, 0.94
    ),
}


def _architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        raise ValueError(
            f"no timm conversion for model {name!r}; convertible models: {sorted(ARCHITECTURES)}"
        )
    return ARCHITECTURES[name]


def build_model(name: str, **overrides: Any) -> nn.Module:
    """The lambdanet model ``name`` (a timm port or a registered model) with ``overrides``."""
    _architecture(name)
    return create_model(name, **overrides)


def timm_key(name: str, path: tuple[str, ...]) -> str:
    """The timm ``state_dict`` key of the Flax variable at ``path`` (without the collection).

    E.g. ``timm_key("lambda_resnet26t", ("c4_block2", "lambda_layer", "qkv", "kernel"))`` is
    ``"stages.2.1.self_attn.qkv.weight"``.
    """
    arch = _architecture(name)
    parts, prefix = list(path), None
    match = _BLOCK.match(parts[0])
    if match:
        stage, index = int(match.group(1)), int(match.group(2))
        prefix = arch.block_prefix.format(stage0=stage - 2, stage1=stage - 1, index0=index - 1)
        # Names in a lambda block ("{lambda_block}/...") come first: its bn2 follows the lambda
        # layer, which timm names differently from the BN after a 3x3 conv.
        parts[0] = "{lambda_block}" if parts[0] in _lambda_blocks(name) else "{block}"
    for template in dict.fromkeys([parts[0], "{block}"] if prefix else [parts[0]]):
        full, module = "/".join([template, *parts[1:]]), "/".join([template, *parts[1:-1]])
        if full in arch.names:
            key = arch.names[full]
            break
        if module in arch.names and parts[-1] in _LEAVES:
            key = f"{arch.names[module]}.{_LEAVES[parts[-1]]}"
            break
    else:
        raise KeyError(f"no timm name for lambdanet variable {'/'.join(path)} of {name!r}")
    return key.replace("{block}", prefix) if prefix else key


@functools.cache
def _lambda_blocks(name: str) -> frozenset[str]:
    """The Flax names (``c4_block2``, ...) of the blocks of ``name`` that hold a lambda layer."""
    config = model_entry(name).config
    placement = parse_placement(config.get("placement", "C,C,C,C"), config["stage_sizes"])
    return frozenset(
        f"{stage}_block{i + 1}"
        for stage, types in zip(stage_names(len(placement)), placement, strict=True)
        for i, block_type in enumerate(types)
        if block_type == "L"
    )


def _to_flax_layout(array: np.ndarray, ndim: int) -> np.ndarray:
    """A timm tensor in the layout of a Flax variable of rank ``ndim`` (see the module doc)."""
    if array.ndim == 5:  # lambda convolution [|k|, 1, r, r, 1] -> [r, r, |k|, 1]
        return np.transpose(array[:, 0, :, :, 0], (1, 2, 0))[..., None]
    if array.ndim == 4 and ndim == 2:  # 1x1 conv [O, I, 1, 1] -> dense [I, O]
        return array[:, :, 0, 0].T
    if array.ndim == 4:  # conv [O, I, kh, kw] -> [kh, kw, I, O]
        return np.transpose(array, (2, 3, 1, 0))
    if array.ndim == 3:  # relative pos_emb [2H-1, 2W-1, |k|] -> [2H-1, 2W-1, |k|, 1]
        return array[..., None]
    if array.ndim == 2:  # linear [O, I] -> [I, O]
        return array.T
    return array


def abstract_variables(model: nn.Module, image_size: int) -> dict[str, Any]:
    """Shapes and dtypes of ``model``'s {'params', 'batch_stats'} for [1, S, S, 3] inputs."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def _path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    return tuple(str(getattr(entry, "key", entry)) for entry in path)


def _listing(title: str, lines: list[str]) -> list[str]:
    if not lines:
        return []
    shown = [f"    {line}" for line in lines[:_MAX_LISTED]]
    if len(lines) > _MAX_LISTED:
        shown.append(f"    ... and {len(lines) - _MAX_LISTED} more")
    return [f"  {title} ({len(lines)}):", *shown]


def _head_classes(name: str, state_dict: Mapping[str, np.ndarray]) -> int:
    key = timm_key(name, ("head", "kernel"))
    if key not in state_dict:
        raise ValueError(
            f"the checkpoint has no classifier weight {key!r}, so it is not a timm {name!r} "
            "checkpoint; check --model, or pass num_classes explicitly"
        )
    return int(np.shape(state_dict[key])[0])


def convert_state_dict(
    name: str,
    state_dict: Mapping[str, Any],
    num_classes: int | None = None,
    **overrides: Any,
) -> tuple[nn.Module, dict[str, Any]]:
    """Maps a timm ``state_dict`` onto lambdanet model ``name``.

    Args:
      name: one of `ARCHITECTURES` (the timm model name without its pretrained tag).
      state_dict: timm key -> array (numpy or torch tensors).
      num_classes: classes of the head; default: read from the checkpoint's classifier.
      overrides: further model attributes (e.g. ``dtype``, ``impl``).
    Returns:
      (model, {'params': ..., 'batch_stats': ...}) with float32 numpy leaves.
    Raises:
      ValueError: listing every missing entry, unused entry and shape mismatch.
    """
    arch = _architecture(name)
    state_dict = {k: _numpy(v) for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIXES)}
    num_classes = num_classes or _head_classes(name, state_dict)
    model = build_model(name, num_classes=num_classes, **overrides)
    abstract = abstract_variables(model, arch.image_size)
    used, missing, mismatched, untabled = set(), [], [], []

    def convert(path, leaf):
        try:
            key = timm_key(name, _path_names(path)[1:])
        except KeyError:
            untabled.append("/".join(_path_names(path)))
            return None
        if key not in state_dict:
            missing.append(f"{key} (for {'/'.join(_path_names(path))}, shape {leaf.shape})")
            return None
        used.add(key)
        value = _to_flax_layout(state_dict[key], leaf.ndim)
        if value.shape != leaf.shape:
            mismatched.append(
                f"{key}: checkpoint {tuple(state_dict[key].shape)}, lambdanet "
                f"{'/'.join(_path_names(path))} needs {tuple(leaf.shape)}"
            )
            return None
        return np.asarray(value, np.float32)

    variables = jax.tree_util.tree_map_with_path(convert, abstract)
    unused = sorted(set(state_dict) - used)
    problems = (
        _listing("missing from the checkpoint", sorted(missing))
        + _listing("unused checkpoint entries", unused)
        + _listing("shape mismatches", sorted(mismatched))
        + _listing("lambdanet variables without a timm name (model overrides?)", untabled)
    )
    if problems:
        raise ValueError(
            f"the timm state_dict does not match lambdanet model {name!r} "
            f"(image size {arch.image_size}, {num_classes} classes); is it a checkpoint of timm's "
            f"{name!r}?\n" + "\n".join(problems)
        )
    return model, variables


def _numpy(value: Any) -> np.ndarray:
    """A float32/int numpy copy of a numpy array or torch tensor."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        value = value.float() if value.is_floating_point() else value
        return value.numpy()
    return np.asarray(value)


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """A timm ``state_dict`` from a ``.safetensors`` file (numpy) or a ``.pth``/``.pt``/``.bin``
    file (torch, CPU). Training checkpoints ({'state_dict': ...} or {'model': ...}) and
    DataParallel ``module.`` prefixes are unwrapped."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint file {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        state_dict = load_file(path)
    else:
        import torch

        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model"):
            if isinstance(state_dict.get(wrapper), Mapping):
                state_dict = state_dict[wrapper]
                break
    return {k.removeprefix("module."): _numpy(v) for k, v in state_dict.items()}


def save_weights(
    directory: str, variables: Mapping[str, Any], *, model_name: str, source: str
) -> str:
    """Writes {'params', 'batch_stats'} as step `WEIGHTS_STEP` of DIRECTORY/checkpoints.

    The config item records ``model_name``, ``num_classes``, ``source`` and timm's evaluation
    ``image_size`` and ``crop_fraction`` for the architecture.
    Returns the checkpoint directory (``resolve_checkpoint(directory)`` finds it).
    """
    ckpt_dir = os.path.join(directory, checkpoint.CHECKPOINT_DIR)
    if checkpoint.list_steps(ckpt_dir):
        raise ValueError(
            f"{ckpt_dir} already holds checkpoints {checkpoint.list_steps(ckpt_dir)}; "
            "choose an empty --out directory"
        )
    variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    arch = _architecture(model_name)
    metadata = {
        "model_name": model_name,
        "num_classes": int(variables["params"]["head"]["bias"].shape[0]),
        "image_size": arch.image_size,
        "crop_fraction": arch.crop_fraction,
        "source": source,
    }
    manager = checkpoint.create_checkpoint_manager(ckpt_dir)
    manager.save(
        WEIGHTS_STEP,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(variables), config=ocp.args.JsonSave(metadata)
        ),
    )
    manager.wait_until_finished()
    manager.close()
    return ckpt_dir


def timm_model(
    name: str, state_dict: Mapping[str, np.ndarray] | None = None, num_classes: int = 1000
):
    """timm's model ``name`` (a name[.tag]) in eval mode: its pretrained weights (downloaded)
    when no ``state_dict`` is given, else ``state_dict`` loaded. Needs torch and timm."""
    import timm
    import torch

    if state_dict is None:
        return timm.create_model(name, pretrained=True).eval()
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()})
    return model.eval()


def logit_difference(reference, model: nn.Module, variables: Any, image_size: int) -> float:
    """Max |logits difference| / max |timm logits| of timm's ``reference`` and ``model`` on a
    random [2, S, S, 3] batch (S = ``image_size``)."""
    import torch

    x = np.random.default_rng(0).standard_normal((2, image_size, image_size, 3), np.float32)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    logits = np.asarray(jax.jit(model.apply)(variables, x))
    return float(np.abs(logits - expected).max() / np.abs(expected).max())


def convert_checkpoint(
    model_name: str,
    out: str,
    *,
    checkpoint_file: str | None = None,
    timm_name: str | None = None,
    num_classes: int | None = None,
    tolerance: float | None = None,
) -> tuple[str, float | None]:
    """timm weights for ``model_name`` (`ARCHITECTURES`) written to the workdir ``out``.

    The weights come from ``checkpoint_file`` (`load_state_dict`) or, without it, from timm's
    pretrained ``timm_name`` (default ``model_name``; downloaded). With a ``tolerance``, timm's
    model and the converted one run on the same random batch first (`logit_difference`), and a
    larger difference raises ValueError before anything is written. Returns (the checkpoint
    directory, the logit difference or None).
    """
    timm_name = timm_name or model_name
    reference = None
    if checkpoint_file is None:
        reference = timm_model(timm_name)
        state_dict, source = reference.state_dict(), f"timm:{timm_name} (pretrained)"
    else:
        state_dict = load_state_dict(checkpoint_file)
        source = f"file:{os.path.basename(checkpoint_file)}"
    model, variables = convert_state_dict(model_name, state_dict, num_classes)
    difference = None
    if tolerance is not None:
        reference = reference or timm_model(timm_name, state_dict, model.num_classes)
        image_size = _architecture(model_name).image_size
        difference = logit_difference(reference, model, variables, image_size)
        if difference > tolerance:
            raise ValueError(f"logits differ from timm's by {difference:.2e} > {tolerance}")
    directory = save_weights(out, variables, model_name=model_name, source=source)
    return directory, difference


def load_weights(directory: str, target: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restores ({'params', 'batch_stats'}, metadata) written by `save_weights`.

    directory: anything `checkpoint.resolve_checkpoint` accepts (the --out directory, its
      checkpoints directory or the step directory). target: optional abstract tree
      (``jax.ShapeDtypeStruct`` leaves, with shardings) to restore into.
    """
    ckpt_dir, step = checkpoint.resolve_checkpoint(directory, directory)
    manager = checkpoint.create_checkpoint_manager(ckpt_dir, read_only=True)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), config=ocp.args.JsonRestore()
        ),
    )
    manager.close()
    return dict(restored["state"]), dict(restored["config"])
