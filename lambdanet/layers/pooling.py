"""The stems' 3x3 stride-2 max pool, with a choice of how its gradient is computed.

XLA differentiates a max pool (``lax.reduce_window``) with ``select_and_scatter``, a scatter that
was the largest single kernel of lambda_resnet26t's training step on the GPU.
``max_pool_3x3(x, grad="views")`` computes the same values and the same gradient without a
scatter: the gradient goes to the first maximum of each window in row-major order, as
``select_and_scatter`` does. It looks at the nine strided views of the padded input; the argmax
over them picks each window's winner. Each view's share of the output gradient goes back through
a padding with holes (``lax.pad`` with interior padding): elementwise work that XLA can fuse.
The training step is faster this way for every model timed, so "views" is the models' default
(profile and timings: results/stem_and_batchnorm.md).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

MAX_POOL_GRADS = ("scatter", "views")
_OFFSETS = tuple((i, j) for i in range(3) for j in range(3))  # row-major, as select_and_scatter


def max_pool_3x3(x: jax.Array, grad: str = "views") -> jax.Array:
    """3x3 max pool, stride 2, padding 1: [b, H, W, c] -> [b, ceil(H/2), ceil(W/2), c].

    ``grad``: "views" (scatter-free) or "scatter" (XLA's select_and_scatter): the same gradient.
    """
    if grad not in MAX_POOL_GRADS:
        raise ValueError(f"max_pool_grad={grad!r}; choose one of {MAX_POOL_GRADS}")
    return _max_pool_views(x) if grad == "views" else _reduce_window_max(x)


def _reduce_window_max(x: jax.Array) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


def _views(x: jax.Array, out_h: int, out_w: int) -> list[jax.Array]:
    """The nine [b, out_h, out_w, c] views: view (i, j)[p, q] = padded x[2p + i, 2q + j]."""
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
    return [padded[:, i : i + 2 * out_h - 1 : 2, j : j + 2 * out_w - 1 : 2] for i, j in _OFFSETS]


@jax.custom_vjp
def _max_pool_views(x: jax.Array) -> jax.Array:
    return _reduce_window_max(x)


def _max_pool_views_fwd(x: jax.Array):
    return _reduce_window_max(x), x


def _max_pool_views_bwd(x: jax.Array, dy: jax.Array):
    height, width = x.shape[1:3]
    out_h, out_w = dy.shape[1:3]
    winner = jnp.argmax(jnp.stack(_views(x, out_h, out_w)), axis=0)  # first maximum
    zero = jnp.zeros((), dy.dtype)
    dx = jnp.zeros(x.shape, dy.dtype)
    for k, (i, j) in enumerate(_OFFSETS):
        share = jnp.where(winner == k, dy, zero)
        # view (i, j)[p, q] is x[2p + i - 1, 2q + j - 1]: place it there, holes between
        rows = (i - 1, height - (i - 1) - (2 * out_h - 1), 1)
        cols = (j - 1, width - (j - 1) - (2 * out_w - 1), 1)
        dx = dx + lax.pad(share, zero, ((0, 0, 0), rows, cols, (0, 0, 0)))
    return (dx.astype(x.dtype),)


_max_pool_views.defvjp(_max_pool_views_fwd, _max_pool_views_bwd)
