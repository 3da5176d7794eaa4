"""Layers: the lambda layer and the attention baselines."""

from lambdanet.layers.lambda_layer import LambdaLayer, causal_mask, position_embedding_shape

__all__ = ["LambdaLayer", "causal_mask", "position_embedding_shape"]
