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

What is implemented:
  * content lambda and position lambdas, each switchable (the ablations of Appendix D.1 (b));
  * local scope r x r (default 23, §4.1) or global scope (the table covers every offset);
  * the position lambdas three ways, identical outputs for identical parameters (``impl``):
    ``einsum`` E gathered into [n, m, |k|, |u|] (Figure 3, here); ``conv`` the lambda
    convolution (Appendix B.1) and ``rows`` a row convolution (images, no mask), both in
    `lambdanet.layers.position_lambdas`; ``auto`` picks one (`LambdaLayer._resolve_impl`);
  * intra-depth |u| (Appendix B.4); multi-query (default) or multi-head (Appendix B.3);
  * BatchNorm on queries and values (switchable); key normalisation softmax / l2 / none;
  * shared position embeddings (the caller owns the table and passes ``embeddings=``);
  * masked contexts (Appendix B.2): a [n, m] mask shared across the batch, or causal masking.

Unconfirmed choices [R], exposed as options or flagged in the code: with |u| > 1 the key softmax
runs over m only, one softmax per (|u|, |k|) channel like lucidrains (``key_softmax_axes="m"``),
or over (m, |u|) (``"mu"``); the initialisation of Appendix E.1 (embeddings N(0, 1), W_K and W_V
with std d^-1/2, W_Q with std (|k| d)^-1/2), the embeddings' std being an option
(``embedding_init_std``); ``auto``'s rule, which reads Appendix E.1 as "conv when n > 85² or
|u| > 1". results/lambda_layer.md has the measurements behind the choices the paper does
not make.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lambdanet.layers.position_lambdas import POSITION_LAMBDAS, causal_offsets, offset_one_hot

IMPLS = ("einsum", "conv", "rows", "auto")
KEY_NORMS = ("softmax", "l2", "none")
KEY_SOFTMAX_AXES = ("m", "mu")
# `impl="auto"`: the lambda convolution when n > 85² (Appendix E.1, unconfirmed [R]) or |u| > 1;
# the row convolution from 48² positions on where the scope spans at most half of the rows
# (measured faster there: results/lambda_layer.md); the einsum otherwise.
_AUTO_CONV_MIN_POSITIONS = 85**2
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


def gather_position_embeddings(table: jax.Array, spatial_shape: Sequence[int]) -> jax.Array:
    """Re-index a relative table R [*sides, |k|, |u|] into E [n, m, |k|, |u|] with E_nm = R[m - n].

    Entries whose offset m - n falls outside the table (outside the scope) are zero. The
    re-indexing is one small one-hot matrix product per spatial axis (offsets along H, then
    along W) rather than a gather: its gradient is a matrix product too, where the gather's
    would be a scatter-add with n·m updates into r² entries.
    """
    sides = table.shape[: len(spatial_shape)]
    one_hots = [
        jnp.asarray(offset_one_hot(size, side), table.dtype)
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


def _position_output_einsum(queries, values, table, spatial, mask, *, scores_first: bool):
    """Σ_m (q_n E_nm) v_m with E gathered (Figure 3): [b, n, g, j, |v|].

    queries [b, n, g, j, |k|]; values [b, m, g, |u|, |v|]; table R [*sides, |k|, |u|]; mask
    [n, m] or None; g = 1 (multi-query, j = |h|) or |h| (multi-head, j = 1). Two contraction
    orders, same result: the paper's, position lambdas λ^p [b, n, g, |k|, |v|] then the queries
    (``scores_first=False``), or q·E [b, n, g, j, m, |u|] then the values. The layer takes
    `_scores_first`'s choice.
    """
    embeddings = gather_position_embeddings(table, spatial)  # [n, m, |k|, |u|]
    if mask is not None:
        embeddings = embeddings * mask[:, :, None, None].astype(embeddings.dtype)
    if not scores_first:
        # one GEMM [(n, |k|), (m, |u|)] x [(m, |u|), (b, g, |v|)] in its natural layout
        lambdas = jnp.einsum("nmku,bmguv->nkbgv", embeddings, values)
        lambdas = jnp.transpose(lambdas, (2, 0, 3, 1, 4))  # [b, n, g, |k|, |v|]
        return _apply_lambdas(queries, lambdas)
    scores = jnp.einsum("bngjk,nmku->bngjmu", queries, embeddings)
    return jnp.einsum("bngjmu,bmguv->bngjv", scores, values)


def _scores_first(g: int, j: int, k: int, m: int, u: int, v: int) -> bool:
    """Contract q·E first when its intermediate per (b, n), [g, j, m, |u|], is the smaller one
    (against λ^p [g, |k|, |v|]); measured faster there: results/lambda_layer.md."""
    return g * j * m * u < g * k * v


def _apply_lambdas(queries: jax.Array, lambdas: jax.Array) -> jax.Array:
    """y = λᵀq for every position: queries [..., j, |k|], lambdas [..., |k|, |v|] -> [..., j, |v|].

    One multiply-reduce over |k| in float32, which XLA fuses into a single pass over the lambdas
    in whatever layout their producer left (rather than a batched matrix product, for which the
    lambdas would first be transposed; results/lambda_layer.md).
    """
    product = queries[..., :, :, None].astype(jnp.float32) * lambdas[..., None, :, :]
    return jnp.sum(product, axis=-2).astype(queries.dtype)


class LambdaLayer(nn.Module):
    """Multi-query lambda layer (Bello 2021, §3) on images or sequences.

    Input ``x``: [b, H, W, d] (images) or [b, n, d] (sequences); output: [b, H, W, d_out] or
    [b, n, d_out], with output channel index ``h·|v| + v`` (heads before values, Figure 3).

    Internally: queries [b, n, |h|, |k|]; keys [b, m, |u|, |k|]; values [b, m, |u|, |v|];
    content lambda λ^c [b, |k|, |v|]; position lambdas λ^p [b, n, |k|, |v|] (the einsum forms
    q·E [b, n, |h|, m, |u|] instead where that intermediate is smaller).
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
      impl: "einsum" (Figure 3), "conv" (lambda convolution, Appendix B.1), "rows" (row
        convolution; images, no mask) or "auto" (see `_resolve_impl`).
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
    embedding_init_std: float = 1.0
    batch_norm_folded: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

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
        self._validate(x, train=train, embeddings=embeddings, mask=mask)
        d_out = self.dim_out or x.shape[-1]
        b, spatial, d_in = x.shape[0], tuple(x.shape[1:-1]), x.shape[-1]
        n = math.prod(spatial)
        k, h, u = self.dim_k, self.heads, self.dim_u
        v = d_out // h
        g = h if self.multi_head else 1  # groups of keys/values: one lambda per group
        impl = self._resolve_impl(spatial, masked=mask is not None)
        mask = self._context_mask(mask, n)

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
            out = out + self._position_output(impl, queries, values, table, spatial, mask)
            if self.position_bias:
                bias = self.param("position_bias", nn.initializers.zeros, (k,), self.param_dtype)
                bias = jnp.einsum("bngjk,k->bngj", queries, bias.astype(self.dtype))
                out = out + bias[..., None]
        return out.reshape(b, *spatial, h * v).astype(self.dtype)

    def _position_output(self, impl, queries, values, table, spatial, mask) -> jax.Array:
        """Σ_m (q_n E_nm) v_m: [b, n, g, j, |v|], by ``impl`` (resolved, not "auto")."""
        if impl == "einsum":  # Figure 3
            g, j, k = queries.shape[2:]
            m, u, v = values.shape[1], values.shape[3], values.shape[4]
            scores_first = _scores_first(g, j, k, m, u, v)
            return _position_output_einsum(
                queries, values, table, spatial, mask, scores_first=scores_first
            )
        if self.causal:  # the only mask these take: drop the offsets m - n > 0 from the kernel
            keep = causal_offsets(table.shape[: len(spatial)])
            table = table * jnp.asarray(keep, table.dtype)[..., None, None]
        b, _, g, u, v = values.shape
        lambdas = POSITION_LAMBDAS[impl](values.reshape(b, *spatial, g, u, v), table, spatial)
        lambdas = jnp.transpose(lambdas, (0, 3, 1, 4, 2))  # [b, n, g, |k|, |v|]
        return _apply_lambdas(queries, lambdas)

    def _resolve_impl(self, spatial: tuple[int, ...], masked: bool) -> str:
        """The implementation for inputs of ``spatial`` shape (``masked``: a mask is passed).

        "auto": einsum for an explicit mask (only it takes an arbitrary one); otherwise rows for
        images of 48² to 85² positions whose scope spans at most half of the rows (|u| = 1, not
        causal), conv when n > 85² or |u| > 1, einsum otherwise (constants at the top).
        """
        n = math.prod(spatial)
        if self.impl != "auto":
            return self.impl
        if masked:
            return "einsum"
        if (
            len(spatial) == 2
            and not self.causal
            and self.dim_u == 1
            and self.scope_size is not None
            and 2 * self.scope_size <= spatial[0]
            and _AUTO_ROWS_MIN_POSITIONS <= n <= _AUTO_CONV_MIN_POSITIONS
        ):
            return "rows"
        return "conv" if (n > _AUTO_CONV_MIN_POSITIONS or self.dim_u > 1) else "einsum"

    def __post_init__(self) -> None:
        """Checks the settings when the layer is built (a model checks its layers' settings
        by building one, before anything is traced); a ValueError names the attribute."""
        if self.heads <= 0:
            raise ValueError(f"heads={self.heads} must be positive, e.g. 4")
        if min(self.dim_k, self.dim_u) <= 0:
            raise ValueError(f"dim_k and dim_u must be positive, got {self.dim_k}, {self.dim_u}")
        for name, choices in (
            ("impl", IMPLS),
            ("key_norm", KEY_NORMS),
            ("key_softmax_axes", KEY_SOFTMAX_AXES),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {choices}")
        if self.scope_size is not None:
            _check_scope(self.scope_size)
        if not (self.content or self.position):
            raise ValueError(
                "content=False and position=False leaves nothing to compute; set content=True "
                "or position=True"
            )
        if self.multi_head and self.dim_u != 1:
            raise ValueError("multi_head=True supports dim_u=1 only; set dim_u=1")
        super().__post_init__()

    def _validate(self, x, *, train: bool, embeddings, mask) -> None:
        """The checks of the inputs against the settings; a ValueError names what to change."""
        if x.ndim not in (3, 4):
            raise ValueError(
                f"LambdaLayer expects images [b, H, W, d] or sequences [b, n, d], got an input "
                f"of shape {x.shape} (rank {x.ndim}); reshape it to one of those layouts."
            )
        d_out = self.dim_out or x.shape[-1]
        if d_out % self.heads:
            raise ValueError(
                f"heads={self.heads} must divide the output width d={d_out} (|v| = d / |h|); "
                f"choose heads among the divisors of {d_out}, e.g. 4."
            )
        if self.impl == "rows" and (x.ndim != 4 or self.causal):
            raise ValueError(
                "impl='rows' convolves the rows of images [b, H, W, d] and takes no mask; use "
                "impl='einsum' (or 'conv') for sequences or masks"
            )
        if train and self.batch_norm_folded:
            raise ValueError(
                "a LambdaLayer with batch_norm_folded=True is for inference (train=False); train "
                "the unfolded layer and fold it with lambdanet.models.fold_batch_norm"
            )
        spatial = tuple(x.shape[1:-1])
        n = math.prod(spatial)
        if mask is not None:
            if np.shape(mask) != (n, n):
                raise ValueError(
                    f"mask must have shape [n, m] = [{n}, {n}] (query positions x context "
                    f"positions, shared across the batch), got {np.shape(mask)}"
                )
            if self.impl == "conv":  # also with causal=True: the convolution would drop it
                raise ValueError(
                    "impl='conv' supports causal masks only (causal=True, the mask must be "
                    "translation invariant) and takes no mask=; use impl='einsum' for an "
                    "arbitrary context mask"
                )
            if self.impl == "rows":
                raise ValueError("impl='rows' takes no mask; use impl='einsum' for masked contexts")
        if self.position and embeddings is not None:
            shape = position_embedding_shape(spatial, self.scope_size, self.dim_k, self.dim_u)
            if tuple(embeddings.shape) != shape:
                raise ValueError(
                    f"shared embeddings have shape {tuple(embeddings.shape)}, but this layer "
                    f"needs {shape} (position_embedding_shape({spatial}, scope_size="
                    f"{self.scope_size}, dim_k={self.dim_k}, dim_u={self.dim_u}))"
                )

    def _context_mask(self, mask, n: int) -> jax.Array | None:
        """The [n, m] context mask: ``mask`` (bool), and m <= n when ``causal``; None if neither."""
        if mask is not None:
            mask = jnp.asarray(mask).astype(bool)
        if self.causal:
            causal = jnp.asarray(causal_mask(n))
            mask = causal if mask is None else mask & causal
        return mask

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
        """The relative table R: the shared ``embeddings`` if given, else ``rel_embeddings``."""
        if embeddings is None:
            shape = position_embedding_shape(spatial, self.scope_size, self.dim_k, self.dim_u)
            embeddings = self.param(
                "rel_embeddings",
                nn.initializers.normal(self.embedding_init_std),
                shape,
                self.param_dtype,
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


def _check_scope(scope: int) -> None:
    if not isinstance(scope, int) or scope <= 0 or scope % 2 == 0:
        raise ValueError(
            f"scope_size must be a positive odd integer (the side r of an r x r local context, "
            f"centred on the query), got {scope!r}; use e.g. scope_size=23 or 7, or "
            "scope_size=None for a global scope."
        )


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
