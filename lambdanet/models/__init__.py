"""The model zoo: ResNet / ResNet-RS backbones, LambdaResNets, hybrids, attention baselines."""

from lambdanet.models.fold import fold_batch_norm
from lambdanet.models.placement import (
    BLOCK_TYPES,
    STAGE_SIZES,
    paper_c4_indices,
    paper_placement,
    parse_placement,
)
from lambdanet.models.registry import (
    ModelEntry,
    create_model,
    list_models,
    model_entry,
    model_kwargs,
)
from lambdanet.models.resnet import Bottleneck, ResNet

__all__ = [
    "BLOCK_TYPES",
    "STAGE_SIZES",
    "Bottleneck",
    "ModelEntry",
    "ResNet",
    "create_model",
    "fold_batch_norm",
    "list_models",
    "model_entry",
    "model_kwargs",
    "paper_c4_indices",
    "paper_placement",
    "parse_placement",
]
