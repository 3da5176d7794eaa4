"""The lambda layer of *LambdaNetworks: Modeling Long-Range Interactions Without Attention*.

Bello, ICLR 2021, https://arxiv.org/abs/2102.08602 (§3). Notation (Table 1):

  b batch, n = input positions, m = context positions (here the context is the input: m = n),
  d input/output channels, |k| query/key depth, |h| queries (heads), |v| = d / |h| value depth,
  |u| intra-depth, r the side of the local scope (r x r for images).

For every query position n the layer summarises the context into a lambda
``λ_n = Σ_m (k̄_m + e_nm) v_mᵀ = λ^c + λ^p_n ∈ R^{|k|×|v|}`` and applies it to the |h| queries:
``y_n = concat_h(λ_nᵀ q_n^h)``, so that d = |h|·|v| (multi-query, §3.2). Keys are normalised by a
softmax over the context positions m (one softmax per key channel), and the position embeddings
``E_nm = R[m - n]`` are gathered from a table ``R`` of relative embeddings, so the position term is
translation equivariant.

What is covered:
  * content lambda (on/off) and position lambdas (on/off), the ablations of Appendix D.1 (b);
  * local scope r x r (default 23, §4.1) or global scope (relative table covering the input);
  * three implementations with identical outputs for identical parameters:
      ``einsum`` - E gathered into [n, m, |k|, |u|] (zero outside the scope), Figure 3;
      ``conv``   - the lambda convolution of Appendix B.1: the values are the batch of a convolution
                   with one (|u|) input channel and |k| output channels, kernel [r, r, |u|, |k|];
                   memory linear in n;
      ``rows``   - the position lambdas as one 1-D convolution along the image rows, with the
                   W·|u| context columns as input channels and the W·|k| query columns as output
                   channels (kernel [r, W·|u|, W·|k|], the gathered E of one row offset each):
                   r·W instead of n context positions a query, in dense matrix-unit shapes;
    ``auto`` follows the paper's rule (Appendix E.1, unconfirmed): ``conv`` when n > 85² or
    |u| > 1, except that images from 48² to 85² positions whose local scope spans at most half
    the rows (and |u| = 1, no mask) take ``rows``, measured faster there (results/lambda_layer.md).
  * intra-depth |u| (Appendix B.4) in every implementation;
  * multi-query (default) or the multi-head variant of Appendix B.3;
  * BatchNorm on queries and values (switchable), key normalisation softmax / l2 / none;
  * shared position embeddings (the caller owns the table and passes ``embeddings=``);
  * masked contexts (Appendix B.2) with a [n, m] mask shared across the batch, and causal masking.

Unconfirmed choices [R], exposed as options: with |u| > 1 the key softmax runs over m only, one
softmax per (|u|, |k|) channel like lucidrains (``key_softmax_axes="m"``), or over (m, |u|)
(``"mu"``); the initialisation of Appendix E.1 (embeddings N(0, 1), W_K and W_V with std d^-1/2,
W_Q with std (|k| d)^-1/2); the embeddings' std is an option (``embedding_init_std``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("einsum", "conv", "rows", "auto")
KEY_NORMS = ("softmax", "l2", "none")
KEY_SOFTMAX_AXES = ("m", "mu")
CONTRACTIONS = ("auto", "lambdas", "scores")
_AUTO_CONV_MIN_POSITIONS = 85**2  # Appendix E.1 (unconfirmed): conv when n > 85².
# Measured on an H100 (batch 128, r = 23): the row convolution beat the einsum at 56x56 and lost
# at 28x28 and below, so `auto` takes it from 48² positions on where the scope covers at most
# half of the rows (its share of the einsum's products is r / H).
_AUTO_ROWS_MIN_POSITIONS = 48**2
_MASK_FILL = -1e30


def position_embedding_shape(
    spatial_shape: Sequence[int], scope: int | None, dim_k: int, dim_u: int
) -> tuple[int, ...]:
    """Shape of the relative position table R for inputs of ``spatial_shape``.

    Local scope r: ``[r, r, |k|, |u|]`` for images (``[r, |k|, |u|]`` for sequences). Global scope
    (``scope=None``): ``[2H - 1, 2W - 1, |k|, |u|]``, every relative offset of the input.
    """
    if scope is None:
        sides = tuple(2 * s - 1 for s in spatial_shape)
    else:
        _check_scope(scope)
        sides = (scope,) * len(spatial_shape)
    return (*sides, dim_k, dim_u)


def causal_mask(n: int) -> np.ndarray:
    """Auto-regressive context mask [n, m]: position n sees the context positions m <= n."""
    return np.tril(np.ones((n, n), dtype=bool))


def _offset_one_hot(size: int, side: int) -> np.ndarray:
    """[size, size, side]: 1 where offset m - n (+ side // 2) of positions n, m is entry s."""
    pos = np.arange(size)
    offset = pos[None, :] - pos[:, None] + side // 2  # [n, m]
    return (offset[..., None] == np.arange(side)).astype(np.float32)


def gather_position_embeddings(table: jax.Array, spatial_shape: Sequence[int]) -> jax.Array:
    """Re-index a relative table R [*sides, |k|, |u|] into E [n, m, |k|, |u|] with E_nm = R[m - n].

    Entries whose offset m - n falls outside the table (outside the scope) are zero. The
    re-indexing is one small one-hot matrix product per spatial axis (offsets along H, then
    along W) rather than a gather: its gradient is a matrix product too, where the gather's
    would be a scatter-add with n·m updates into r² entries.
    """
    sides = table.shape[: len(spatial_shape)]
    one_hots = [
        jnp.asarray(_offset_one_hot(size, side), table.dtype)
        for size, side in zip(spatial_shape, sides, strict=True)
    ]
    if len(spatial_shape) == 1:
        embeddings = jnp.einsum("nms,sku->nmku", one_hots[0], table)
    elif len(spatial_shape) == 2:
        rows = jnp.einsum("ias,stku->iatku", one_hots[0], table)  # [H, H, side_W, |k|, |u|]
        embeddings = jnp.einsum("jbt,iatku->ijabku", one_hots[1], rows)
    else:
        raise ValueError(f"position embeddings support 1-D or 2-D inputs, got {spatial_shape}")
    n = math.prod(spatial_shape)
    return embeddings.reshape(n, n, *table.shape[-2:])


def _check_scope(scope: int) -> None:
    if not isinstance(scope, int) or scope <= 0 or scope % 2 == 0:
        raise ValueError(
            f"scope_size must be a positive odd integer (the side r of an r x r local context, "
            f"centred on the query), got {scope!r}; use e.g. scope_size=23 or 7, or "
            "scope_size=None for a global scope."
        )


def _causal_offsets(sides: Sequence[int]) -> np.ndarray:
    """Boolean [*sides]: relative offsets m - n that precede or equal n in raster order."""
    centre = np.array([side // 2 for side in sides]).reshape(-1, *([1] * len(sides)))
    offsets = np.indices(sides) - centre
    keep, decided = np.zeros(sides, bool), np.zeros(sides, bool)
    for offset in offsets:  # lexicographic: the first non-zero axis decides
        keep |= ~decided & (offset < 0)
        decided |= offset != 0
    return keep | ~decided


def _qkv_init(d_in: int, num_q: int, dim_k: int):
    """Fan-in init of Appendix E.1 [R]: W_Q ~ N(0, (|k| d)^-1/2), W_K and W_V ~ N(0, d^-1/2)."""

    def init(key, shape, dtype=jnp.float32):
        std = np.full(shape[-1], d_in**-0.5, dtype=np.float32)
        std[:num_q] = (dim_k * d_in) ** -0.5
        return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)

    return init


def _normalize_keys(keys: jax.Array, key_norm: str, axes: str, mask: jax.Array | None) -> jax.Array:
    """Normalise keys over the context positions m (and |u| if ``axes == "mu"``), in float32.

    keys: [b, m, g, |u|, |k|]. Without a mask returns the same shape. With a context mask
    [n, m] the normalisation uses only the positions inside each context and returns
    [b, n, m, g, |u|, |k|] (one set of normalised keys per query position, Appendix B.2).
    """
    keys = keys.astype(jnp.float32)
    reduce_axes = (-4, -2) if axes == "mu" else (-4,)  # m (and u), counted from the end
    if mask is not None:
        keep = mask[None, :, :, None, None, None]
        keys = keys[:, None]
    if key_norm == "softmax":
        if mask is not None:
            keys = jnp.where(keep, keys, _MASK_FILL)
        keys = jnp.exp(keys - jax.lax.stop_gradient(keys.max(reduce_axes, keepdims=True)))
        if mask is not None:
            keys = keys * keep
        return keys / jnp.maximum(keys.sum(reduce_axes, keepdims=True), 1e-30)
    if mask is not None:
        keys = keys * keep
    if key_norm == "l2":
        norm = jnp.sqrt(jnp.sum(keys * keys, axis=reduce_axes, keepdims=True))
        return keys / jnp.maximum(norm, 1e-6)
    return keys


def _apply_lambdas(queries: jax.Array, lambdas: jax.Array) -> jax.Array:
    """y = λᵀq for every position: queries [..., j, |k|], lambdas [..., |k|, |v|] -> [..., j, |v|].

    One multiply-reduce over |k| in float32, which XLA fuses into a single pass over the
    lambdas in whatever layout their producer left. As a batched matrix product (b·n products of
    [j, |k|] x [|k|, |v|]) the lambdas were first transposed to put b and n major: on an H100
    (batch 128, |h| = 4, |k| = 16, λ^p first) the layer's forward+backward at 28x28x128 went from
    1.16 to 0.84 ms, and the all-lambda ResNet-50's inference rose 1.26x.
    """
    product = queries[..., :, :, None].astype(jnp.float32) * lambdas[..., None, :, :]
    return jnp.sum(product, axis=-2).astype(queries.dtype)


def _reachable_offsets(side: int, size: int) -> slice:
    """The entries of a table axis of ``side`` offsets that an input of ``size`` can reach.

    A scope wider than the input only adds zeros: offsets beyond ±(size - 1) are cropped.
    """
    centre = side // 2
    return slice(max(centre - (size - 1), 0), centre + min(size, centre + 1))


def _lambda_conv(values: jax.Array, table: jax.Array, spatial_shape: Sequence[int]) -> jax.Array:
    """Position lambdas by the lambda convolution (Appendix B.1), linear in memory in n.

    values: [b, *spatial, g, |u|, |v|]; table: [*sides, |k|, |u|].
    Each value channel is one image of a batch of b·g·|v| images with |u| channels, convolved with
    the kernel [*sides, |u|, |k|] (cross-correlation with centred padding, so that output n sums
    R[m - n] v_m). Returns position lambdas [b, g, |v|, n, |k|].
    """
    ndim = len(spatial_shape)
    crop = tuple(
        _reachable_offsets(side, s)
        for side, s in zip(table.shape[:ndim], spatial_shape, strict=True)
    )
    kernel = jnp.swapaxes(table[crop], -1, -2)  # [*sides', |u|, |k|]
    b, g, u, v = values.shape[0], values.shape[-3], values.shape[-2], values.shape[-1]
    spatial_axes = tuple(range(1, 1 + ndim))
    x = jnp.transpose(values, (0, ndim + 1, ndim + 3, *spatial_axes, ndim + 2))
    x = x.reshape(b * g * v, *spatial_shape, u)
    spatial = "HW"[:ndim] if ndim <= 2 else None
    if spatial is None:
        raise ValueError(f"the lambda convolution supports 1-D or 2-D inputs, got {ndim}-D")
    out = jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=(1,) * ndim,
        padding=[(k // 2, k // 2) for k in kernel.shape[:ndim]],
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
    )
    return out.reshape(b, g, v, math.prod(spatial_shape), out.shape[-1])


def _lambda_row_conv(values: jax.Array, table: jax.Array, spatial_shape: Sequence[int]):
    """Position lambdas by a 1-D convolution along the rows of an image (``impl="rows"``).

    values: [b, H, W, g, |u|, |v|]; table: [r_H, r_W, |k|, |u|].
    Each value channel is one sequence of H rows of a batch of b·g·|v|, with the W·|u| entries of
    a row as channels. The kernel tap of row offset t maps them to the W·|k| query columns
    through E restricted to that offset: kernel[t, (c, u), (j, k)] = R[t, c - j + r_W // 2, k, u]
    (zero outside the table), so output row i sums R[m - n] v_m over the context rows
    i - r_H // 2 ... i + r_H // 2. Returns position lambdas [b, g, |v|, n, |k|].
    """
    if len(spatial_shape) != 2:
        raise ValueError(f"impl='rows' needs images, got spatial shape {spatial_shape}")
    height, width = spatial_shape
    table = table[_reachable_offsets(table.shape[0], height)]
    one_hot = jnp.asarray(_offset_one_hot(width, table.shape[1]), table.dtype)  # [W, W, r_W]
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


class LambdaLayer(nn.Module):
    """Multi-query lambda layer (Bello 2021, §3) on images or sequences.

    Input ``x``: [b, H, W, d] (images) or [b, n, d] (sequences); output: [b, H, W, d_out] or
    [b, n, d_out], with output channel index ``h·|v| + v`` (heads before values, Figure 3).

    Internally: queries [b, n, |h|, |k|]; keys [b, m, |u|, |k|]; values [b, m, |u|, |v|];
    content lambda λ^c [b, |k|, |v|]; position lambdas λ^p [b, n, |k|, |v|] (materialised only
    when that is the cheaper contraction order, otherwise q·E [b, n, |h|, m, |u|] is formed).
    With ``multi_head=True`` (Appendix B.3) keys and values are split into |h| heads, each
    with its own lambda, and |v| = d_out / |h| per head (|u| must be 1).

    Parameters (names are stable: checkpoints and weight converters depend on them):
      ``qkv``  1x1 projection without bias (biased when BatchNorm is folded into it), kernel
               [d, |h||k| + |k||u| + |v||u|] (columns: queries (h, k), keys (u, k), values (u, v));
      ``norm_q``, ``norm_v``  BatchNorm over the |h||k| query and |v||u| value channels;
      ``rel_embeddings``  relative table R, see `position_embedding_shape` (absent when the
               caller passes shared ``embeddings``);
      ``position_bias``  [|k|], only with ``position_bias=True``.

    Attributes:
      dim_out: d_out (default: the input's d); must be divisible by ``heads``.
      dim_k: |k|, query/key depth (paper default 16).
      heads: |h|, number of queries (paper default 4).
      dim_u: |u|, intra-depth (paper default 1).
      scope_size: odd side r of the local position context, or None for a global scope.
      impl: "einsum", "conv" (lambda convolution), "rows" (row convolution; images, no mask)
        or "auto" (the paper's rule, einsum or conv, with rows for large images; see the module
        docstring).
      multi_head: the multi-head variant of Appendix B.3 instead of multi-query.
      key_norm: "softmax" (over m), "l2" (over m) or "none".
      key_softmax_axes: "m" or "mu": the axes the key softmax runs over when |u| > 1 [R].
      norm_qv: BatchNorm on queries and values.
      content: include the content lambda λ^c.
      position: include the position lambdas λ^p_n.
      causal: mask the context to positions m <= n (sequences, Appendix B.2).
      position_bias: add a learnt bias b_k to every position lambda (λ^p_n[k, v] + b_k), as the
        biased Conv3d of timm's lambda convolution does; not in the paper, off by default (for
        weights converted from timm).
      position_contraction: order of the einsum position term: "lambdas" forms the position
        lambdas λ^p [b, n, |k|, |v|] then applies the queries (Figure 3); "scores" forms
        q·E [b, n, |h|, m, |u|] then contracts with the values; "auto" takes the order with the
        smaller intermediate (memory traffic, not FLOPs, bounds both on a GPU; the timings
        behind the rule are in results/lambda_layer.md). Same result either way.
      embedding_init_std: std of the normal init of the relative embeddings E (E.1: 1 [R]).
      batch_norm_folded: the variables come from `lambdanet.models.fold_batch_norm` (inference
        only): ``norm_q`` and ``norm_v`` are folded into the columns of ``qkv`` (which then has
        a bias when ``norm_qv``), and the layer runs no BatchNorm.
      dtype: compute dtype (e.g. bfloat16); key normalisation and BatchNorm statistics stay
        in float32.
      param_dtype: parameter dtype.
    """

    dim_out: int | None = None
    dim_k: int = 16
    heads: int = 4
    dim_u: int = 1
    scope_size: int | None = 23
    impl: str = "auto"
    multi_head: bool = False
    key_norm: str = "softmax"
    key_softmax_axes: str = "m"
    norm_qv: bool = True
    content: bool = True
    position: bool = True
    causal: bool = False
    position_bias: bool = False
    position_contraction: str = "auto"
    embedding_init_std: float = 1.0
    batch_norm_folded: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    def _check_config(self, x: jax.Array, d_out: int) -> None:
        if x.ndim not in (3, 4):
            raise ValueError(
                f"LambdaLayer expects images [b, H, W, d] or sequences [b, n, d], got an input "
                f"of shape {x.shape} (rank {x.ndim}); reshape it to one of those layouts."
            )
        if self.heads <= 0 or d_out % self.heads:
            raise ValueError(
                f"heads={self.heads} must divide the output width d={d_out} (|v| = d / |h|); "
                f"choose heads among the divisors of {d_out}, e.g. 4."
            )
        if min(self.dim_k, self.dim_u) <= 0:
            raise ValueError(f"dim_k and dim_u must be positive, got {self.dim_k}, {self.dim_u}")
        if self.impl not in IMPLS:
            raise ValueError(f"unknown impl {self.impl!r}; choose one of {IMPLS}")
        if self.key_norm not in KEY_NORMS:
            raise ValueError(f"unknown key_norm {self.key_norm!r}; choose one of {KEY_NORMS}")
        if self.position_contraction not in CONTRACTIONS:
            raise ValueError(
                f"unknown position_contraction {self.position_contraction!r}; choose one of "
                f"{CONTRACTIONS}"
            )
        if self.key_softmax_axes not in KEY_SOFTMAX_AXES:
            raise ValueError(
                f"unknown key_softmax_axes {self.key_softmax_axes!r}; choose one of "
                f"{KEY_SOFTMAX_AXES}"
            )
        if self.scope_size is not None:
            _check_scope(self.scope_size)
        if not (self.content or self.position):
            raise ValueError("content=False and position=False leaves nothing to compute")
        if self.multi_head and self.dim_u != 1:
            raise ValueError("multi_head=True supports dim_u=1 only; set dim_u=1")
        if self.impl == "rows" and (x.ndim != 4 or self.causal):
            raise ValueError(
                "impl='rows' convolves the rows of images [b, H, W, d] and takes no mask; use "
                "impl='einsum' (or 'conv') for sequences or masks"
            )

    def _resolve_impl(self, spatial: tuple[int, ...], masked: bool) -> str:
        n = math.prod(spatial)
        if self.impl != "auto":
            return self.impl
        if masked and not self.causal:
            return "einsum"
        if (
            len(spatial) == 2
            and not masked
            and self.dim_u == 1
            and self.scope_size is not None
            and 2 * self.scope_size <= spatial[0]
            and _AUTO_ROWS_MIN_POSITIONS <= n <= _AUTO_CONV_MIN_POSITIONS
        ):
            return "rows"
        return "conv" if (n > _AUTO_CONV_MIN_POSITIONS or self.dim_u > 1) else "einsum"

    def _context_mask(self, mask, n: int) -> jax.Array | None:
        if mask is not None:
            mask = jnp.asarray(mask)
            if mask.shape != (n, n):
                raise ValueError(
                    f"mask must have shape [n, m] = [{n}, {n}] (query positions x context "
                    f"positions, shared across the batch), got {mask.shape}"
                )
            mask = mask.astype(bool)
        if self.causal:
            causal = jnp.asarray(causal_mask(n))
            mask = causal if mask is None else mask & causal
        return mask

    @nn.compact
    def __call__(self, x, *, train: bool = False, embeddings=None, mask=None):
        """Applies the layer.

        Args:
          x: [b, H, W, d] or [b, n, d].
          train: BatchNorm uses batch statistics (and updates ``batch_stats``) when True.
          embeddings: optional shared relative table of shape `position_embedding_shape`
            (Table 4 "shared embeddings"); the layer then creates no table of its own.
          mask: optional context mask [n, m] (bool, shared across the batch): query n only sees
            context positions m with ``mask[n, m]`` (Appendix B.2).
        Returns:
          [b, H, W, d_out] or [b, n, d_out] in ``dtype``.
        """
        d_out = self.dim_out or x.shape[-1]
        self._check_config(x, d_out)
        if train and self.batch_norm_folded:
            raise ValueError(
                "a LambdaLayer with batch_norm_folded=True is for inference (train=False); train "
                "the unfolded layer and fold it with lambdanet.models.fold_batch_norm"
            )
        b, spatial, d_in = x.shape[0], tuple(x.shape[1:-1]), x.shape[-1]
        n = math.prod(spatial)
        k, h, u = self.dim_k, self.heads, self.dim_u
        v = d_out // h
        g = h if self.multi_head else 1  # groups of keys/values: one lambda per group
        mask = self._context_mask(mask, n)
        impl = self._resolve_impl(spatial, mask is not None)
        if impl == "conv" and mask is not None and not self.causal:
            raise ValueError(
                "impl='conv' supports causal masks only (the mask must be translation "
                "invariant); use impl='einsum' for an arbitrary context mask"
            )
        if self.impl == "rows" and mask is not None:
            raise ValueError(
                f"impl={self.impl!r} takes no mask; use impl='einsum' for masked contexts"
            )

        num_q, num_k, num_v = h * k, g * u * k, g * u * v
        qkv = nn.Dense(
            num_q + num_k + num_v,
            use_bias=self.batch_norm_folded and self.norm_qv,
            kernel_init=_qkv_init(d_in, num_q, k),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="qkv",
        )(x)
        queries, keys, values = jnp.split(qkv, [num_q, num_q + num_k], axis=-1)
        if self.norm_qv and not self.batch_norm_folded:
            queries = self._batch_norm(queries, train, "norm_q")
            values = self._batch_norm(values, train, "norm_v")
        queries = queries.reshape(b, n, g, h // g, k)  # [b, n, g, j, |k|], j queries per group
        keys = keys.reshape(b, n, g, u, k)  # [b, m, g, |u|, |k|]
        values = values.reshape(b, n, g, u, v)  # [b, m, g, |u|, |v|]

        out = jnp.zeros((b, n, g, h // g, v), self.dtype)
        if self.content:
            out = out + self._content_output(queries, keys, values, mask)
        if self.position:
            table = self._position_table(embeddings, spatial)
            if impl in ("conv", "rows"):
                if mask is not None:  # causal: drop the offsets m - n > 0 from the kernel
                    keep = _causal_offsets(table.shape[: len(spatial)])
                    table = table * jnp.asarray(keep, table.dtype)[..., None, None]
                position_lambdas = _lambda_conv if impl == "conv" else _lambda_row_conv
                lambdas = position_lambdas(values.reshape(b, *spatial, g, u, v), table, spatial)
                lambdas = jnp.transpose(lambdas, (0, 3, 1, 4, 2))  # [b, n, g, |k|, |v|]
                out = out + _apply_lambdas(queries, lambdas)
            else:
                out = out + self._position_output_einsum(queries, values, table, spatial, mask)
            if self.position_bias:
                bias = self.param("position_bias", nn.initializers.zeros, (k,), self.param_dtype)
                bias = jnp.einsum("bngjk,k->bngj", queries, bias.astype(self.dtype))
                out = out + bias[..., None]
        return out.reshape(b, *spatial, h * v).astype(self.dtype)

    def _batch_norm(self, x: jax.Array, train: bool, name: str) -> jax.Array:
        """BatchNorm in the compute dtype, with its statistics reduced in float32."""
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            force_float32_reductions=True,
            name=name,
        )(x)

    def _position_table(self, embeddings, spatial: tuple[int, ...]) -> jax.Array:
        shape = position_embedding_shape(spatial, self.scope_size, self.dim_k, self.dim_u)
        if embeddings is None:
            embeddings = self.param(
                "rel_embeddings",
                nn.initializers.normal(self.embedding_init_std),
                shape,
                self.param_dtype,
            )
        elif tuple(embeddings.shape) != shape:
            raise ValueError(
                f"shared embeddings have shape {tuple(embeddings.shape)}, but this layer needs "
                f"{shape} (position_embedding_shape({spatial}, scope_size={self.scope_size}, "
                f"dim_k={self.dim_k}, dim_u={self.dim_u}))"
            )
        return jnp.asarray(embeddings, self.dtype)

    def _content_output(self, queries, keys, values, mask) -> jax.Array:
        """λ^c = K̄ᵀV [b, g, |k|, |v|] applied to the queries: [b, n, g, j, |v|]."""
        keys = _normalize_keys(keys, self.key_norm, self.key_softmax_axes, mask)
        keys = keys.astype(self.dtype)
        if mask is None:
            content_lambda = jnp.einsum("bmguk,bmguv->bgkv", keys, values)
            return jnp.einsum("bngjk,bgkv->bngjv", queries, content_lambda)
        # One content lambda per query position (Appendix B.2), never materialised.
        scores = jnp.einsum("bngjk,bnmguk->bngjmu", queries, keys)
        return jnp.einsum("bngjmu,bmguv->bngjv", scores, values)

    def _use_scores(self, g: int, j: int, k: int, m: int, u: int, v: int) -> bool:
        """Whether to contract q·E first: compares the intermediates per (b, n)."""
        if self.position_contraction != "auto":
            return self.position_contraction == "scores"
        return g * j * m * u < g * k * v  # q·E [g, j, m, |u|] vs λ^p [g, |k|, |v|]

    def _position_output_einsum(self, queries, values, table, spatial, mask) -> jax.Array:
        """Σ_m (q_n E_nm) v_m in one of two contraction orders (``position_contraction``).

        Either the paper's order, position lambdas λ^p [b, n, g, |k|, |v|] then queries, or
        q·E [b, n, g, j, m, |u|] then values (never forming [b, n, |k|, |v|]).
        """
        embeddings = gather_position_embeddings(table, spatial)  # [n, m, |k|, |u|]
        if mask is not None:
            embeddings = embeddings * mask[:, :, None, None].astype(embeddings.dtype)
        g, j, k = queries.shape[2:]
        m, u, v = values.shape[1], values.shape[3], values.shape[4]
        if not self._use_scores(g, j, k, m, u, v):
            # one GEMM [(n, |k|), (m, |u|)] x [(m, |u|), (b, g, |v|)] in its natural layout
            lambdas = jnp.einsum("nmku,bmguv->nkbgv", embeddings, values)
            lambdas = jnp.transpose(lambdas, (2, 0, 3, 1, 4))  # [b, n, g, |k|, |v|]
            return _apply_lambdas(queries, lambdas)
        scores = jnp.einsum("bngjk,nmku->bngjmu", queries, embeddings)
        return jnp.einsum("bngjmu,bmguv->bngjv", scores, values)
