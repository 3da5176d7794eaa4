"""BatchNorm folding for inference: every conv -> BatchNorm pair becomes one biased conv.

At inference a BatchNorm is the per-channel affine y = a·x + (β - a·μ), a = γ / sqrt(σ² + ε),
with the running mean μ and variance σ². After a convolution it folds into the conv's weights:
W' = a·W (scaled per output channel) and bias b' = β + a·(b - μ). The folded network computes the
same function without the scale-and-shift pass over every conv output; the bias (+ ReLU) that
remains is what XLA can fuse into the convolution.

Pairs are found by name: the BatchNorm that follows a conv named ``...conv...`` is the sibling
whose name has ``bn`` in place of ``conv`` (``conv1``/``bn1``, ``stem_conv1``/``stem_bn1``,
``downsample_conv``/``downsample_bn``), the convention of `ResNet`. BatchNorms
with no such conv before them (after a lambda layer) keep their variables and run as inference
BatchNorm. Inside a `LambdaLayer` the BatchNorms on queries and values (``norm_q``, ``norm_v``)
fold into the query and value columns of its ``qkv`` projection the same way.

    folded_model, folded_variables = fold_batch_norm(model, variables)
    logits = folded_model.apply(folded_variables, images)  # == model.apply(variables, images)

Cheap enough to call inside the jitted inference function (one multiply per weight).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


def norm_name(conv_name: str) -> str:
    """The name of the BatchNorm that follows conv ``conv_name`` (``conv1`` -> ``bn1``)."""
    return conv_name.replace("conv", "bn")


class FoldedBatchNorm(nn.BatchNorm):
    """The BatchNorm slot of a folded model (``batch_norm_folded=True``), inference only.

    Identity where `fold_batch_norm` folded this BatchNorm into the conv before it (its variables
    are gone); otherwise a BatchNorm on its running statistics.
    """

    @nn.compact
    def __call__(self, x: jax.Array, *args, **kwargs):
        if self.is_initializing():
            raise ValueError(
                "a model with batch_norm_folded=True is not initialised: build its variables with "
                "lambdanet.models.fold_batch_norm(model, variables) from the unfolded model's"
            )
        if not self.has_variable("batch_stats", "mean"):
            return x
        return super().__call__(x, *args, **kwargs)


def check_not_training_folded(model: nn.Module, train: bool) -> None:
    """A folded model has no BatchNorm statistics to train: refuse train=True."""
    if train and model.batch_norm_folded:
        raise ValueError(
            "batch_norm_folded=True is for inference (train=False): train the unfolded model "
            "and fold its variables afterwards with lambdanet.models.fold_batch_norm"
        )


def fold_batch_norm(model: nn.Module, variables: Mapping[str, Any]) -> tuple[nn.Module, dict]:
    """(model, {"params", "batch_stats"}) -> the same network with its conv -> BN pairs folded.

    ``model`` is a `ResNet` (anything with ``bn_epsilon`` and
    ``batch_norm_folded`` attributes); the returned model is its clone with
    ``batch_norm_folded=True`` and the returned variables hold every conv with a bias (zeros
    where no BatchNorm followed it) and only the BatchNorms that could not be folded.
    Raises ValueError if a BatchNorm to fold (after a conv, or a lambda layer's ``norm_q`` /
    ``norm_v``) has no running statistics.
    """
    params, stats = _fold_scope(
        dict(variables["params"]), dict(variables.get("batch_stats", {})), model.bn_epsilon
    )
    return model.clone(batch_norm_folded=True), {"params": params, "batch_stats": stats}


def _fold_scope(params: Mapping, stats: Mapping, epsilon: float) -> tuple[dict, dict]:
    params, stats = dict(params), dict(stats)
    if _is_lambda_layer(params):
        return _fold_lambda_layer(params, stats, epsilon)
    convs = [n for n, s in params.items() if "conv" in n and _is_conv(s)]
    for name in convs:
        bn = norm_name(name)
        if bn in params:
            scale, shift = _affine(params.pop(bn), _stats(stats, bn), epsilon)
            params[name] = _scale_columns(params[name], scale, shift)
        else:
            params[name] = _with_bias(params[name])
    for name, scope in params.items():
        if name not in convs and isinstance(scope, Mapping):
            params[name], stats[name] = _fold_scope(scope, stats.get(name, {}), epsilon)
            if not stats[name]:
                del stats[name]
    return params, stats


def _is_conv(scope: Any) -> bool:
    return isinstance(scope, Mapping) and getattr(scope.get("kernel"), "ndim", 0) == 4


def _is_lambda_layer(params: Mapping) -> bool:
    """A `LambdaLayer` scope with BatchNorms on queries and values (``norm_qv=True``)."""
    return {"qkv", "norm_q", "norm_v"} <= set(params)


def _fold_lambda_layer(params: dict, stats: dict, epsilon: float) -> tuple[dict, dict]:
    """``norm_q`` and ``norm_v`` into the query and value columns of ``qkv`` (keys unscaled).

    The columns of ``qkv`` are queries, keys, values in that order (`LambdaLayer`).
    """
    scale_q, shift_q = _affine(params.pop("norm_q"), _stats(stats, "norm_q"), epsilon)
    scale_v, shift_v = _affine(params.pop("norm_v"), _stats(stats, "norm_v"), epsilon)
    num_k = params["qkv"]["kernel"].shape[-1] - scale_q.size - scale_v.size
    ones, zeros = jnp.ones((num_k,), jnp.float32), jnp.zeros((num_k,), jnp.float32)
    params["qkv"] = _scale_columns(
        params["qkv"],
        jnp.concatenate([scale_q, ones, scale_v]),
        jnp.concatenate([shift_q, zeros, shift_v]),
    )
    return params, stats


def _stats(stats: dict, name: str) -> Mapping:
    if name not in stats:
        raise ValueError(f"BatchNorm {name!r} has no batch_stats: pass the model's batch_stats")
    return stats.pop(name)


def _affine(bn: Mapping, stats: Mapping, epsilon: float) -> tuple[jax.Array, jax.Array]:
    """Inference BatchNorm as y = scale·x + shift (float32 vectors over the channels)."""
    f32 = jnp.float32
    scale = bn.get("scale", jnp.ones_like(stats["var"])).astype(f32) * jax.lax.rsqrt(
        stats["var"].astype(f32) + epsilon
    )
    shift = bn.get("bias", jnp.zeros_like(scale)).astype(f32) - scale * stats["mean"].astype(f32)
    return scale, shift


def _with_bias(layer: Mapping) -> dict:
    """A conv with a zero bias added if it has none."""
    kernel = layer["kernel"]
    return {"bias": jnp.zeros(kernel.shape[-1:], kernel.dtype), **layer}


def _scale_columns(layer: Mapping, scale: jax.Array, shift: jax.Array) -> dict:
    """The layer followed by y = scale·x + shift: kernel·scale, bias·scale + shift."""
    kernel = layer["kernel"]
    bias = layer.get("bias", jnp.zeros_like(scale)).astype(jnp.float32)
    return {
        "kernel": (kernel.astype(jnp.float32) * scale).astype(kernel.dtype),
        "bias": (scale * bias + shift).astype(kernel.dtype),
    }
