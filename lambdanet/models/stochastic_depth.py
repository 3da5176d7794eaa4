"""Stochastic depth (Huang et al., 2016): dropping whole residual branches per example.

`drop_path` applies it to a block's branch; `drop_path_rates` spreads a model's rate over its
blocks, linearly in depth, with timm's per-block or ResNet-RS's per-stage schedule.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp

DROP_PATH_SCHEDULES = ("block", "stage")


def drop_path(y: jax.Array, rate: float | jax.Array, rng: jax.Array | None) -> jax.Array:
    """Stochastic depth: [b, ...] -> y with each example dropped with probability ``rate``
    (kept ones scaled by 1 / (1 - rate)); ``rng`` None (inference) or a rate of 0 is identity.
    ``rate`` may be traced (a scanned stage's per-block rates)."""
    if rng is None or is_zero(rate):
        return y
    keep = 1.0 - rate
    mask = jax.random.bernoulli(rng, keep, (y.shape[0],) + (1,) * (y.ndim - 1))
    return jnp.where(mask, y / jnp.asarray(keep, y.dtype), jnp.zeros_like(y))


def is_zero(rate: float | jax.Array) -> bool:
    return isinstance(rate, int | float) and rate == 0


def drop_path_rates(rate: float, stage_sizes: Sequence[int], schedule: str) -> list[list[float]]:
    """Stochastic depth rate of every block, per stage, growing linearly with depth.

    "block" (timm ``drop_path_rate``): block j of N drops with rate·j/(N - 1).
    "stage" (tensorflow/tpu ResNet-RS ``get_drop_connect_rate``): every block of stage i
    (0-based) of S drops with rate·(i + 2)/(S + 1).
    """
    if schedule not in DROP_PATH_SCHEDULES:
        raise ValueError(f"drop_path_schedule={schedule!r}; choose one of {DROP_PATH_SCHEDULES}")
    total, rates = sum(stage_sizes), []
    for s, size in enumerate(stage_sizes):
        if schedule == "stage":
            rates.append([rate * (s + 2) / (len(stage_sizes) + 1)] * size)
        else:
            first = sum(stage_sizes[:s])
            rates.append([rate * (first + i) / max(total - 1, 1) for i in range(size)])
    return rates
