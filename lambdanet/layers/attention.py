"""Self-attention baselines of Tables 3 and 4 and squeeze-excitation.

Each attention module replaces the 3x3 convolution of a ResNet bottleneck, like the lambda layer:
input [b, H, W, d], output [b, H, W, d], multi-head with |h| = 8 heads of depth d / |h| by
default. Queries, keys and values come from one fused 1x1 projection without bias (``qkv``);
there is no output projection, the bottleneck's final 1x1 convolution plays that role (as in
stand-alone self-attention, Ramachandran et al. 2019, whose ResNet-50 has 18.0M parameters).
Queries are scaled by (d / |h|)^-1/2 and the softmax runs in float32.

  * `RelativeSelfAttention2D`  global self-attention with 2-D relative position logits
    (Bello et al. 2019): logit(n, m) = q_n·k_m + q_n·r^H[m_y - n_y] + q_n·r^W[m_x - n_x].
    Memory Θ(b |h| n²) for the attention maps (Table 4: 120 GB for ResNet-50 at batch 128).
  * `AxialSelfAttention`  global 1-D relative self-attention along the height, then along the
    width (Ho et al. 2019; Wang et al. 2020), memory Θ(b |h| n √n).
  * `LocalSelfAttention`  7x7 local relative self-attention (Ramachandran et al. 2019): every
    query attends to the window centred on it; the relative embedding of offset (a, b) is the
    concatenation of a row embedding and a column embedding (d / 2|h| channels each). Window
    positions outside the image are masked out (not attended to as zero padding).
  * `SqueezeExcite`  channel attention (Hu et al. 2018), used by ResNet-RS and Table 3's
    "Conv + channel attention" row.

Relative embeddings are shared across heads and initialised N(0, (d / |h|)^-1/2); the global
tables are sized from the input at trace time.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def relative_to_absolute(table: jax.Array, length: int) -> jax.Array:
    """Re-index a relative table [2L - 1, c] into [L (query), L (key), c]: E[i, j] = R[j - i]."""
    offsets = np.arange(length)[None, :] - np.arange(length)[:, None] + length - 1
    return table[offsets]


def _split_heads(x: jax.Array, heads: int) -> jax.Array:
    """[..., d] -> [..., |h|, d / |h|]."""
    if x.shape[-1] % heads:
        raise ValueError(
            f"heads={heads} must divide the channels d={x.shape[-1]}; choose a divisor of "
            f"{x.shape[-1]}, e.g. 8"
        )
    return x.reshape(*x.shape[:-1], heads, x.shape[-1] // heads)


def _softmax(logits: jax.Array, axis, dtype) -> jax.Array:
    return jax.nn.softmax(logits.astype(jnp.float32), axis=axis).astype(dtype)


class _MultiHeadAttention(nn.Module):
    """Shared fields and the fused projection of the attention baselines."""

    heads: int = 8
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [..., d] -> scaled queries, keys, values, each [..., |h|, d / |h|]."""
        d = x.shape[-1]
        qkv = nn.Dense(
            3 * d, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype, name="qkv"
        )(x)
        q, k, v = (_split_heads(t, self.heads) for t in jnp.split(qkv, 3, axis=-1))
        return q * (q.shape[-1] ** -0.5), k, v

    def relative_table(self, name: str, shape: tuple[int, ...], head_depth: int) -> jax.Array:
        """A relative embedding table initialised N(0, head_depth^-1/2), in the compute dtype."""
        init = nn.initializers.normal(head_depth**-0.5)
        return jnp.asarray(self.param(name, init, shape, self.param_dtype), self.dtype)


class RelativeSelfAttention2D(_MultiHeadAttention):
    """Global multi-head self-attention with 2-D relative logits (Bello et al. 2019).

    x: [b, H, W, d] -> [b, H, W, d]. Parameters: ``qkv`` [d, 3d], ``rel_height`` [2H - 1, d/|h|],
    ``rel_width`` [2W - 1, d/|h|].
    """

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, height, width, d = x.shape
        q, k, v = self.project_qkv(x)  # [b, H, W, |h|, c]
        c = q.shape[-1]
        rel_h = relative_to_absolute(
            self.relative_table("rel_height", (2 * height - 1, c), c), height
        )
        rel_w = relative_to_absolute(self.relative_table("rel_width", (2 * width - 1, c), c), width)
        logits = jnp.einsum("bxyhc,bXYhc->bhxyXY", q, k)
        logits += jnp.einsum("bxyhc,xXc->bhxyX", q, rel_h)[..., None]
        logits += jnp.einsum("bxyhc,yYc->bhxyY", q, rel_w)[..., None, :]
        weights = _softmax(logits, (-2, -1), self.dtype)
        return jnp.einsum("bhxyXY,bXYhc->bxyhc", weights, v).reshape(b, height, width, d)


class AxialAttention(_MultiHeadAttention):
    """Multi-head self-attention along one spatial axis with 1-D relative logits.

    x: [b, H, W, d] -> [b, H, W, d]; ``axis`` 1 attends along the height (within each column),
    2 along the width. Parameters: ``qkv`` [d, 3d], ``rel_embeddings`` [2L - 1, d/|h|].
    """

    axis: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.axis not in (1, 2):
            raise ValueError(f"axis must be 1 (height) or 2 (width), got {self.axis}")
        x = jnp.swapaxes(x, self.axis, 2)  # attend along axis 2: [b, o, L, d]
        b, other, length, d = x.shape
        q, k, v = self.project_qkv(x)  # [b, o, L, |h|, c]
        c = q.shape[-1]
        table = self.relative_table("rel_embeddings", (2 * length - 1, c), c)
        logits = jnp.einsum("bolhc,boLhc->bholL", q, k)
        logits += jnp.einsum("bolhc,lLc->bholL", q, relative_to_absolute(table, length))
        weights = _softmax(logits, -1, self.dtype)
        out = jnp.einsum("bholL,boLhc->bolhc", weights, v).reshape(b, other, length, d)
        return jnp.swapaxes(out, self.axis, 2)


class AxialSelfAttention(nn.Module):
    """Axial self-attention: `AxialAttention` over the height (``height``), then the width
    (``width``). x: [b, H, W, d] -> [b, H, W, d]."""

    heads: int = 8
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kwargs = dict(heads=self.heads, dtype=self.dtype, param_dtype=self.param_dtype)
        x = AxialAttention(axis=1, name="height", **kwargs)(x)
        return AxialAttention(axis=2, name="width", **kwargs)(x)


def local_windows(x: jax.Array, window: int) -> jax.Array:
    """[b, H, W, ...] -> [b, H, W, window², ...]: the zero-padded window centred on each position.

    Window index p = a·window + c holds the position offset (a - window//2, c - window//2).
    """
    pad = window // 2
    height, width = x.shape[1:3]
    padding = [(0, 0), (pad, pad), (pad, pad)] + [(0, 0)] * (x.ndim - 3)
    padded = jnp.pad(x, padding)
    shifts = [
        padded[:, a : a + height, c : c + width] for a in range(window) for c in range(window)
    ]
    return jnp.stack(shifts, axis=3)


class LocalSelfAttention(_MultiHeadAttention):
    """Local relative self-attention over a ``window`` x ``window`` neighbourhood (Ramachandran
    et al. 2019). x: [b, H, W, d] -> [b, H, W, d].

    logit(n, n + (a, c)) = q_n·k_{n+(a,c)} + q_n·concat(r^row[a], r^col[c]); positions outside
    the image are excluded from the softmax. Parameters: ``qkv`` [d, 3d], ``rel_rows`` and
    ``rel_cols`` [window, d / 2|h|]. Memory Θ(b |h| n window²).
    """

    window: int = 7

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.window <= 0 or self.window % 2 == 0:
            raise ValueError(f"window must be a positive odd integer, got {self.window}")
        b, height, width, d = x.shape
        q, k, v = self.project_qkv(x)  # [b, H, W, |h|, c]
        c = q.shape[-1]
        if c % 2:
            raise ValueError(
                f"d / heads = {c} must be even (half the channels embed the row offset, half "
                "the column offset); change heads or the width"
            )
        rows = self.relative_table("rel_rows", (self.window, c // 2), c)
        cols = self.relative_table("rel_cols", (self.window, c // 2), c)
        grid = (self.window, self.window, c // 2)
        rel = jnp.concatenate(
            [jnp.broadcast_to(rows[:, None], grid), jnp.broadcast_to(cols[None, :], grid)], -1
        ).reshape(self.window**2, c)
        keys = local_windows(k, self.window)  # [b, H, W, p, |h|, c]
        logits = jnp.einsum("bxyhc,bxyphc->bxyhp", q, keys)
        logits += jnp.einsum("bxyhc,pc->bxyhp", q, rel)
        inside = local_windows(np.ones((1, height, width), bool), self.window)[0]  # [H, W, p]
        logits = jnp.where(inside[:, :, None, :], logits, -jnp.inf)
        weights = _softmax(logits, -1, self.dtype)
        values = local_windows(v, self.window)
        return jnp.einsum("bxyhp,bxyphc->bxyhc", weights, values).reshape(b, height, width, d)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): x * sigmoid(W_e relu(W_r mean_HW(x))).

    x: [b, H, W, c]. ``ratio`` sets the reduced width max(1, int(c · ratio)) relative to the
    input channels c, as ResNet-RS's ``se_ratio`` does (0.25 of the block output; Hu et al.'s
    reduction 16 is ratio 1/16). Parameters: ``reduce`` [c, c·ratio] and ``expand`` [c·ratio, c],
    both with bias.
    """

    ratio: float = 0.25
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        channels = x.shape[-1]
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)
        s = nn.relu(nn.Dense(max(1, int(channels * self.ratio)), name="reduce", **dense)(s))
        s = nn.Dense(channels, name="expand", **dense)(s)
        return x * nn.sigmoid(s)
