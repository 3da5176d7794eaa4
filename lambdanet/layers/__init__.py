"""Layers: the lambda layer and the attention baselines."""

from lambdanet.layers.attention import (
    AxialSelfAttention,
    LocalSelfAttention,
    RelativeSelfAttention2D,
    SqueezeExcite,
)
from lambdanet.layers.lambda_layer import LambdaLayer, causal_mask, position_embedding_shape

__all__ = [
    "AxialSelfAttention",
    "LambdaLayer",
    "LocalSelfAttention",
    "RelativeSelfAttention2D",
    "SqueezeExcite",
    "causal_mask",
    "position_embedding_shape",
]
