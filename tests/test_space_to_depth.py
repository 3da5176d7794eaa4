"""Space-to-depth stem convolution: the same values and gradients as the strided convolution."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lambdanet.layers.space_to_depth import SpaceToDepthConv, space_to_depth_conv
from lambdanet.models import create_model
from lambdanet.models.fold import fold_batch_norm


def naive_conv(x: np.ndarray, kernel: np.ndarray, stride: int, padding: int) -> np.ndarray:
    """Loops over output positions and kernel offsets: zero padding on every side."""
    kh, kw, _, f = kernel.shape
    b, h, w, _ = x.shape
    out_h, out_w = (h + 2 * padding - kh) // stride + 1, (w + 2 * padding - kw) // stride + 1
    y = np.zeros((b, out_h, out_w, f))
    for i in range(out_h):
        for j in range(out_w):
            for di in range(kh):
                for dj in range(kw):
                    r, c = stride * i + di - padding, stride * j + dj - padding
                    if 0 <= r < h and 0 <= c < w:
                        y[:, i, j] += x[:, r, c] @ kernel[di, dj]
    return y


@pytest.mark.parametrize(
    "height, width, kernel_size, stride, padding",
    [
        (20, 20, 7, 2, 3),  # ResNet stem
        (21, 18, 7, 2, 3),  # odd side: one more zero row at the far side
        (16, 15, 3, 2, 1),  # deep / tiered stem
        (17, 19, 5, 3, 2),  # stride 3
        (9, 9, 1, 2, 0),  # the far side's rows are never read: cropped
        (8, 8, 2, 2, 0),  # kernel a multiple of the stride: no kernel padding
    ],
)
def test_equals_naive_convolution(height, width, kernel_size, stride, padding):
    rng = np.random.default_rng(height * width + kernel_size)
    x = rng.standard_normal((2, height, width, 3)).astype(np.float32)
    kernel = rng.standard_normal((kernel_size, kernel_size, 3, 5)).astype(np.float32)
    y = space_to_depth_conv(jnp.asarray(x), jnp.asarray(kernel), stride, padding)
    np.testing.assert_allclose(y, naive_conv(x, kernel, stride, padding), rtol=1e-5, atol=1e-5)


def test_module_has_nn_conv_parameters_values_and_gradients():
    x = jax.random.normal(jax.random.key(0), (2, 15, 14, 3))
    kwargs = dict(features=6, kernel_size=(7, 7), strides=(2, 2), padding=3)
    conv = nn.Conv(**kwargs, bias_init=nn.initializers.normal(1.0))
    variables = conv.init(jax.random.key(1), x)
    blocks = SpaceToDepthConv(**kwargs)
    assert jax.tree.map(jnp.shape, blocks.init(jax.random.key(1), x)) == jax.tree.map(
        jnp.shape, variables
    )

    def loss(module, variables, x):
        return jnp.sum(jnp.sin(module.apply(variables, x)))

    grads = jax.grad(loss, argnums=(1, 2))  # kernel, bias and input
    got, want = grads(blocks, variables, x), grads(conv, variables, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got, want)
    np.testing.assert_allclose(blocks.apply(variables, x), conv.apply(variables, x), atol=1e-5)


def test_module_without_bias_has_only_a_kernel():
    x = jnp.ones((1, 8, 8, 3))
    variables = SpaceToDepthConv(4, (3, 3), (2, 2), padding=1, use_bias=False).init(
        jax.random.key(0), x
    )
    assert set(variables["params"]) == {"kernel"}


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("resnet50", {}),
        ("resnet50", dict(stem="deep")),
        ("lambda_resnet26t", dict(placement="C,C,L,L")),
    ],
)
def test_models_compute_the_same_logits_with_either_stem_conv(name, overrides):
    tiny = dict(stage_sizes=(1, 1, 1, 1), num_classes=5, **overrides)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    direct = create_model(name, stem_conv_impl="direct", **tiny)
    blocks = create_model(name, stem_conv_impl="space_to_depth", **tiny)
    variables = direct.init(jax.random.key(1), x)
    assert jax.tree.structure(blocks.init(jax.random.key(1), x)) == jax.tree.structure(variables)
    np.testing.assert_allclose(blocks.apply(variables, x), direct.apply(variables, x), atol=1e-5)
    # folded: the stem conv gains the BatchNorm's bias like any conv
    folded_model, folded = fold_batch_norm(blocks, variables)
    np.testing.assert_allclose(folded_model.apply(folded, x), direct.apply(variables, x), atol=1e-4)


def test_bad_settings_are_named():
    x = jnp.ones((1, 8, 8, 3))
    with pytest.raises(ValueError, match="stem_conv_impl='im2col'; choose one of"):
        create_model("resnet50", stem_conv_impl="im2col").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="one stride for both axes"):
        SpaceToDepthConv(4, (3, 3), (2, 1), padding=1).init(jax.random.key(0), x)
