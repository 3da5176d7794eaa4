"""Model zoo: parameter counts against the paper (§5) and docs/reproduction.md's formula, shapes,
train/eval behaviour.

Counts and shapes come from ``jax.eval_shape`` (no initialisation, no compilation), so every
registered model, LambdaResNet-420 included, is checked in seconds. Train/eval behaviour runs a
tiny network (one or two blocks per stage, width 8) with random variables.
"""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import FrozenDict

from lambdanet.models import (
    STAGE_SIZES,
    ResNet,
    create_model,
    list_models,
    model_entry,
    paper_c4_indices,
    parse_placement,
)
from lambdanet.models.stochastic_depth import drop_path_rates

SMALL = (2, 64, 64, 3)
RESNET50 = 25_557_032
WIDTHS50 = [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3  # bottleneck widths w of ResNet-50
# timm's published parameter counts of resnetrs50 ... resnetrs420 (M).
RESNET_RS_TIMM = {
    50: 35.69,
    101: 63.62,
    152: 86.62,
    200: 93.21,
    270: 129.86,
    350: 163.96,
    420: 191.89,
}


def abstract(name: str, shape=SMALL, **overrides):
    """(logits, variables) of a registered model, as shapes only (traced once per argument set)."""
    frozen = {k: FrozenDict(v) if isinstance(v, dict) else v for k, v in overrides.items()}
    return _abstract(name, shape, tuple(sorted(frozen.items())))


@functools.cache
def _abstract(name: str, shape, overrides):
    model = create_model(
        name, **{k: dict(v) if isinstance(v, FrozenDict) else v for k, v in overrides}
    )
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(
        lambda key, x: model.init_with_output(key, x, train=False), jax.random.key(0), x
    )


def n_params(name: str, shape=SMALL, **overrides) -> int:
    params = abstract(name, shape, **overrides)[1]["params"]
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


def lambda_params(w: int, k: int = 16, h: int = 4, u: int = 1, r: int = 23) -> int:
    """docs/reproduction.md: projections, BN on queries and values, r x r relative embeddings."""
    v = w // h
    return w * k * h + w * k * u + w * v * u + 2 * k * h + 2 * v * u + r * r * k * u


def analytic_lambda_resnet50(placement: str, **lam) -> int:
    """ResNet-50 with the 3x3 convs (9w² each) of the 'L' blocks replaced by lambda layers."""
    letters = "".join(parse_placement(placement, STAGE_SIZES[50]))
    replaced = [w for w, t in zip(WIDTHS50, letters, strict=True) if t == "L"]
    return (
        RESNET50 - sum(9 * w * w for w in replaced) + sum(lambda_params(w, **lam) for w in replaced)
    )


# --- registry ---------------------------------------------------------------------------------


def test_registry_has_the_paper_models():
    names = set(list_models())
    required = {"resnet50", "se_resnet50", "hybrid_resnet50", "lambda_resnet50_all"}
    required |= {"lambda_resnet50_u4", "lambda_resnet50_k8", "lambda_resnet50_shared"}
    required |= {"lambda_conv_resnet50", "global_sa_resnet50", "axial_sa_resnet50"}
    required |= {"local_sa_resnet50"}
    required |= {f"{p}{d}" for p in ("resnet_rs", "lambda_resnet") for d in STAGE_SIZES}
    assert required <= names
    assert set(list_models("lambda_resnet")) == {f"lambda_resnet{d}" for d in STAGE_SIZES}
    assert "lambda_resnet50_all" in list_models("table3_4")


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown model 'lambda_resnet51'") as error:
        create_model("lambda_resnet51")
    assert all(name in str(error.value) for name in list_models())


def test_unknown_override_is_rejected():
    with pytest.raises(ValueError, match="num_clases"):
        create_model("resnet50", num_clases=10)


@pytest.mark.parametrize("name", list_models())
def test_every_model_outputs_float32_logits(name):
    logits, _ = abstract(name)
    assert logits.shape == (SMALL[0], 1000) and logits.dtype == jnp.float32


def test_num_classes_override():
    assert abstract("lambda_resnet50_u4", num_classes=10)[0].shape == (SMALL[0], 10)


# --- parameter counts -------------------------------------------------------------------------


def test_resnet50_matches_torchvision_exactly():
    assert n_params("resnet50") == RESNET50


def test_table3_lambda_resnet50():
    assert n_params("lambda_resnet50_all") == analytic_lambda_resnet50("L,L,L,L")
    assert abs(n_params("lambda_resnet50_all") / 1e6 - 14.996) <= 0.001  # paper 15.0
    u4 = n_params("lambda_resnet50_u4")
    assert u4 == analytic_lambda_resnet50("L,L,L,L", u=4, r=7)
    assert abs(u4 / 1e6 - 16.04) <= 0.005  # paper 16.0


def test_table3_baselines_match_paper():
    assert abs(n_params("se_resnet50") / 1e6 - 28.1) < 0.05  # Hu et al., reduction 16
    assert abs(n_params("local_sa_resnet50") / 1e6 - 18.0) < 0.05  # Ramachandran et al.


@pytest.mark.parametrize(
    "placement, paper",
    [
        ("L,C,C,C", 25.49),
        ("L,L,C,C", 24.99),
        ("L,L,L,C", 21.73),
        ("C,L,L,L", 15.06),
        ("C,C,L,L", 15.56),
        ("C,C,C,L", 18.83),
    ],
)
def test_hybrid_counts(placement, paper):
    count = n_params("hybrid_resnet50", placement=placement)
    assert count == analytic_lambda_resnet50(placement)
    assert abs(count / 1e6 - paper) < 0.05


@pytest.mark.parametrize(
    "k, h, u, paper",  # Appendix D.1 (a), the rows the analytic count reproduces
    [
        (4, 4, 1, 14.7),
        (8, 4, 1, 14.8),
        (16, 4, 1, 15.0),
        (32, 4, 1, 15.4),
        (8, 8, 1, 14.7),
        (16, 8, 1, 15.1),
        (32, 8, 1, 15.7),
        (8, 8, 4, 15.3),
        (8, 8, 8, 16.0),
        (16, 4, 4, 16.0),
    ],
)
def test_ablation_counts(k, h, u, paper):
    scope = 7 if u > 1 else 23  # |u| > 1 uses a 7x7 scope (§4.1)
    count = n_params(
        "lambda_resnet50_all", lambda_layer=dict(dim_k=k, heads=h, dim_u=u, scope_size=scope)
    )
    assert count == analytic_lambda_resnet50("L,L,L,L", k=k, h=h, u=u, r=scope)
    assert abs(count / 1e6 - paper) < 0.07  # the paper rounds to 0.1M


def test_global_attention_count_follows_input_size():
    def expected(size):
        sides = []  # input side of each block's attention layer: the first block of c3..c5
        for s, n in enumerate(STAGE_SIZES[50]):  # runs before its 2x downsampling
            sides += [size // 2 ** (s + 2) * (2 if s and i == 0 else 1) for i in range(n)]
        # qkv 3w² instead of the 9w² conv, plus height and width tables [2·side - 1, w / 8].
        return RESNET50 + sum(
            -6 * w * w + 2 * (2 * side - 1) * (w // 8)
            for w, side in zip(WIDTHS50, sides, strict=True)
        )

    assert n_params("global_sa_resnet50") == expected(SMALL[1])
    assert n_params("global_sa_resnet50", (1, 96, 96, 3)) == expected(96)


@pytest.mark.parametrize("depth", sorted(STAGE_SIZES))
def test_resnet_rs_and_lambda_resnet_counts(depth):
    rs = n_params(f"resnet_rs{depth}")
    assert abs(rs / 1e6 - RESNET_RS_TIMM[depth]) < 0.006
    # LambdaResNet: each lambda block drops its 3x3 conv and its SE (4w -> w -> 4w, with bias).
    c4, c5 = 256, 512
    swaps = [(c4, len(paper_c4_indices(depth)))] + [(c5, STAGE_SIZES[depth][3])]
    delta = sum(n * (lambda_params(w) - 9 * w * w - (8 * w * w + 5 * w)) for w, n in swaps)
    assert n_params(f"lambda_resnet{depth}") == rs + delta


def test_shared_embeddings_one_table_per_resolution():
    params = abstract("lambda_resnet50_shared")[1]["params"]
    tables = {k for k in params if k.startswith("rel_embeddings")}
    assert tables == {f"rel_embeddings_stride{s}" for s in (4, 8, 16, 32)}
    assert all(params[t].shape == (23, 23, 16, 1) for t in tables)
    assert "rel_embeddings" not in params["c3_block2"]["lambda_layer"]
    assert (
        "rel_embeddings"
        in abstract("lambda_resnet50_all")[1]["params"]["c3_block2"]["lambda_layer"]
    )
    assert n_params("lambda_resnet50_shared") == n_params("lambda_resnet50_all") - 12 * 23**2 * 16


@pytest.mark.parametrize("shared", [False, True])
def test_embedding_init_std_reaches_every_table(shared):
    model = create_model(
        "lambda_resnet50_all",
        num_classes=10,
        stage_sizes=(1, 1, 1, 1),
        base_width=8,
        shared_embeddings=shared,
        lambda_layer=dict(embedding_init_std=0.25),
    )
    params = model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))["params"]
    flat = jax.tree_util.tree_leaves_with_path(params)
    tables = [x for path, x in flat if "rel_embeddings" in jax.tree_util.keystr(path)]
    # shared: one table per input resolution; the only c3 block runs at c2's (it downsamples after)
    assert len(tables) == (3 if shared else 4)
    np.testing.assert_allclose(np.concatenate([np.ravel(t) for t in tables]).std(), 0.25, rtol=0.05)


# --- placement --------------------------------------------------------------------------------


def test_paper_c4_indices_match_the_architecture_table():
    table = {  # Appendix E.1
        50: (3,),
        101: (6, 12, 18),
        152: (5, 10, 15, 20, 25, 30),
        200: (5, 10, 15, 20, 25, 30),
        270: (8, 16, 24, 32, 40, 48),
        350: (10, 20, 30, 40, 50, 60),
        420: (10, 20, 30, 40, 50, 60, 70, 80),
    }
    assert {d: paper_c4_indices(d) for d in table} == table


def test_placement_forms_agree():
    sizes = STAGE_SIZES[50]
    expected = ("CCC", "CCCC", "CCLCCC", "LLL")
    assert parse_placement("paper", sizes) == expected
    assert parse_placement({"c4": [3], "c5": "all"}, sizes) == expected
    assert parse_placement("c4:3,c5:all", sizes) == expected
    assert parse_placement("C, C, CCLCCC, L", sizes) == expected
    assert parse_placement(("C", "C", "CCLCCC", "L"), sizes) == expected
    assert parse_placement("c4:1+6", sizes)[2] == "LCCCCL"
    assert parse_placement("C,C,L,L", sizes) == ("CCC", "CCCC", "LLLLLL", "LLL")


@pytest.mark.parametrize(
    "spec, match",
    [
        ("C,C,L", "one entry per stage"),
        ("C,C,L,L,L", "one entry per stage"),
        ("C,C,Q,L", "unknown block type"),
        ("C,C,CCL,L", "one letter or 6 letters"),
        ("c4:7", r"outside 1\.\.6"),
        ("c6:1", "unknown stage"),
        ("c4", "one entry per stage"),
    ],
)
def test_bad_placement_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_placement(spec, STAGE_SIZES[50])


def test_paper_placement_needs_a_resnet_rs_configuration():
    with pytest.raises(ValueError, match="ResNet-RS block configuration"):
        parse_placement("paper", (1, 1, 1, 1))


def test_wrong_placement_fails_when_building():
    with pytest.raises(ValueError, match="one entry per stage"):
        abstract("hybrid_resnet50", placement="C,L")


def test_lambda_resnet101_layout():
    params = abstract("lambda_resnet101")[1]["params"]
    for i in range(1, 24):
        block = params[f"c4_block{i}"]
        assert ("lambda_layer" in block) == (i in (6, 12, 18))
        assert ("se" in block) == (i not in (6, 12, 18))  # no SE in lambda blocks
    assert all("lambda_layer" in params[f"c5_block{i}"] for i in (1, 2, 3))
    assert {"stem_conv3", "stem_pool_conv"} <= set(params)  # ResNet-D stem, pool conv


# --- shapes, input sizes, features ------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(224, 224), (256, 256), (288, 288), (224, 320)])
@pytest.mark.parametrize("name", ["lambda_resnet50", "global_sa_resnet50"])
def test_input_sizes(name, height, width):
    model = create_model(name)
    x = jax.ShapeDtypeStruct((1, height, width, 3), jnp.float32)
    features, variables = jax.eval_shape(
        lambda k, x: model.init_with_output(k, x, return_features=True), jax.random.key(0), x
    )
    assert features["c5"].shape == (1, height // 32, width // 32, 2048)
    if name == "global_sa_resnet50":  # tables sized from the input at trace time
        rel = variables["params"]["c5_block2"]["self_attention"]
        assert rel["rel_height"].shape == (2 * height // 32 - 1, 64)
        assert rel["rel_width"].shape == (2 * width // 32 - 1, 64)


@pytest.mark.parametrize("name", ["resnet50", "lambda_resnet50"])
def test_features(name):
    model = create_model(name, base_width=32)
    x = jax.ShapeDtypeStruct(SMALL, jnp.float32)
    features, _ = jax.eval_shape(
        lambda k, x: model.init_with_output(k, x, return_features=True), jax.random.key(0), x
    )
    b, size = SMALL[0], SMALL[1]
    assert features["stem"].shape == (b, size // 4, size // 4, 32)
    for i, stage in enumerate(("c2", "c3", "c4", "c5")):
        assert features[stage].shape == (b, size // 2 ** (i + 2), size // 2 ** (i + 2), 128 * 2**i)
    assert features["pre_logits"].shape == (b, 1024)


def test_bfloat16_compute_float32_params_and_logits():
    logits, variables = abstract("lambda_resnet50", dtype=jnp.bfloat16)
    assert logits.dtype == jnp.float32
    leaves = jax.tree.leaves(variables)
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)


# --- behaviour on a tiny network --------------------------------------------------------------

TINY = dict(
    stage_sizes=(1, 1, 2, 1),
    base_width=8,
    lambda_layer=dict(heads=2),
    attention=dict(heads=2),
    num_classes=5,
    se_ratio=0.25,
)


def random_variables(model, x, seed=0):
    """Random variables of the right shapes (positive BatchNorm variances), no initialisers."""
    shapes = jax.eval_shape(lambda k: model.init(k, x), jax.random.key(0))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        if jax.tree_util.keystr(path).endswith("['var']"):
            return np.ones(s.shape, s.dtype)
        return (0.3 * rng.standard_normal(s.shape)).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def tiny():
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 64, 64, 3)), jnp.float32)
    model = ResNet(placement="C,L,XS,G", **TINY)
    return model, random_variables(model, x), x


def test_train_updates_batch_stats(tiny):
    model, variables, x = tiny
    logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert logits.shape == (2, 5) and np.isfinite(logits).all()
    before, after = variables["batch_stats"], updates["batch_stats"]
    for path in [("c2_block1", "bn1"), ("c3_block1", "lambda_layer", "norm_q")]:
        old, new = before, after
        for key in path:
            old, new = old[key], new[key]
        assert not np.allclose(old["mean"], new["mean"])


def test_dropout_and_drop_path_act_only_in_train(tiny):
    model, variables, x = tiny
    noisy = model.clone(drop_path_rate=0.5, dropout_rate=0.5)

    def run(m, train, seed):
        rngs = {"dropout": jax.random.key(seed)}
        if not train:
            return m.apply(variables, x, rngs=rngs)
        return m.apply(variables, x, train=True, mutable=["batch_stats"], rngs=rngs)[0]

    clean = run(model, False, 0)
    np.testing.assert_array_equal(run(noisy, False, 0), clean)
    np.testing.assert_array_equal(run(noisy, False, 1), clean)
    np.testing.assert_array_equal(run(model, True, 0), run(model, True, 1))
    assert not np.allclose(run(noisy, True, 0), run(noisy, True, 1))


def test_remat_checkpoints_the_chosen_stages(tiny):
    model, variables, x = tiny

    def checkpointed_blocks(m):
        jaxpr = jax.make_jaxpr(lambda v: m.apply(v, x))(variables)
        return len(re.findall(r"\b(?:remat\w*|checkpoint)\[", str(jaxpr)))

    assert checkpointed_blocks(model) == 0
    assert checkpointed_blocks(model.clone(remat="c4")) == 2
    assert checkpointed_blocks(model.clone(remat="all")) == 5
    with pytest.raises(ValueError, match="remat stages"):
        checkpointed_blocks(model.clone(remat="c7"))
    with_policy = model.clone(remat="all", remat_policy="dots_saveable")
    assert checkpointed_blocks(with_policy) == 5
    jaxpr = str(jax.make_jaxpr(lambda v: with_policy.apply(v, x))(variables))
    assert "policy=DotsSaveable(only_if_no_batch_dims=False)" in jaxpr
    with pytest.raises(ValueError, match="no jax.checkpoint_policies policy"):
        checkpointed_blocks(model.clone(remat="all", remat_policy="dots"))


def test_drop_path_schedules():
    block = drop_path_rates(0.3, (1, 2, 1), "block")
    np.testing.assert_allclose(sum(block, []), [0.0, 0.1, 0.2, 0.3])
    stage = drop_path_rates(0.2, (1, 2, 1, 1), "stage")  # tensorflow/tpu: rate·(i+2)/5
    np.testing.assert_allclose(sum(stage, []), [0.08, 0.12, 0.12, 0.16, 0.2])
    with pytest.raises(ValueError, match="drop_path_schedule"):
        drop_path_rates(0.1, (1,), "layer")


def test_registry_entries_describe_their_source():
    assert model_entry("lambda_resnet50_all").paper_params_m == 15.0
    assert model_entry("lambda_resnet420").config["placement"] == "paper"
