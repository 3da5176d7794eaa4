"""BatchNorm folding (lambdanet.models.fold): the folded network gives the unfolded logits."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lambdanet.layers.lambda_layer import LambdaLayer
from lambdanet.models import create_model, fold_batch_norm
from lambdanet.models.fold import norm_name

TINY = dict(num_classes=5, stage_sizes=(1, 1, 2, 1), base_width=8)


def trained_looking_variables(model, x, seed=0):
    """Random variables with BatchNorm statistics far from (0, 1), as after training."""
    shapes = jax.eval_shape(lambda k: model.init(k, x), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        key = jax.tree_util.keystr(path)
        if key.endswith("['var']"):
            return rng.uniform(0.2, 3.0, s.shape).astype(s.dtype)
        scale = 1.0 if key.endswith(("['mean']", "['scale']")) else 0.3
        return (scale * rng.standard_normal(s.shape)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def lambda_layers(variables) -> list[dict]:
    """The parameter scopes of every LambdaLayer in a model's variables."""
    found = []

    def visit(scope):
        if "qkv" in scope:
            found.append(scope)
        for child in scope.values():
            if isinstance(child, dict):
                visit(child)

    visit(variables["params"])
    return found


def count(tree) -> int:
    """Number of scalars in a pytree."""
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("resnet50", {}),  # 7x7 stem + max-pool, projection shortcuts
        # ResNet-RS: deep stem, pool conv, avg-down, SE
        ("lambda_resnet50", dict(placement="C,C,CL,L", lambda_layer=dict(scope_size=5))),
        (
            "hybrid_resnet50",
            dict(placement="C,L,C,L", lambda_layer=dict(scope_size=5)),
        ),  # BN after lambda layers
        ("lambda_resnet26t", {}),  # timm port: BN after the lambda layer, 2x2 pool
    ],
)
def test_folded_logits_equal_the_unfolded(name, overrides):
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 64, 64, 3)), jnp.float32)
    model = create_model(name, **TINY, **overrides)
    variables = trained_looking_variables(model, x)
    folded_model, folded = fold_batch_norm(model, variables)
    want = model.apply(variables, x)
    got = jax.jit(folded_model.apply)(folded, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
    # every conv here has a BatchNorm after it: each of its output channels loses γ, β, μ, σ²
    # and gains a bias; so do the lambda layers' query and value columns, and their key columns
    # gain a zero bias
    conv_biases = [
        leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(folded["params"])
        if "conv" in jax.tree_util.keystr(path) and jax.tree_util.keystr(path).endswith("['bias']")
    ]
    norms_qv = [(s["norm_q"]["scale"], s["norm_v"]["scale"]) for s in lambda_layers(variables)]
    qkv_biases = [s["qkv"]["bias"] for s in lambda_layers(folded)]
    assert len(qkv_biases) == len(norms_qv) and bool(norms_qv) == (name != "resnet50")
    qv_channels = count(norms_qv)
    key_channels = count(qkv_biases) - qv_channels
    assert count(variables) - count(folded) == (
        3 * (count(conv_biases) + qv_channels) - key_channels
    )
    assert not any("norm_q" in s for s in lambda_layers(folded))
    assert folded_model.batch_norm_folded and not model.batch_norm_folded


def test_fold_pairs_convs_with_their_batch_norms_only():
    x = jnp.zeros((1, 64, 64, 3))
    model = create_model(
        "hybrid_resnet50", placement="C,C,L,C", lambda_layer=dict(scope_size=5), **TINY
    )
    variables = trained_looking_variables(model, x)
    _, folded = fold_batch_norm(model, variables)
    conv_block, lambda_block = folded["params"]["c2_block1"], folded["params"]["c4_block1"]
    assert set(conv_block) == {"conv1", "conv2", "conv3", "downsample_conv"}
    assert all(set(conv_block[c]) == {"kernel", "bias"} for c in conv_block)
    # the BatchNorm after a lambda layer stays; the lambda layer's own fold into its qkv
    assert {"bn2", "lambda_layer"} <= set(lambda_block) and "bn1" not in lambda_block
    assert set(folded["batch_stats"]["c4_block1"]) == {"bn2"}
    assert set(lambda_block["lambda_layer"]["qkv"]) == {"kernel", "bias"}
    assert "c2_block1" not in folded["batch_stats"]


def test_folded_weights_follow_the_formula():
    x = jnp.zeros((1, 64, 64, 3))
    model = create_model("resnet50", **TINY)
    variables = trained_looking_variables(model, x)
    _, folded = fold_batch_norm(model, variables)
    conv = variables["params"]["c3_block1"]["conv2"]["kernel"]
    bn = variables["params"]["c3_block1"][norm_name("conv2")]
    stats = variables["batch_stats"]["c3_block1"]["bn2"]
    a = np.asarray(bn["scale"]) / np.sqrt(np.asarray(stats["var"]) + model.bn_epsilon)
    got = folded["params"]["c3_block1"]["conv2"]
    np.testing.assert_allclose(got["kernel"], np.asarray(conv) * a, rtol=1e-6)
    np.testing.assert_allclose(got["bias"], bn["bias"] - a * stats["mean"], rtol=1e-5, atol=1e-6)


def test_folded_models_refuse_training_and_initialisation():
    x = jnp.zeros((1, 64, 64, 3))
    model = create_model("resnet50", **TINY)
    folded_model, folded = fold_batch_norm(model, trained_looking_variables(model, x))
    with pytest.raises(ValueError, match="for inference"):
        folded_model.apply(folded, x, train=True)
    with pytest.raises(ValueError, match="fold_batch_norm"):
        folded_model.init(jax.random.key(0), x)
    layer = LambdaLayer(scope_size=3, batch_norm_folded=True)
    y = jnp.zeros((1, 4, 4, 8))
    layer_variables = layer.init(jax.random.key(0), y)
    with pytest.raises(ValueError, match="for inference"):
        layer.apply(layer_variables, y, train=True)


def test_missing_batch_stats_is_named():
    x = jnp.zeros((1, 64, 64, 3))
    model = create_model("resnet50", **TINY)
    variables = trained_looking_variables(model, x)
    with pytest.raises(ValueError, match="'stem_bn1' has no batch_stats"):
        fold_batch_norm(model, {"params": variables["params"]})
