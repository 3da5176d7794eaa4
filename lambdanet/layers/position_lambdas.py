"""Position lambdas without the gathered embeddings: the lambda and row convolutions.

The position lambdas of the lambda layer (Bello, ICLR 2021, §3.2) are
``λ^p_n = Σ_m E_nmᵀ v_m ∈ R^{|k|×|v|}`` with ``E_nm = R[m - n]`` taken from a relative table R.
`lambdanet.layers.lambda_layer` computes them by gathering E [n, m, |k|, |u|] (Figure 3,
``impl="einsum"``); the two functions here never form E:

  * `lambda_conv` - the lambda convolution of Appendix B.1 (``impl="conv"``): memory linear in n;
  * `lambda_row_conv` - one 1-D convolution along the image rows (``impl="rows"``, not in the
    paper): each query sees r·W context positions instead of n.

Notation (Table 1): b batch, n query positions, m = n context positions, |k| key depth, |h|
queries, |v| value depth, |u| intra-depth (Appendix B.4), r the side of the local scope (r x r
for images, r_H x r_W when cropped to the input). The values carry a group axis g: g = 1 for the
multi-query layer, g = |h| for the multi-head variant (Appendix B.3). Both functions return the
same position lambdas, [b, g, |v|, n, |k|], for the same table and values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def offset_one_hot(size: int, side: int) -> np.ndarray:
    """[n, m, side] for ``size`` positions along one axis: 1 where m - n + side // 2 is the entry.

    Row n, column m selects entry ``m - n + side // 2`` of a table axis of ``side`` relative
    offsets (no entry when the offset is outside the table).
    """
    pos = np.arange(size)
    offset = pos[None, :] - pos[:, None] + side // 2  # [n, m]
    return (offset[..., None] == np.arange(side)).astype(np.float32)


def reachable_offsets(side: int, size: int) -> slice:
    """The entries of a table axis of ``side`` offsets that an input of ``size`` can reach.

    A scope wider than the input only adds zeros: offsets beyond ±(size - 1) are cropped.
    """
    centre = side // 2
    return slice(max(centre - (size - 1), 0), centre + min(size, centre + 1))


def causal_offsets(sides: Sequence[int]) -> np.ndarray:
    """Boolean [*sides] (e.g. [r, r]): the offsets m - n at or before n in raster order.

    Multiplying the table R [*sides, |k|, |u|] by it makes either convolution causal (m <= n).
    """
    centre = np.array([side // 2 for side in sides]).reshape(-1, *([1] * len(sides)))
    offsets = np.indices(sides) - centre
    keep, decided = np.zeros(sides, bool), np.zeros(sides, bool)
    for offset in offsets:  # lexicographic: the first non-zero axis decides
        keep |= ~decided & (offset < 0)
        decided |= offset != 0
    return keep | ~decided


def lambda_conv(values: jax.Array, table: jax.Array, spatial_shape: Sequence[int]) -> jax.Array:
    """Position lambdas by the lambda convolution (Appendix B.1).

    values: [b, *spatial, g, |u|, |v|] (spatial = (H, W) with n = H·W, or (n,));
    table R: [r, r, |k|, |u|] (or [r, |k|, |u|]). Returns λ^p [b, g, |v|, n, |k|].

    Each value channel is one image of a batch of b·g·|v| images with |u| channels, convolved
    with the kernel [r, r, |u|, |k|] (cross-correlation with centred padding, so that output n
    sums R[m - n] v_m). Memory is linear in n.
    """
    ndim = len(spatial_shape)
    if ndim not in (1, 2):
        raise ValueError(f"the lambda convolution supports 1-D or 2-D inputs, got {ndim}-D")
    crop = tuple(
        reachable_offsets(side, s)
        for side, s in zip(table.shape[:ndim], spatial_shape, strict=True)
    )
    kernel = jnp.swapaxes(table[crop], -1, -2)  # [r, r, |u|, |k|]
    b, g, u, v = values.shape[0], values.shape[-3], values.shape[-2], values.shape[-1]
    spatial_axes = tuple(range(1, 1 + ndim))
    x = jnp.transpose(values, (0, ndim + 1, ndim + 3, *spatial_axes, ndim + 2))
    x = x.reshape(b * g * v, *spatial_shape, u)
    spatial = "HW"[:ndim]
    out = jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1,) * ndim,
        padding=[(k // 2, k // 2) for k in kernel.shape[:ndim]],
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
    )
    return out.reshape(b, g, v, math.prod(spatial_shape), out.shape[-1])


def lambda_row_conv(values: jax.Array, table: jax.Array, spatial_shape: Sequence[int]) -> jax.Array:
    """Position lambdas by a 1-D convolution along the rows of an image.

    values: [b, H, W, g, |u|, |v|] (n = H·W); table R: [r_H, r_W, |k|, |u|].
    Returns λ^p [b, g, |v|, n, |k|].

    Each value channel is one sequence of H rows of a batch of b·g·|v|, with the W·|u| entries
    of a row as channels. The kernel [r_H, W·|u|, W·|k|] holds at tap t the gathered E of row
    offset t: kernel[t, (c, u), (j, k)] = R[t, c - j + r_W // 2, k, u] (zero outside the table),
    so output row i sums R[m - n] v_m over the context rows i - r_H // 2 ... i + r_H // 2.
    Each query sees r_H·W context positions instead of n.
    """
    if len(spatial_shape) != 2:
        raise ValueError(f"impl='rows' needs images, got spatial shape {spatial_shape}")
    height, width = spatial_shape
    table = table[reachable_offsets(table.shape[0], height)]
    one_hot = jnp.asarray(offset_one_hot(width, table.shape[1]), table.dtype)  # [W, W, r_W]
    kernel = jnp.einsum("jcs,tsku->tcujk", one_hot, table)
    k, u = table.shape[-2:]
    kernel = kernel.reshape(table.shape[0], width * u, width * k)
    b, g, v = values.shape[0], values.shape[3], values.shape[5]
    x = jnp.transpose(values, (0, 3, 5, 1, 2, 4)).reshape(b * g * v, height, width * u)
    pad = table.shape[0] // 2
    out = jax.lax.conv_general_dilated(
        x, kernel, (1,), [(pad, pad)], dimension_numbers=("NHC", "HIO", "NHC")
    )
    return out.reshape(b, g, v, height * width, k)


# The implementations by their ``impl`` name in `LambdaLayer`.
POSITION_LAMBDAS = {"conv": lambda_conv, "rows": lambda_row_conv}
