"""The stems' max pool: the scatter-free gradient equals XLA's select_and_scatter one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lambdanet.layers.pooling import max_pool_3x3
from lambdanet.models import create_model


def naive_max_pool_grad(x: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Loops: each window's output gradient goes to its first maximum (row-major)."""
    b, h, w, c = x.shape
    dx = np.zeros_like(x)
    for n in range(b):
        for p in range(dy.shape[1]):
            for q in range(dy.shape[2]):
                for ch in range(c):
                    best, where = -np.inf, None
                    for i in range(3):
                        for j in range(3):
                            r, s = 2 * p + i - 1, 2 * q + j - 1
                            if 0 <= r < h and 0 <= s < w and x[n, r, s, ch] > best:
                                best, where = x[n, r, s, ch], (r, s)
                    dx[n, where[0], where[1], ch] += dy[n, p, q, ch]
    return dx


@pytest.mark.parametrize("height, width", [(8, 8), (7, 9), (2, 3)])
def test_values_and_gradients_equal_select_and_scatter_with_ties(height, width):
    rng = np.random.default_rng(height * width)
    # few distinct values (as after ReLU and bf16 rounding): many windows hold tied maxima
    x = np.maximum(rng.integers(-2, 4, (2, height, width, 3)), 0).astype(np.float32)
    dy = rng.standard_normal((2, (height + 1) // 2, (width + 1) // 2, 3)).astype(np.float32)

    def vjp(grad):
        y, pullback = jax.vjp(lambda x: max_pool_3x3(x, grad), jnp.asarray(x))
        return y, pullback(jnp.asarray(dy))[0]

    y_scatter, dx_scatter = vjp("scatter")
    y_views, dx_views = jax.jit(vjp, static_argnums=0)("views")
    np.testing.assert_array_equal(y_views, y_scatter)
    np.testing.assert_allclose(dx_views, naive_max_pool_grad(x, dy), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(dx_scatter, naive_max_pool_grad(x, dy), rtol=1e-6, atol=1e-6)


def test_bfloat16_gradients_keep_their_dtype():
    x = jax.random.normal(jax.random.key(0), (1, 6, 6, 2), jnp.bfloat16)
    dx = jax.grad(lambda x: max_pool_3x3(x, "views").astype(jnp.float32).sum())(x)
    assert dx.dtype == jnp.bfloat16
    assert float(dx.astype(jnp.float32).sum()) == 18.0  # one winner per output (3 x 3 x 2)


def test_unknown_gradient_is_named():
    with pytest.raises(ValueError, match="choose one of"):
        max_pool_3x3(jnp.zeros((1, 4, 4, 1)), "gather")


@pytest.mark.parametrize("name", ["resnet50", "resnet26t"])  # 7x7 and tiered stems
def test_models_get_the_same_gradients_with_either_max_pool_gradient(name):
    tiny = dict(num_classes=5, stage_sizes=(1, 1, 1, 1), base_width=8)
    x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    variables = create_model(name, **tiny).init(jax.random.key(1), x)

    def grads(max_pool_grad):
        model = create_model(name, max_pool_grad=max_pool_grad, **tiny)

        def loss(params):
            logits, _ = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(logits * jnp.arange(5.0))

        return jax.jit(jax.grad(loss))(variables["params"])

    want, got = grads("scatter"), grads("views")
    for (path, g), w in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    with pytest.raises(ValueError, match="max_pool_grad='gather'"):
        create_model(name, max_pool_grad="gather", **tiny).init(jax.random.key(1), x)
