"""Model registry: one name builds one model, with the paper's settings (§5, Appendix E.1).

Two families of lambda models:
  * "table3_4": Tables 3-4, the hybrid table and the D.1 ablations. The plain torchvision
    ResNet-50 (7x7 stem, max-pool, no SE) with every bottleneck 3x3 conv replaced (or the
    placement given), trained with the 90-epoch recipe.
  * "lambda_resnet": the LambdaResNets of Figure 4: ResNet-RS (ResNet-D stem and shortcut, stem
    pool conv, SE 0.25 in conv blocks) with lambda layers uniformly spaced in c4 and in all of
    c5 (``placement="paper"``).
plus "resnet_rs", the ResNet-RS baselines, and "timm_port": timm's `resnet26t`,
`lambda_resnet26t`, `lambda_resnet50ts` and `lambda_resnet26rpt_256` (``timm/models/byoanet.py``
and ``resnet.py``: the same networks as timm's, for side-by-side benchmarks and converted
weights; their lambda blocks follow timm's ``interleave_blocks``).

``model_kwargs(name, **overrides)`` is every architecture setting of the entry as plain data:
`ResNet`'s defaults, updated by the entry's values, then by ``overrides``; its mappings
``lambda_layer`` (`LambdaLayer`'s settings) and ``attention`` are complete, the overrides'
mappings updating the entry's (``model_kwargs("lambda_resnet26t", lambda_layer=dict(impl="conv"))``
keeps its scope r = 9). A config holds it as ``config.model``, so that the command line reaches
every setting, and the trainer builds ``ResNet(**config.model, num_classes=..., dtype=...)``.
``create_model(name, **overrides)`` is ``ResNet(**model_kwargs(name, ...))`` for Python users; it
also takes the arguments the trainer owns (`TRAINER_ARGS`: num_classes, dtype, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from lambdanet.layers.lambda_layer import LambdaLayer
from lambdanet.models.placement import STAGE_SIZES
from lambdanet.models.resnet import ATTENTION_DEFAULTS, LAMBDA_SETTINGS, TRAINER_ARGS, ResNet

FAMILIES = ("table3_4", "resnet_rs", "lambda_resnet", "timm_port")
RESNET_RS = dict(stem="deep", replace_stem_pool=True, shortcut="avg_down", se_ratio=0.25)
# timm's ports: tiered stem, He-normal fan-out conv init, a 2x2 pool after a strided lambda
# layer; lambda layers with scope r = 9 and the bias of timm's Conv3d, or ("rpt") a global
# relative table sized for 256 px inputs without a bias.
_TIMM = dict(
    stem="tiered",
    mixer_pool=2,
    conv_init="he_normal_fan_out",
    lambda_layer=dict(scope_size=9, position_bias=True),
)
_26, _50 = (2, 2, 2, 2), STAGE_SIZES[50]
TIMM_CONFIGS: dict[str, dict[str, Any]] = {
    "resnet26t": dict(_TIMM, stage_sizes=_26, shortcut="avg_down"),
    "lambda_resnet26t": dict(_TIMM, stage_sizes=_26, placement="C,C,CL,L"),
    "lambda_resnet50ts": dict(
        _TIMM, stage_sizes=_50, placement="C,CCCL,CLCLCL,CLC", activation="silu"
    ),
    "lambda_resnet26rpt_256": dict(
        _TIMM, stage_sizes=_26, placement="C,C,CL,L", lambda_layer=dict(scope_size=None)
    ),
}


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """A registered model: its architecture's arguments and what the paper reports for it.

    ``paper_params_m`` is the paper's parameter count in millions where it gives one (the
    source is in ``description``); None where the paper gives none.
    """

    name: str
    family: str
    config: Mapping[str, Any]
    description: str
    paper_params_m: float | None = None


_REGISTRY: dict[str, ModelEntry] = {}


def _register(name, family, description, paper_params_m=None, **config):
    _REGISTRY[name] = ModelEntry(name, family, config, description, paper_params_m)


def _register_all() -> None:
    r50 = dict(stage_sizes=STAGE_SIZES[50])
    _register("resnet50", "table3_4", "torchvision ResNet-50, Table 3 'Conv'", 25.6, **r50)
    _register(
        "se_resnet50",
        "table3_4",
        "ResNet-50 + squeeze-excitation (reduction 16), Table 3 'Conv + channel attention'",
        28.1,
        se_ratio=1 / 16,
        **r50,
    )
    for letter, name, description, params in [
        ("G", "global_sa_resnet50", "global relative self-attention, Table 4 (OOM)", None),
        ("X", "axial_sa_resnet50", "axial self-attention, Table 4", None),
        ("S", "local_sa_resnet50", "local 7x7 relative SA, Table 3 (Ramachandran et al.)", 18.0),
    ]:
        _register(name, "table3_4", description, params, placement=",".join(letter * 4), **r50)
    lam = dict(placement="L,L,L,L", **r50)
    _register(
        "lambda_resnet50_all", "table3_4", "lambda layer, Table 3 (k16 h4 u1 r23)", 15.0, **lam
    )
    _register(
        "lambda_resnet50_u4",
        "table3_4",
        "lambda layer, u=4, scope 7x7, Table 3",
        16.0,
        lambda_layer=dict(dim_u=4, scope_size=7, impl="conv"),
        **lam,
    )
    _register(
        "lambda_resnet50_k8",
        "table3_4",
        "lambda layer, k=8, Table 4 and D.1 (a)",
        14.8,
        lambda_layer=dict(dim_k=8),
        **lam,
    )
    _register(
        "lambda_resnet50_shared",
        "table3_4",
        "lambda layer with shared embeddings (one per resolution), Table 4",
        shared_embeddings=True,
        **lam,
    )
    _register(
        "lambda_conv_resnet50",
        "table3_4",
        "lambda convolution, scope 7x7, Table 4",
        lambda_layer=dict(scope_size=7, impl="conv"),
        **lam,
    )
    _register(
        "hybrid_resnet50",
        "table3_4",
        "conv/lambda hybrid, hybrid table (D.2); default C,C,L,L (paper [R]: 15.4?)",
        placement="C,C,L,L",
        **r50,
    )
    for depth, sizes in STAGE_SIZES.items():
        rs = dict(stage_sizes=sizes, **RESNET_RS)
        _register(f"resnet_rs{depth}", "resnet_rs", f"ResNet-RS-{depth}", **rs)
        _register(
            f"lambda_resnet{depth}",
            "lambda_resnet",
            f"LambdaResNet-{depth}: ResNet-RS-{depth}, lambda layers in c4 (uniform) and c5",
            placement="paper",
            **rs,
        )
    for name, config in TIMM_CONFIGS.items():
        description = f"port of timm's {name} (byoanet), same parameters and logits"
        _register(name, "timm_port", description, **config)


_register_all()


def list_models(family: str | None = None) -> list[str]:
    """Registered model names (of one family: "table3_4", "resnet_rs" or "lambda_resnet")."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {FAMILIES}")
    return [name for name, e in _REGISTRY.items() if family in (None, e.family)]


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; an unknown name raises a ValueError listing valid ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _REGISTRY[name]


def _defaults(cls: type[nn.Module], names) -> dict[str, Any]:
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    return {name: defaults[name] for name in names}


# Every architecture setting of a ResNet (its attributes but those the trainer owns), and the
# complete mappings' defaults.
ARCHITECTURE_SETTINGS = tuple(
    f.name
    for f in dataclasses.fields(ResNet)
    if f.init and f.name not in {*TRAINER_ARGS, "parent", "name"}
)
_MAPPING_DEFAULTS = {
    "lambda_layer": _defaults(LambdaLayer, LAMBDA_SETTINGS),
    "attention": ATTENTION_DEFAULTS,
}


def model_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """Every architecture setting of the registered model ``name`` (plain data; see the module
    docstring), with ``overrides``; an unknown name or setting raises a ValueError listing the
    valid ones."""
    entry = model_entry(name)
    unknown = sorted(set(overrides) - set(ARCHITECTURE_SETTINGS))
    if unknown:
        raise ValueError(
            f"unknown setting(s) {unknown} for model {name!r}; valid: {list(ARCHITECTURE_SETTINGS)}"
        )
    defaults = _defaults(ResNet, ARCHITECTURE_SETTINGS)
    kwargs = {**defaults, **entry.config, **overrides}
    for key, mapping_defaults in _MAPPING_DEFAULTS.items():
        kwargs[key] = {**mapping_defaults, **entry.config.get(key, {}), **overrides.get(key, {})}
    return kwargs


def create_model(name: str, **overrides: Any) -> ResNet:
    """``ResNet(**model_kwargs(name, ...))``; ``overrides`` are architecture settings and the
    trainer's arguments (`TRAINER_ARGS`: num_classes, dtype, param_dtype, batch_norm_folded)."""
    trainer = {key: overrides.pop(key) for key in TRAINER_ARGS if key in overrides}
    return ResNet(**model_kwargs(name, **overrides), **trainer)
