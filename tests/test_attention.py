"""Attention baselines and squeeze-excitation against naive numpy references (loops over
query and key positions)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lambdanet.layers.attention import (
    AxialSelfAttention,
    LocalSelfAttention,
    RelativeSelfAttention2D,
    SqueezeExcite,
    relative_to_absolute,
)

B, H, W, D, HEADS = 2, 4, 5, 8, 2
C = D // HEADS  # per-head depth


def init(module, x):
    variables = module.init(jax.random.key(0), x)
    rng = np.random.default_rng(0)  # non-trivial values everywhere (biases included)
    return jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), variables)


@pytest.fixture
def x():
    return np.random.default_rng(1).standard_normal((B, H, W, D)).astype(np.float32)


def heads(x, kernel):
    """x [..., D] @ kernel [D, 3D] -> scaled q, k, v, each [..., HEADS, C]."""
    q, k, v = np.split(x @ kernel, 3, axis=-1)
    split = lambda t: t.reshape(*t.shape[:-1], HEADS, C)
    return split(q) * C**-0.5, split(k), split(v)


def softmax(z):
    z = np.exp(z - z.max())
    return z / z.sum()


def test_relative_to_absolute():
    table = np.arange(5)[:, None]
    np.testing.assert_array_equal(
        relative_to_absolute(table, 3)[..., 0], [[2, 3, 4], [1, 2, 3], [0, 1, 2]]
    )


def test_global_relative_attention(x):
    params = init(RelativeSelfAttention2D(heads=HEADS), x)
    out = RelativeSelfAttention2D(heads=HEADS).apply(params, x)
    p = params["params"]
    q, k, v = heads(x, p["qkv"]["kernel"])
    ref = np.zeros_like(x).reshape(B, H, W, HEADS, C)
    for b, i, j, h in np.ndindex(B, H, W, HEADS):
        logits = np.array(
            [
                q[b, i, j, h]
                @ (k[b, y, z, h] + p["rel_height"][y - i + H - 1] + p["rel_width"][z - j + W - 1])
                for y in range(H)
                for z in range(W)
            ]
        )
        ref[b, i, j, h] = softmax(logits) @ v[b, :, :, h].reshape(H * W, C)
    np.testing.assert_allclose(out, ref.reshape(x.shape), rtol=1e-4, atol=1e-4)


def axial_reference(x, p, axis):
    """1-D relative attention along ``axis`` (1: height, 2: width) of x [B, H, W, D]."""
    x = np.swapaxes(x, axis, 2)
    q, k, v = heads(x, p["qkv"]["kernel"])
    length = x.shape[2]
    out = np.zeros_like(x).reshape(*x.shape[:3], HEADS, C)
    for b, o, i, h in np.ndindex(*x.shape[:3], HEADS):
        rel = p["rel_embeddings"]
        logits = np.array(
            [q[b, o, i, h] @ (k[b, o, j, h] + rel[j - i + length - 1]) for j in range(length)]
        )
        out[b, o, i, h] = softmax(logits) @ v[b, o, :, h]
    return np.swapaxes(out.reshape(x.shape), axis, 2)


def test_axial_attention(x):
    params = init(AxialSelfAttention(heads=HEADS), x)
    out = AxialSelfAttention(heads=HEADS).apply(params, x)
    p = params["params"]
    ref = axial_reference(axial_reference(x, p["height"], 1), p["width"], 2)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_local_attention(x):
    window = 3
    module = LocalSelfAttention(heads=HEADS, window=window)
    params = init(module, x)
    out = module.apply(params, x)
    p = params["params"]
    q, k, v = heads(x, p["qkv"]["kernel"])
    r = window // 2
    ref = np.zeros_like(x).reshape(B, H, W, HEADS, C)
    for b, i, j, h in np.ndindex(B, H, W, HEADS):
        keys = [
            (y, z)
            for y in range(i - r, i + r + 1)
            for z in range(j - r, j + r + 1)
            if 0 <= y < H and 0 <= z < W  # positions outside the image are not attended to
        ]
        rel = [
            np.concatenate([p["rel_rows"][y - i + r], p["rel_cols"][z - j + r]]) for y, z in keys
        ]
        logits = np.array(
            [q[b, i, j, h] @ (k[b, y, z, h] + e) for (y, z), e in zip(keys, rel, strict=True)]
        )
        ref[b, i, j, h] = softmax(logits) @ np.array([v[b, y, z, h] for y, z in keys])
    np.testing.assert_allclose(out, ref.reshape(x.shape), rtol=1e-4, atol=1e-4)


def test_local_attention_is_translation_equivariant_inside_the_image():
    module = LocalSelfAttention(heads=HEADS, window=3)
    x = np.random.default_rng(2).standard_normal((1, 8, 8, D)).astype(np.float32)
    params = init(module, x)
    shifted = np.roll(x, 1, axis=2)
    out, out_shifted = module.apply(params, x), module.apply(params, shifted)
    np.testing.assert_allclose(out_shifted[:, :, 2:-1], out[:, :, 1:-2], rtol=1e-4, atol=1e-5)


def test_squeeze_excite(x):
    module = SqueezeExcite(ratio=0.25)
    params = init(module, x)
    out = module.apply(params, x)
    p = params["params"]
    assert p["reduce"]["kernel"].shape == (D, 2)
    s = np.maximum(x.mean((1, 2)) @ p["reduce"]["kernel"] + p["reduce"]["bias"], 0)
    gate = 1 / (1 + np.exp(-(s @ p["expand"]["kernel"] + p["expand"]["bias"])))
    np.testing.assert_allclose(out, x * gate[:, None, None], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "module, match",
    [
        (RelativeSelfAttention2D(heads=3), "heads=3 must divide"),
        (LocalSelfAttention(heads=8), "must be even"),
        (LocalSelfAttention(heads=2, window=4), "positive odd"),
        (SqueezeExcite(ratio=0.0), "ratio"),
    ],
)
def test_bad_settings(module, match, x):
    with pytest.raises(ValueError, match=match):
        module.init(jax.random.key(0), x)


def test_bfloat16_compute(x):
    module = RelativeSelfAttention2D(heads=HEADS, dtype=jnp.bfloat16)
    params = init(module, x)
    out = module.apply(params, x)
    assert out.dtype == jnp.bfloat16
    reference = RelativeSelfAttention2D(heads=HEADS).apply(params, x)
    np.testing.assert_allclose(out.astype(np.float32), reference, rtol=0.1, atol=0.1)
