"""Bottleneck ResNets: torchvision ResNet-50, ResNet-D / ResNet-RS, LambdaResNets, timm's ports.

One class, `ResNet`, builds every network of the paper (§5, Appendix E.1) and timm's byoanet
lambda networks (so that timm weights convert one to one, `lambdanet.convert_timm`):

  * stem: ``"conv7x7"`` (torchvision: one 7x7 conv), ``"deep"`` (ResNet-D: 3x3 convs w/2, w/2, w)
    or ``"tiered"`` (timm's resnet26t / byoanet: 3x3 convs 3w/8, w/2, w), each + BN +
    activation, then a 3x3 stride-2 max-pool, or a strided 3x3 conv + BN in its place
    (``replace_stem_pool``, ResNet-RS);
  * bottleneck stages [c2, c3, c4, c5] of width w, 2w, 4w, 8w (outputs 4x), the first block of
    c3-c5 with stride 2 on its 3x3 slot; shortcut ``"conv1x1"`` (1x1 conv, stride s, + BN) or
    ``"avg_down"`` (ResNet-D: 2x2 average pool, ceil mode, padding excluded, then 1x1 conv + BN);
  * the 3x3 slot of every bottleneck chosen by a placement spec (`placement.py`): conv, lambda
    layer, or an attention baseline. A non-conv slot that downsamples is followed by an average
    pool of stride 2 (3x3 in the paper, §1.2 [C]; 2x2 in timm's ports: ``mixer_pool``), then
    BN + activation. Squeeze-excitation (ResNet-RS, ratio 0.25 of the block output) in conv
    blocks only (§4.1); stochastic depth; dropout before the head; γ = 0 in the last BatchNorm
    of every bottleneck (E.1);
  * ReLU or SiLU (timm's "ts" models).

The lambda layers' settings are one mapping, ``lambda_layer`` (any `LambdaLayer` attribute:
|k| ``dim_k``, |h| ``heads``, |u| ``dim_u``, the scope r ``scope_size``, ``impl``, ...; unset
ones keep the layer's paper defaults), the attention baselines' likewise ``attention`` (``heads``,
default 8; ``window`` of the local one, default 7). The model passes its BatchNorm settings, dtype
and folding to every block and layer, once.

Call ``model.apply(variables, x, train=..., rngs={"dropout": key})`` with x float [b, H, W, 3]
(sides multiples of 32; relative position tables are sized from the input at trace time) for
logits [b, num_classes] in float32, or with ``return_features=True`` for the multi-scale feature
maps {"stem": [b, H/4, W/4, w] (after the stem pool), "c2": [b, H/4, W/4, 4w], "c3" (H/8, 8w),
"c4" (H/16), "c5" (H/32, 32w), "pre_logits": [b, 32w] (global average pool, float32)} (COCO
backbones). In train mode BatchNorm uses batch statistics and updates ``batch_stats`` (pass
``mutable=["batch_stats"]``); stochastic depth and dropout draw from the ``dropout`` rng stream
and act only in train mode.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from lambdanet.layers.attention import (
    AxialSelfAttention,
    LocalSelfAttention,
    RelativeSelfAttention2D,
    SqueezeExcite,
)
from lambdanet.layers.lambda_layer import LambdaLayer, position_embedding_shape
from lambdanet.layers.pooling import max_pool_3x3
from lambdanet.layers.space_to_depth import stem_conv
from lambdanet.models.fold import FoldedBatchNorm, check_not_training_folded
from lambdanet.models.placement import parse_placement, stage_names
from lambdanet.models.scan import block_runs, scanned_blocks
from lambdanet.models.stochastic_depth import drop_path, drop_path_rates, is_zero

ModuleDef = Any
STEMS = ("conv7x7", "deep", "tiered")
SHORTCUTS = ("conv1x1", "avg_down")
ACTIVATIONS = {"relu": nn.relu, "silu": nn.silu}
MIXER_POOLS = (2, 3)
_ATTENTION = {"G": RelativeSelfAttention2D, "X": AxialSelfAttention, "S": LocalSelfAttention}
ATTENTION_DEFAULTS = {"heads": 8, "window": 7}
CONV_INITS = {
    "lecun_normal": nn.linear.default_kernel_init,  # flax's default
    "he_normal_fan_out": nn.initializers.variance_scaling(2.0, "fan_out", "normal"),  # timm's
}
# ResNet attributes the trainer sets (from the dataset, config.half_precision, BatchNorm folding);
# every other attribute is an architecture setting that a config holds (`config.model`).
TRAINER_ARGS = ("num_classes", "dtype", "param_dtype", "batch_norm_folded")
# LambdaLayer attributes the model sets itself (from its own BatchNorm, dtype and folding).
_MODEL_OWNED = {"dim_out", "bn_momentum", "bn_epsilon", "batch_norm_folded", "dtype", "param_dtype"}
LAMBDA_SETTINGS = tuple(
    f.name
    for f in dataclasses.fields(LambdaLayer)
    if f.init and f.name not in _MODEL_OWNED | {"parent", "name"}
)


def lambda_settings(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """The lambda layers' settings: `LambdaLayer`'s defaults updated by ``overrides``; an
    unknown key raises a ValueError listing the valid ones."""
    unknown = sorted(set(overrides) - set(LAMBDA_SETTINGS))
    if unknown:
        raise ValueError(
            f"lambda_layer settings {unknown} unknown; valid: {list(LAMBDA_SETTINGS)} "
            "(LambdaLayer's attributes)"
        )
    defaults = {f.name: f.default for f in dataclasses.fields(LambdaLayer)}
    return {name: overrides.get(name, defaults[name]) for name in LAMBDA_SETTINGS}


def _choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; choose one of {tuple(choices)}")


def _avg_down(x: jax.Array) -> jax.Array:
    """2x2 average pool, stride 2, ceil mode, padding excluded (the ResNet-D shortcut)."""
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME", count_include_pad=False)


def _pool_after_mixer(y: jax.Array, window: int) -> jax.Array:
    """The downsampling of a lambda/attention slot: average pool of stride 2, 3x3 (padding
    excluded; §1.2) or 2x2 (timm's ``nn.AvgPool2d(2, 2)``)."""
    padding = ((1, 1), (1, 1)) if window == 3 else "VALID"
    return nn.avg_pool(y, (window, window), (2, 2), padding=padding, count_include_pad=False)


class Bottleneck(nn.Module):
    """ResNet v1 bottleneck: 1x1 conv (w) -> 3x3 slot (w, stride) -> 1x1 conv (4w), + shortcut.

    x: [b, H, W, c] -> [b, H / stride, W / stride, 4w]. ``conv`` and ``norm`` are the model's
    `nn.Conv` / BatchNorm partials, ``mixer`` builds the module of a non-conv slot
    (``block_type`` "L", "G", "X" or "S"), ``se`` the squeeze-excitation applied after the last
    BatchNorm (or None); ``embeddings`` is the shared relative table of a lambda slot.
    Parameters: ``conv1``/``bn1``; ``conv2``, ``lambda_layer`` or ``self_attention``, then
    ``bn2``; ``conv3``/``bn3``; ``se``; ``downsample_conv``/``downsample_bn``.
    """

    width: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[jax.Array], jax.Array] = nn.relu
    strides: int = 1
    block_type: str = "C"
    mixer: ModuleDef | None = None
    mixer_pool: int = 3
    se: ModuleDef | None = None
    drop_path_rate: float = 0.0
    shortcut: str = "conv1x1"
    zero_init_last_bn: bool = True

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        train: bool,
        embeddings: jax.Array | None = None,
        drop_path_rate: jax.Array | None = None,
    ):
        """``drop_path_rate`` (traced) replaces the attribute in a scanned stage."""
        y = self.act(self.norm(name="bn1")(self.conv(self.width, (1, 1), name="conv1")(x)))
        y = self.act(self.norm(name="bn2")(self._spatial(y, train, embeddings)))
        y = self.conv(4 * self.width, (1, 1), name="conv3")(y)
        scale_init = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
        y = self.norm(scale_init=scale_init, name="bn3")(y)
        if self.se is not None:
            y = self.se(name="se")(y)
        rate = self.drop_path_rate if drop_path_rate is None else drop_path_rate
        y = drop_path(y, rate, self.make_rng("dropout") if train and not is_zero(rate) else None)
        return self.act(y + self._shortcut(x, y.shape))

    def _spatial(self, y: jax.Array, train: bool, embeddings: jax.Array | None) -> jax.Array:
        if self.block_type == "C":
            strides = (self.strides, self.strides)
            return self.conv(self.width, (3, 3), strides, padding=1, name="conv2")(y)
        if self.block_type == "L":
            y = self.mixer(name="lambda_layer")(y, train=train, embeddings=embeddings)
        else:
            y = self.mixer(name="self_attention")(y)
        return _pool_after_mixer(y, self.mixer_pool) if self.strides > 1 else y

    def _shortcut(self, x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """Identity, or projection: 1x1 conv (stride s) + BN; ResNet-D: 2x2 avg pool, 1x1 conv."""
        if x.shape == shape:
            return x
        strides = (self.strides, self.strides)
        if self.shortcut == "avg_down" and self.strides > 1:
            x, strides = _avg_down(x), (1, 1)
        x = self.conv(shape[-1], (1, 1), strides, name="downsample_conv")(x)
        return self.norm(name="downsample_bn")(x)


class ResNet(nn.Module):
    """Bottleneck ResNet; see the module docstring for the architecture and call convention.

    Attributes:
      stage_sizes: blocks per stage [c2, c3, c4, c5] (`placement.STAGE_SIZES`).
      num_classes: logits of the head.
      placement: which layer fills each bottleneck's 3x3 slot (`placement.parse_placement`).
      base_width: bottleneck width w of c2 (widths double per stage, outputs are 4x).
      stem: "conv7x7", "deep" (ResNet-D) or "tiered" (timm's resnet26t and byoanet).
      replace_stem_pool: the stem max-pool becomes a 3x3 stride-2 conv + BN + activation
        (ResNet-RS).
      max_pool_grad: gradient of the stem max-pool, "views" (scatter-free) or "scatter" (XLA's
        select_and_scatter); the same values (`lambdanet.layers.pooling`).
      stem_conv_impl: the stem's first (stride-2, 3-channel) convolution, "direct" or
        "space_to_depth" (a stride-1 convolution over 2x2 blocks; the same parameters and values,
        `lambdanet.layers.space_to_depth`).
      activation: "relu" or "silu".
      shortcut: "conv1x1" or "avg_down" (ResNet-D) in downsampling blocks.
      conv_init: initialiser of every conv kernel, a `CONV_INITS` name: "lecun_normal"
        (flax's default) or "he_normal_fan_out" (timm's ports).
      se_ratio: squeeze-excitation in conv blocks, reduced width = ratio x block output
        channels (ResNet-RS 0.25; Hu et al.'s reduction 16 is 1/16); 0 disables it.
      mixer_pool: window (3 or 2) of the average pool after a downsampling non-conv slot.
      lambda_layer: `LambdaLayer` settings (`LAMBDA_SETTINGS`), e.g. ``{"scope_size": 9,
        "impl": "conv"}``; unset ones keep the layer's defaults (the paper's |k|=16, |h|=4,
        |u|=1, r=23, impl "auto").
      shared_embeddings: one relative table per resolution, shared by the lambda layers that run
        at it (Table 4), parameters ``rel_embeddings_stride{4,8,16,32}`` of the model.
      attention: settings of the attention baselines, ``heads`` (8) and ``window`` (7, "S").
      drop_path_rate: stochastic depth rate of the last block (`drop_path_rates`).
      drop_path_schedule: "block" (linear per block, timm) or "stage" (linear per stage, the
        tensorflow/tpu ResNet-RS code the paper builds on).
      dropout_rate: dropout before the classification head.
      zero_init_last_bn: γ = 0 in the last BatchNorm of every bottleneck (E.1).
      remat: stages whose blocks are rematerialised (``nn.remat``, i.e. jax.checkpoint) in the
        backward pass, e.g. "c2,c3" or "all" ("" none): trades compute for activation memory.
      remat_policy: what those blocks keep for the backward pass, a `jax.checkpoint_policies`
        name: None keeps nothing but the block's input (everything is recomputed);
        "dots_saveable" keeps the conv and matmul outputs and recomputes only BatchNorm,
        activations and the other elementwise work; with ``scan_blocks`` this bounds what the
        scan's loop stores per block.
      scan_blocks: every run of two or more identical blocks (`block_runs`) is one `nn.scan`
        over a block whose variables are stacked along a leading layer axis (module
        ``{stage}_scan{first}_{last}``): the compiled program holds one block per run, so
        compile time hardly grows with depth. The same function as the unrolled model;
        `lambdanet.models.scanned` converts variables between the two layouts.
      bn_momentum, bn_epsilon: BatchNorm settings (statistics in float32 under bfloat16).
      batch_norm_folded: the variables come from `fold_batch_norm` (inference only): every
        conv is biased and the BatchNorm after it is gone.
      dtype: compute dtype; param_dtype: parameter dtype.
    """

    stage_sizes: Sequence[int]
    num_classes: int = 1000
    placement: Any = "C,C,C,C"
    base_width: int = 64
    stem: str = "conv7x7"
    replace_stem_pool: bool = False
    max_pool_grad: str = "views"
    stem_conv_impl: str = "space_to_depth"
    activation: str = "relu"
    shortcut: str = "conv1x1"
    conv_init: str = "lecun_normal"
    se_ratio: float = 0.0
    mixer_pool: int = 3
    lambda_layer: Mapping[str, Any] = FrozenDict()
    shared_embeddings: bool = False
    attention: Mapping[str, Any] = FrozenDict()
    drop_path_rate: float = 0.0
    drop_path_schedule: str = "block"
    dropout_rate: float = 0.0
    zero_init_last_bn: bool = True
    remat: str = ""
    remat_policy: str | None = None
    scan_blocks: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    batch_norm_folded: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        """Checks every setting when the model is built, before anything is traced."""
        _choice("stem", self.stem, STEMS)
        _choice("shortcut", self.shortcut, SHORTCUTS)
        _choice("activation", self.activation, tuple(ACTIVATIONS))
        _choice("mixer_pool", self.mixer_pool, MIXER_POOLS)
        _choice("conv_init", self.conv_init, tuple(CONV_INITS))
        for name in ("drop_path_rate", "dropout_rate"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}; use a rate in [0, 1)")
        unknown = sorted(set(self.attention) - set(ATTENTION_DEFAULTS))
        if unknown:
            raise ValueError(
                f"attention settings {unknown} unknown; valid: {list(ATTENTION_DEFAULTS)}"
            )
        LambdaLayer(**lambda_settings(self.lambda_layer), parent=None)  # checks its settings
        parse_placement(self.placement, self.stage_sizes)
        self._remat_stages(stage_names(len(self.stage_sizes)))
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
        """x: [b, H, W, 3] -> logits [b, num_classes] (float32), or the features dict."""
        check_not_training_folded(self, train)
        placement = parse_placement(self.placement, self.stage_sizes)
        stages = stage_names(len(self.stage_sizes))
        remat = self._remat_stages(stages)
        drop_rates = drop_path_rates(self.drop_path_rate, self.stage_sizes, self.drop_path_schedule)
        act = ACTIVATIONS[self.activation]
        conv = functools.partial(
            nn.Conv,
            use_bias=self.batch_norm_folded,
            kernel_init=CONV_INITS[self.conv_init],
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        norm = functools.partial(
            FoldedBatchNorm if self.batch_norm_folded else nn.BatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        lambda_layer = lambda_settings(self.lambda_layer)
        x = self._stem(jnp.asarray(x, self.dtype), conv, norm, act)
        features, stride, tables = {"stem": x}, 4, {}
        for s, (stage, block_types) in enumerate(zip(stages, placement, strict=True)):
            block_cls = self._remat(Bottleneck) if stage in remat else Bottleneck
            for first, last in block_runs(block_types, self.scan_blocks):
                block_type = block_types[first]
                shared = block_type == "L" and self.shared_embeddings
                embeddings = self._shared_table(tables, x, stride, lambda_layer) if shared else None
                strides = 2 if first == 0 and s > 0 else 1
                block = functools.partial(
                    block_cls,
                    width=self.base_width * 2**s,
                    conv=conv,
                    norm=norm,
                    act=act,
                    strides=strides,
                    block_type=block_type,
                    mixer=self._mixer(block_type, lambda_layer),
                    mixer_pool=self.mixer_pool,
                    se=self._se() if block_type == "C" else None,
                    shortcut=self.shortcut,
                    zero_init_last_bn=self.zero_init_last_bn,
                )
                rates = drop_rates[s][first : last + 1]
                if first == last:
                    x = block(drop_path_rate=rates[0], name=f"{stage}_block{first + 1}")(
                        x, train, embeddings
                    )
                else:
                    x = scanned_blocks(
                        block, train, rates, name=f"{stage}_scan{first + 1}_{last + 1}"
                    )(x, embeddings)
                stride *= strides
            features[stage] = x
        features["pre_logits"] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if return_features:
            return features
        x = nn.Dropout(self.dropout_rate, name="head_dropout")(
            features["pre_logits"], deterministic=not train
        )
        return nn.Dense(
            self.num_classes,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            kernel_init=nn.initializers.normal(0.01),  # ResNet-RS's and timm's final dense
            name="head",
        )(x)

    def _stem(self, x: jax.Array, conv: ModuleDef, norm: ModuleDef, act) -> jax.Array:
        """[b, H, W, 3] -> [b, H/4, W/4, base_width]."""
        w = self.base_width
        first_conv = stem_conv(conv, self.stem_conv_impl)
        if self.stem == "conv7x7":
            x = first_conv(w, (7, 7), (2, 2), padding=3, name="stem_conv1")(x)
            x = act(norm(name="stem_bn1")(x))
        else:
            widths = (w // 2, w // 2, w) if self.stem == "deep" else (3 * w // 8, w // 2, w)
            for i, features in enumerate(widths):
                layer, strides = (first_conv, 2) if i == 0 else (conv, 1)
                x = layer(
                    features, (3, 3), (strides, strides), padding=1, name=f"stem_conv{i + 1}"
                )(x)
                x = act(norm(name=f"stem_bn{i + 1}")(x))
        if self.replace_stem_pool:
            x = conv(w, (3, 3), (2, 2), padding=1, name="stem_pool_conv")(x)
            return act(norm(name="stem_pool_bn")(x))
        return max_pool_3x3(x, self.max_pool_grad)

    def _mixer(self, block_type: str, lambda_layer: Mapping[str, Any]) -> ModuleDef | None:
        """The module (partial) that fills a non-conv 3x3 slot."""
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if block_type == "C":
            return None
        if block_type == "L":
            return functools.partial(
                LambdaLayer,
                **lambda_layer,
                bn_momentum=self.bn_momentum,
                bn_epsilon=self.bn_epsilon,
                batch_norm_folded=self.batch_norm_folded,
                **dtypes,
            )
        settings = {**ATTENTION_DEFAULTS, **self.attention}
        extra = dict(window=settings["window"]) if block_type == "S" else {}
        return functools.partial(_ATTENTION[block_type], heads=settings["heads"], **extra, **dtypes)

    def _se(self) -> ModuleDef | None:
        if not self.se_ratio:
            return None
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return functools.partial(SqueezeExcite, ratio=self.se_ratio, **dtypes)

    def _shared_table(self, tables: dict, x: jax.Array, stride: int, settings) -> jax.Array:
        """The relative table shared by the lambda layers whose input has this stride."""
        if stride not in tables:
            shape = position_embedding_shape(
                x.shape[1:3], settings["scope_size"], settings["dim_k"], settings["dim_u"]
            )
            tables[stride] = self.param(
                f"rel_embeddings_stride{stride}",
                nn.initializers.normal(settings["embedding_init_std"]),
                shape,
                self.param_dtype,
            )
        return tables[stride]

    def _remat(self, block: type[nn.Module]) -> type[nn.Module]:
        policy = self.remat_policy and getattr(jax.checkpoint_policies, self.remat_policy, None)
        if self.remat_policy and not callable(policy):
            raise ValueError(
                f"remat_policy={self.remat_policy!r} is no jax.checkpoint_policies policy; use "
                "None (recompute everything) or e.g. 'dots_saveable' (keep conv outputs)"
            )
        # Inside a scan the loop already keeps the blocks apart, so CSE barriers only cost.
        return nn.remat(block, static_argnums=(2,), policy=policy, prevent_cse=not self.scan_blocks)

    def _remat_stages(self, stages: Sequence[str]) -> frozenset[str]:
        names = stages if self.remat == "all" else [n for n in self.remat.split(",") if n]
        unknown = sorted(set(names) - set(stages))
        if unknown:
            raise ValueError(f"remat stages {unknown} unknown; choose among {stages} or 'all'")
        return frozenset(names)
