"""Model registry: one name builds one model, with the paper's settings (§5, Appendix E.1).

Two families of lambda models:
  * "table3_4": Tables 3-4, the hybrid table and the D.1 ablations. The plain torchvision
    ResNet-50 (7x7 stem, max-pool, no SE) with every bottleneck 3x3 conv replaced (or the
    placement given), trained with the 90-epoch recipe.
  * "lambda_resnet": the LambdaResNets of Figure 4: ResNet-RS (ResNet-D stem and shortcut, stem
    pool conv, SE 0.25 in conv blocks) with lambda layers uniformly spaced in c4 and in all of
    c5 (``placement="paper"``).
plus "resnet_rs", the ResNet-RS baselines, and "timm_port": timm's `resnet26t`,
`lambda_resnet26t`, `lambda_resnet50ts` and `lambda_resnet26rpt_256` (`ByoaResNet`, the same
networks as timm's, for side-by-side benchmarks and converted weights).

``create_model(name, **overrides)`` returns a `ResNet` (a `ByoaResNet` for the timm ports);
overrides are any of its attributes (num_classes, dtype, placement, dim_k, heads, dim_u,
scope_size, impl, drop_path_rate, dropout_rate, remat, shared_embeddings, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn

from lambdanet.models.byoanet import TIMM_CONFIGS, ByoaResNet
from lambdanet.models.placement import STAGE_SIZES
from lambdanet.models.resnet import ResNet

FAMILIES = ("table3_4", "resnet_rs", "lambda_resnet", "timm_port")
RESNET_RS = dict(deep_stem=True, replace_stem_pool=True, avg_down=True, se_ratio=0.25)


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
    architecture: type[nn.Module] = ResNet


_REGISTRY: dict[str, ModelEntry] = {}


def _register(name, family, description, paper_params_m=None, architecture=ResNet, **config):
    _REGISTRY[name] = ModelEntry(name, family, config, description, paper_params_m, architecture)


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
        dim_u=4,
        scope_size=7,
        impl="conv",
        **lam,
    )
    _register(
        "lambda_resnet50_k8",
        "table3_4",
        "lambda layer, k=8, Table 4 and D.1 (a)",
        14.8,
        dim_k=8,
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
        scope_size=7,
        impl="conv",
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
        _register(name, "timm_port", description, architecture=ByoaResNet, **config)


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


def create_model(name: str, **overrides: Any) -> nn.Module:
    """Builds the registered model ``name``, with ``overrides`` of its architecture's attributes
    (`ResNet`, or `ByoaResNet` for the timm ports)."""
    entry = model_entry(name)
    fields = {f.name for f in dataclasses.fields(entry.architecture)} - {"parent", "name"}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown override(s) {unknown} for {name!r}; valid: {sorted(fields)}")
    return entry.architecture(**{**entry.config, **overrides})
