"""A strided convolution over few channels, computed as a stride-1 convolution over s x s blocks.

The stems' first convolution (ResNet 7x7 stride 2 over the 3 RGB channels; 3x3 stride 2 in the
deep and tiered stems) has too few input channels for the GPU's implicit-GEMM kernels. Space to
depth rewrites it exactly (as MLPerf's ResNets do on TPUs): with stride s, input row s·I + p
becomes block row I, channel (p, ·), and kernel row s·a + p (zero-padded to a multiple of s)
becomes block kernel row a, channel (p, ·). A k x k stride-s convolution over c channels is then a
ceil(k/s) x ceil(k/s) stride-1 convolution over s²·c channels, with the same outputs:

    y[i, j] = Σ_{a, b, p, q} blocks[i + a, j + b, (p, q, c)] · kernel[s·a + p, s·b + q, c]

`SpaceToDepthConv` keeps `nn.Conv`'s parameters (``kernel`` [kh, kw, c, f], ``bias`` [f]), so
checkpoints, the timm weight mapping and `fold_batch_norm` treat it as the plain convolution.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

STEM_CONV_IMPLS = ("direct", "space_to_depth")


def space_to_depth_conv(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """x [b, H, W, c] * kernel [kh, kw, c, f], stride s, symmetric zero padding -> [b, H', W', f].

    Equals ``lax.conv_general_dilated(x, kernel, (s, s), [(padding, padding)] * 2)`` in NHWC/HWIO
    (H' = (H + 2·padding - kh) // s + 1), computed over s x s blocks as a stride-1 convolution.
    """
    s = stride
    kh, kw, c, f = kernel.shape
    blocks_h, blocks_w = -(-kh // s), -(-kw // s)  # block kernel size ceil(k / s)
    b, h, w, _ = x.shape
    out_h = (h + 2 * padding - kh) // s + 1
    out_w = (w + 2 * padding - kw) // s + 1
    rows, cols = (out_h - 1 + blocks_h) * s, (out_w - 1 + blocks_w) * s  # padded input read
    # The far side's padding may be negative: rows no output reads are cropped.
    x = lax.pad(
        x,
        jnp.zeros((), x.dtype),
        [(0, 0, 0), (padding, rows - h - padding, 0), (padding, cols - w - padding, 0), (0, 0, 0)],
    )
    x = x.reshape(b, rows // s, s, cols // s, s, c).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, rows // s, cols // s, s * s * c)
    kernel = jnp.pad(kernel, [(0, blocks_h * s - kh), (0, blocks_w * s - kw), (0, 0), (0, 0)])
    kernel = kernel.reshape(blocks_h, s, blocks_w, s, c, f).transpose(0, 2, 1, 3, 4, 5)
    kernel = kernel.reshape(blocks_h, blocks_w, s * s * c, f)
    return lax.conv_general_dilated(
        x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def stem_conv(conv: functools.partial, impl: str) -> functools.partial:
    """The stem's first convolution: ``conv`` (an `nn.Conv` partial) for "direct", else a
    `SpaceToDepthConv` with the same keywords (same parameters and outputs)."""
    if impl not in STEM_CONV_IMPLS:
        raise ValueError(f"stem_conv_impl={impl!r}; choose one of {STEM_CONV_IMPLS}")
    return conv if impl == "direct" else functools.partial(SpaceToDepthConv, **conv.keywords)


class SpaceToDepthConv(nn.Module):
    """`nn.Conv` (square stride, symmetric integer padding) computed by `space_to_depth_conv`.

    Attributes:
      features: output channels f.
      kernel_size: (kh, kw).
      strides: (s, s); one stride for both axes.
      padding: zero padding on every side.
      use_bias, kernel_init, bias_init, dtype, param_dtype: as in `nn.Conv`.
    """

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1)
    padding: int = 0
    use_bias: bool = True
    kernel_init: Any = nn.linear.default_kernel_init
    bias_init: Any = nn.initializers.zeros_init()
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [b, H, W, c] -> [b, H', W', features]."""
        strides = tuple(self.strides)
        if len(set(strides)) != 1 or not isinstance(self.padding, int):
            raise ValueError(
                f"SpaceToDepthConv takes one stride for both axes and an integer padding, got "
                f"strides={strides}, padding={self.padding!r}; use nn.Conv for other convolutions"
            )
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = space_to_depth_conv(x, kernel, strides[0], self.padding)
        return y if bias is None else y + bias
