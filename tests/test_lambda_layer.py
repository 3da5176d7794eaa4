"""LambdaLayer against a naive numpy reference written from the paper's equations (§3, Figure 3).

For every query position n:  λ_n = Σ_m (softmax(K)_m + e_nm) v_mᵀ,   y_n = concat_h(λ_nᵀ q_n^h).
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lambdanet.layers import LambdaLayer, causal_mask, position_embedding_shape
from lambdanet.layers.lambda_layer import _position_output_einsum, _scores_first

EPS = 1e-5


def _batch_norm_eval(x, params, stats):
    return (x - stats["mean"]) / np.sqrt(stats["var"] + EPS) * params["scale"] + params["bias"]


def _naive_embeddings(table, spatial):
    """E [n, m, |k|, |u|] with E[n, m] = R[m - n], zero outside the scope, by looping."""
    n_pos, sides = math.prod(spatial), table.shape[: len(spatial)]
    positions = list(itertools.product(*[range(s) for s in spatial]))
    e = np.zeros((n_pos, n_pos, *table.shape[-2:]))
    for n, m in itertools.product(range(n_pos), range(n_pos)):
        offset = [
            pm - pn + s // 2 for pm, pn, s in zip(positions[m], positions[n], sides, strict=True)
        ]
        if all(0 <= o < s for o, s in zip(offset, sides, strict=True)):
            e[n, m] = table[tuple(offset)]
    return e


def naive_lambda_layer(variables, x, layer: LambdaLayer, mask=None):
    """Loops over batch, query n, context m, straight from the paper (eval-mode BatchNorm)."""
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    stats = jax.tree.map(lambda a: np.asarray(a, np.float64), variables.get("batch_stats", {}))
    x = np.asarray(x, np.float64)
    b, spatial, d = x.shape[0], x.shape[1:-1], x.shape[-1]
    n_pos = math.prod(spatial)
    k, h, u = layer.dim_k, layer.heads, layer.dim_u
    d_out = layer.dim_out or d
    v = d_out // h
    g = h if layer.multi_head else 1
    qkv = x.reshape(b, n_pos, d) @ params["qkv"]["kernel"]
    q, keys, values = np.split(qkv, [h * k, h * k + g * u * k], axis=-1)
    if layer.norm_qv:
        q = _batch_norm_eval(q, params["norm_q"], stats["norm_q"])
        values = _batch_norm_eval(values, params["norm_v"], stats["norm_v"])
    q = q.reshape(b, n_pos, h, k)
    keys = keys.reshape(b, n_pos, g, u, k)
    values = values.reshape(b, n_pos, g, u, v)
    if mask is None:
        mask = np.ones((n_pos, n_pos), bool)
    bias = params["position_bias"] if layer.position_bias else np.zeros(k)
    table = params["rel_embeddings"] if layer.position else np.zeros((1,) * len(spatial) + (k, u))
    e = _naive_embeddings(table, spatial)
    y = np.zeros((b, n_pos, h * v))
    for bi in range(b):
        for n in range(n_pos):
            ctx = mask[n]  # the context positions m of query n
            kbar = np.zeros((n_pos, g, u, k))
            if ctx.any():
                if layer.key_norm == "softmax":
                    ex = np.exp(keys[bi, ctx] - keys[bi, ctx].max(axis=0))
                    kbar[ctx] = ex / ex.sum(axis=0)
                elif layer.key_norm == "l2":
                    kc = keys[bi, ctx]
                    kbar[ctx] = kc / np.sqrt((kc**2).sum(axis=0))
                else:
                    kbar[ctx] = keys[bi, ctx]
            # λ_n = Σ_m (k̄_m + e_nm) v_mᵀ, summed over the context m and the intra-depth u.
            lam = np.zeros((g, k, v))
            for gi in range(g):
                for m in np.flatnonzero(ctx):
                    term = np.zeros((k, u))
                    if layer.content:
                        term += kbar[m, gi].T
                    if layer.position:
                        term += e[n, m]
                    lam[gi] += term @ values[bi, m, gi]  # [k, u] @ [u, v]
            lam += bias[None, :, None]  # timm's conv bias: λ^p_n[k, v] + b_k
            for hi in range(h):  # y_n = concat_h(λ_nᵀ q_n^h)
                gi = hi if layer.multi_head else 0
                y[bi, n, hi * v : (hi + 1) * v] = lam[gi].T @ q[bi, n, hi]
    return y.reshape(b, *spatial, h * v)


def _random_stats(variables, seed=3):
    """Non-trivial BatchNorm statistics, so that eval-mode normalisation is really checked."""
    rng = np.random.default_rng(seed)
    stats = jax.tree.map(
        lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype),
        variables.get("batch_stats", {}),
    )
    return {**variables, "batch_stats": stats}


def _init(layer, x, seed=0):
    variables = _random_stats(layer.init(jax.random.PRNGKey(seed), x))
    if "position_bias" in variables["params"]:  # zero-initialised: make it non-trivial
        bias = variables["params"]["position_bias"]
        variables["params"]["position_bias"] = bias + jnp.linspace(-1.0, 1.0, bias.shape[0])
    return variables


def _x(shape, seed=1, scale=1.0):
    return jax.random.normal(jax.random.PRNGKey(seed), shape) * scale


CASES = [
    # (spatial, d, dict of layer args)
    ((5, 5), 32, dict(scope_size=None)),  # global scope, |u| = 1
    ((6, 6), 32, dict(scope_size=3)),  # einsum: λ^p materialised (the smaller intermediate)
    ((6, 6), 64, dict(scope_size=5)),  # einsum: q·E, then values
    ((6, 6), 32, dict(scope_size=5, dim_u=2)),
    ((5, 5), 32, dict(scope_size=3, dim_u=4)),  # local scope, |u| = 4
    ((4, 5), 32, dict(scope_size=None, dim_u=4)),  # global scope, |u| = 4, non-square
    ((5, 5), 32, dict(scope_size=3, multi_head=True)),  # Appendix B.3
    ((5, 5), 32, dict(scope_size=3, key_norm="l2")),
    ((5, 5), 32, dict(scope_size=3, key_norm="none", norm_qv=False)),
    ((5, 5), 32, dict(scope_size=3, content=False)),  # position only
    ((5, 5), 32, dict(scope_size=3, position=False)),  # content only
    ((5, 5), 32, dict(scope_size=3, dim_out=48, heads=3)),
    ((12,), 16, dict(scope_size=5, dim_k=8, heads=2)),  # sequence [b, n, d]
    ((5, 5), 32, dict(scope_size=3, position_bias=True)),  # timm's biased lambda convolution
]


def _naive_mu(variables, x, layer):
    """Keys normalised by one softmax over (m, |u|) jointly: [b, m, |u|, |k|]."""
    params = variables["params"]
    b, n_pos = x.shape[0], math.prod(x.shape[1:-1])
    k, h, u = layer.dim_k, layer.heads, layer.dim_u
    keys = np.asarray(x.reshape(b, n_pos, -1) @ params["qkv"]["kernel"])[
        :, :, h * k : h * k + u * k
    ]
    keys = keys.reshape(b, n_pos, u, k)
    e = np.exp(keys - keys.max(axis=(1, 2), keepdims=True))
    return e / e.sum(axis=(1, 2), keepdims=True)


@pytest.mark.parametrize(
    "impl,spatial,d,kwargs",
    [
        (impl, *case)
        for case in CASES
        for impl in ("einsum", "conv", "rows")
        if impl != "rows" or len(case[0]) == 2  # the row convolution is for images
    ],
)
def test_matches_naive_reference(impl, spatial, d, kwargs):
    layer = LambdaLayer(impl=impl, **kwargs)
    x = _x((2, *spatial, d))
    variables = _init(layer, x)
    got = np.asarray(layer.apply(variables, x))
    want = naive_lambda_layer(variables, x, layer)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


@pytest.mark.parametrize("impl", ["einsum", "conv"])
def test_mu_softmax_is_joint_over_context_and_intra_depth(impl):
    """key_softmax_axes="mu": the layer's output equals the reference with joint normalisation."""
    layer = LambdaLayer(impl=impl, scope_size=3, dim_u=2, key_softmax_axes="mu", position=False)
    x = _x((2, 4, 4, 32))
    variables = _init(layer, x)
    got = np.asarray(layer.apply(variables, x))
    params = jax.tree.map(np.asarray, variables["params"])
    stats = jax.tree.map(np.asarray, variables["batch_stats"])
    b, n_pos, k, h, u, v = 2, 16, 16, 4, 2, 8
    qkv = np.asarray(x).reshape(b, n_pos, -1) @ params["qkv"]["kernel"]
    q = _batch_norm_eval(qkv[..., : h * k], params["norm_q"], stats["norm_q"])
    vals = _batch_norm_eval(qkv[..., h * k + u * k :], params["norm_v"], stats["norm_v"])
    kbar = _naive_mu(variables, x, layer)  # [b, m, u, k]
    lam = np.einsum("bmuk,bmuv->bkv", kbar, vals.reshape(b, n_pos, u, v))
    want = np.einsum("bnhk,bkv->bnhv", q.reshape(b, n_pos, h, k), lam).reshape(got.shape)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize(
    "kwargs",
    [dict(scope_size=None), dict(scope_size=5), dict(scope_size=3, dim_u=4)],
)
def test_masked_context_matches_reference(kwargs):
    n, d = 10, 16
    layer = LambdaLayer(dim_k=8, heads=2, **kwargs)
    x = _x((2, n, d))
    variables = _init(layer, x)
    mask = np.random.default_rng(0).random((n, n)) < 0.5
    mask[3] = False  # a query with an empty context gets zero output
    got = np.asarray(layer.apply(variables, x, mask=mask))
    want = naive_lambda_layer(variables, x, layer, mask=mask)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
    assert np.all(got[:, 3] == 0)


@pytest.mark.parametrize("impl", ["einsum", "conv"])
@pytest.mark.parametrize("spatial", [(9,), (3, 4)])
def test_causal_masking(impl, spatial):
    d = 16
    layer = LambdaLayer(dim_k=8, heads=2, scope_size=3, causal=True, impl=impl)
    x = _x((2, *spatial, d))
    variables = _init(layer, x)
    got = np.asarray(layer.apply(variables, x))
    n = math.prod(spatial)
    want = naive_lambda_layer(variables, x, layer, mask=causal_mask(n))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
    # The output at a position does not depend on later positions.
    x2 = x.reshape(2, n, d).at[:, -1].add(5.0).reshape(x.shape)
    got2 = np.asarray(layer.apply(variables, x2)).reshape(2, n, d)
    np.testing.assert_allclose(got2[:, :-1], got.reshape(2, n, d)[:, :-1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(scope_size=7), dict(scope_size=None), dict(dim_u=4)])
def test_einsum_conv_and_rows_agree_non_square(kwargs):
    x = _x((2, 7, 10, 64))
    layers = [LambdaLayer(impl=impl, **kwargs) for impl in ("einsum", "conv", "rows")]
    variables = _init(layers[0], x)
    a, *others = (np.asarray(layer.apply(variables, x)) for layer in layers)
    assert a.shape == (2, 7, 10, 64)
    for other in others:
        np.testing.assert_allclose(other, a, rtol=1e-4, atol=1e-4 * np.abs(a).max())


def test_row_convolution_gradients_equal_the_einsum_gradients():
    x = _x((2, 9, 10, 32))
    rows = LambdaLayer(impl="rows", scope_size=5)
    assert rows._resolve_impl((9, 10), masked=False) == "rows"
    einsum = LambdaLayer(impl="einsum", scope_size=5)
    variables = _init(rows, x)

    def grads(layer):
        def loss(params, x):
            y = layer.apply({"params": params, "batch_stats": variables["batch_stats"]}, x)
            return jnp.sum(jnp.sin(y))

        return jax.grad(loss, argnums=(0, 1))(variables["params"], x)

    for a, b in zip(jax.tree.leaves(grads(rows)), jax.tree.leaves(grads(einsum)), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


def test_rows_rejects_sequences_and_masks():
    for kwargs, shape in [(dict(), (1, 16, 32)), (dict(causal=True), (1, 4, 4, 32))]:
        with pytest.raises(ValueError, match="impl='rows' convolves the rows of images"):
            _init(LambdaLayer(impl="rows", scope_size=3, **kwargs), jnp.zeros(shape))
    layer = LambdaLayer(impl="rows", scope_size=3)
    x = _x((1, 3, 3, 32))
    with pytest.raises(ValueError, match="impl='rows' takes no mask"):
        layer.apply(_init(layer, x), x, mask=np.ones((9, 9), bool))


def test_contraction_order_forms_the_smaller_intermediate():
    # |h| = 4, |k| = 16, |u| = 1: q·E is 4m per position, λ^p is 16|v|
    assert not _scores_first(1, 4, 16, 28 * 28, 1, 32)  # 28x28x128: q·E 6x larger
    assert _scores_first(1, 4, 16, 14 * 14, 1, 64)  # 14x14x256: 0.77x
    assert _scores_first(1, 4, 16, 7 * 7, 1, 128)  # 7x7x512: 0.1x
    # the test cases of the naive reference take both orders
    assert not _scores_first(1, 4, 16, 36, 1, 8) and _scores_first(1, 4, 16, 36, 1, 16)


@pytest.mark.parametrize(
    "spatial,g,j,u,v,scope,masked",
    [
        ((6, 6), 1, 4, 1, 8, 3, False),
        ((6, 6), 1, 4, 2, 16, 5, False),
        ((4, 5), 4, 1, 1, 8, None, False),  # multi-head groups, global scope
        ((10,), 1, 2, 4, 8, 5, True),  # masked sequence
    ],
)
def test_both_contraction_orders_match_the_naive_position_term(spatial, g, j, u, v, scope, masked):
    """Σ_m (q_n E_nm) v_m: λ^p first and q·E first both equal the loop over E (numpy)."""
    b, k, n = 2, 8, math.prod(spatial)
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((b, n, g, j, k)).astype(np.float32)
    values = rng.standard_normal((b, n, g, u, v)).astype(np.float32)
    table = rng.standard_normal(position_embedding_shape(spatial, scope, k, u)).astype(np.float32)
    mask = rng.random((n, n)) < 0.5 if masked else np.ones((n, n), bool)
    e = _naive_embeddings(table, spatial) * mask[:, :, None, None]
    want = np.einsum("bngjk,nmku,bmguv->bngjv", queries, e, values)
    for scores_first in (False, True):
        got = _position_output_einsum(
            jnp.asarray(queries),
            jnp.asarray(values),
            jnp.asarray(table),
            spatial,
            jnp.asarray(mask) if masked else None,
            scores_first=scores_first,
        )
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_auto_impl_follows_the_paper_rule():
    x = _x((1, 4, 4, 32))
    for kwargs in (dict(dim_u=1), dict(dim_u=4, scope_size=7)):
        auto, einsum = LambdaLayer(impl="auto", **kwargs), LambdaLayer(**kwargs)
        variables = _init(auto, x)
        np.testing.assert_allclose(
            auto.apply(variables, x), einsum.apply(variables, x), rtol=1e-4, atol=1e-4
        )
    auto = LambdaLayer(impl="auto")  # r = 23
    assert auto._resolve_impl((86, 86), masked=False) == "conv"
    assert auto._resolve_impl((86 * 86,), masked=False) == "conv"
    assert auto._resolve_impl((85 * 85,), masked=False) == "einsum"
    assert LambdaLayer(impl="auto", dim_u=4)._resolve_impl((4, 4), masked=False) == "conv"
    # the row convolution for large images with a scope of at most half the rows
    assert auto._resolve_impl((56, 56), masked=False) == "rows"
    assert auto._resolve_impl((85, 85), masked=False) == "rows"
    assert auto._resolve_impl((56, 56), masked=True) == "einsum"
    assert auto._resolve_impl((28, 28), masked=False) == "einsum"
    assert auto._resolve_impl((45, 64), masked=False) == "einsum"  # 2r > H
    assert LambdaLayer(impl="auto", scope_size=None)._resolve_impl((56, 56), False) == "einsum"
    assert LambdaLayer(impl="auto", scope_size=9)._resolve_impl((28, 28), False) == "einsum"


@pytest.mark.parametrize("impl", ["einsum", "conv"])
def test_position_term_is_translation_equivariant(impl):
    """Shifting the input shifts the position-only output, away from the borders."""
    r, shift = 5, (2, 3)
    layer = LambdaLayer(scope_size=r, content=False, impl=impl)
    x = np.zeros((1, 20, 20, 32), np.float32)
    x[:, 4:12, 4:12] = np.asarray(_x((1, 8, 8, 32)))
    shifted = np.roll(x, shift, axis=(1, 2))
    variables = _init(layer, jnp.asarray(x))
    y = np.asarray(layer.apply(variables, jnp.asarray(x)))
    ys = np.asarray(layer.apply(variables, jnp.asarray(shifted)))
    # Compare where the r x r scope of both n and n - shift stays inside the 20 x 20 input.
    inner = slice(r // 2 + max(shift), 20 - r // 2 - max(shift))
    want = np.roll(y, shift, axis=(1, 2))[:, inner, inner]
    np.testing.assert_allclose(ys[:, inner, inner], want, rtol=1e-5, atol=1e-4)
    # Sanity: the output is not trivially shift-invariant (it moved with the input).
    assert not np.allclose(y[:, inner, inner], ys[:, inner, inner], atol=1e-2)


@pytest.mark.parametrize(
    "w,k,h,u,r",
    [(64, 16, 4, 1, 23), (512, 16, 4, 1, 23), (256, 16, 4, 4, 7), (128, 8, 8, 1, 23)],
)
def test_parameter_count_matches_paper_formula(w, k, h, u, r):
    """docs/reproduction.md: w·k·h + w·k·u + w·v·u + 2·k·h + 2·v·u + r²·k·u."""
    v = w // h
    want = w * k * h + w * k * u + w * v * u + 2 * k * h + 2 * v * u + r * r * k * u
    layer = LambdaLayer(dim_k=k, heads=h, dim_u=u, scope_size=r)
    shapes = jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.zeros((1, 14, 14, w)))
    got = sum(math.prod(p.shape) for p in jax.tree.leaves(shapes["params"]))
    assert got == want


def test_shared_embeddings_replace_the_layer_table():
    x = _x((2, 6, 6, 32))
    layer = LambdaLayer(scope_size=5)
    variables = _init(layer, x)
    table = variables["params"]["rel_embeddings"]
    shared_vars = jax.tree.map(lambda a: a, variables)
    del shared_vars["params"]["rel_embeddings"]
    own = layer.apply(variables, x)
    shared = layer.apply(shared_vars, x, embeddings=table)
    np.testing.assert_allclose(own, shared, rtol=1e-6)
    init_shared = layer.init(jax.random.PRNGKey(0), x, embeddings=table)
    assert "rel_embeddings" not in init_shared["params"]
    assert position_embedding_shape((6, 6), 5, 16, 1) == table.shape
    with pytest.raises(ValueError, match="shared embeddings have shape"):
        layer.apply(shared_vars, x, embeddings=table[:3])


def test_initialisation_follows_appendix_e1():
    d, k, h = 256, 16, 4
    layer = LambdaLayer(dim_k=k, heads=h)
    params = layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, d)))["params"]
    kernel = np.asarray(params["qkv"]["kernel"])
    np.testing.assert_allclose(kernel[:, : h * k].std(), (k * d) ** -0.5, rtol=0.05)
    np.testing.assert_allclose(kernel[:, h * k :].std(), d**-0.5, rtol=0.05)
    np.testing.assert_allclose(np.asarray(params["rel_embeddings"]).std(), 1.0, rtol=0.05)
    assert "bias" not in params["qkv"]
    small = LambdaLayer(dim_k=k, heads=h, embedding_init_std=0.25)
    params = small.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, d)))["params"]
    np.testing.assert_allclose(np.asarray(params["rel_embeddings"]).std(), 0.25, rtol=0.05)


@pytest.mark.parametrize("impl", ["einsum", "conv"])
def test_gradients_finite_and_jit(impl):
    layer = LambdaLayer(scope_size=5, impl=impl)
    x = _x((2, 6, 6, 32))
    variables = layer.init(jax.random.PRNGKey(0), x)

    @jax.jit
    def loss(params, x):
        y, _ = layer.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.mean(y**2)

    grads = jax.grad(loss)(variables["params"], x)
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert all(np.abs(g).max() > 0 for g in leaves)


def test_train_mode_updates_batch_stats():
    layer = LambdaLayer(scope_size=3)
    x = _x((4, 5, 5, 32), scale=3.0) + 2.0
    variables = layer.init(jax.random.PRNGKey(0), x)
    _, state = layer.apply(variables, x, train=True, mutable=["batch_stats"])
    before = jax.tree.leaves(variables["batch_stats"])
    after = jax.tree.leaves(state["batch_stats"])
    assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.parametrize("impl", ["einsum", "conv"])
@pytest.mark.parametrize("scale", [1.0, 100.0])
def test_bfloat16_close_to_float32(impl, scale):
    """bf16 compute stays within 3% (relative to the output's scale) of float32, also for inputs
    of large magnitude: the key softmax and the BatchNorm statistics run in float32."""
    x = _x((2, 7, 7, 64), scale=scale)
    f32 = LambdaLayer(scope_size=5, impl=impl)
    bf16 = LambdaLayer(scope_size=5, impl=impl, dtype=jnp.bfloat16)
    variables = f32.init(jax.random.PRNGKey(0), x)
    for train in (False, True):
        a, _ = f32.apply(variables, x, train=train, mutable=["batch_stats"])
        b, _ = bf16.apply(variables, x, train=train, mutable=["batch_stats"])
        assert b.dtype == jnp.bfloat16
        b = np.asarray(b, np.float32)
        assert np.all(np.isfinite(b))
        err = np.abs(np.asarray(a) - b).max() / np.abs(np.asarray(a)).max()
        assert err < 0.03, err


@pytest.mark.parametrize(
    "kwargs,shape,match",
    [
        (dict(heads=3), (1, 4, 4, 32), "heads=3 must divide the output width d=32"),
        (dict(dim_out=30), (1, 4, 4, 32), "heads=4 must divide the output width d=30"),
        (dict(scope_size=4), (1, 4, 4, 32), "scope_size must be a positive odd integer"),
        (dict(scope_size=-3), (1, 4, 4, 32), "scope_size must be a positive odd integer"),
        (dict(scope_size=0), (1, 4, 4, 32), "scope_size must be a positive odd integer"),
        (dict(), (4, 32), r"expects images \[b, H, W, d\] or sequences"),
        (dict(), (1, 2, 4, 4, 32), r"expects images \[b, H, W, d\] or sequences"),
        (dict(impl="fft"), (1, 4, 4, 32), "unknown impl 'fft'"),
        (dict(key_norm="max"), (1, 4, 4, 32), "unknown key_norm 'max'"),
        (dict(key_softmax_axes="k"), (1, 4, 4, 32), r"unknown key_softmax_axes 'k'.*'mu'"),
        (dict(content=False, position=False), (1, 4, 4, 32), "leaves nothing to compute"),
        (dict(multi_head=True, dim_u=2), (1, 4, 4, 32), "supports dim_u=1 only"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, shape, match):
    with pytest.raises(ValueError, match=match):
        LambdaLayer(**kwargs).init(jax.random.PRNGKey(0), jnp.zeros(shape))


def test_contraction_order_is_not_an_attribute():
    """The einsum's contraction order is the layer's choice (`_scores_first`), not a setting."""
    with pytest.raises(TypeError, match="position_contraction"):
        LambdaLayer(position_contraction="scores")


def test_explicit_mask_with_causal_is_honoured_or_refused():
    """causal=True plus mask=: auto takes the einsum (both masks apply); conv refuses the mask
    (it would apply only the causal one)."""
    n, d = 10, 16
    kwargs = dict(dim_k=8, heads=2, scope_size=5, causal=True, dim_u=2)  # dim_u=2: auto -> conv
    x = _x((2, n, d))
    mask = np.random.default_rng(0).random((n, n)) < 0.5
    auto = LambdaLayer(impl="auto", **kwargs)
    assert auto._resolve_impl((n,), masked=False) == "conv"
    assert auto._resolve_impl((n,), masked=True) == "einsum"
    variables = _init(auto, x)
    got = np.asarray(auto.apply(variables, x, mask=mask))
    want = naive_lambda_layer(variables, x, auto, mask=mask & causal_mask(n))
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
    with pytest.raises(ValueError, match="impl='conv' supports causal masks only"):
        LambdaLayer(impl="conv", **kwargs).apply(variables, x, mask=mask)


def test_bad_mask_raises_clear_errors():
    layer = LambdaLayer(dim_k=8, heads=2)
    x = jnp.zeros((1, 6, 16))
    with pytest.raises(ValueError, match=r"mask must have shape \[n, m\] = \[6, 6\]"):
        layer.init(jax.random.PRNGKey(0), x, mask=np.ones((6, 5), bool))
    with pytest.raises(ValueError, match="impl='conv' supports causal masks only"):
        LambdaLayer(dim_k=8, heads=2, impl="conv").init(
            jax.random.PRNGKey(0), x, mask=np.ones((6, 6), bool)
        )
