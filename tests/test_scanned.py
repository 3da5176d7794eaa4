"""Scanned stages (`ResNet.scan_blocks`): the unrolled model's function, variables both ways."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lambdanet.models import create_model
from lambdanet.models.scan import block_runs
from lambdanet.models.scanned import scan_variables, scanned_runs, unscan_variables

TINY = dict(
    stage_sizes=(1, 3, 4, 2),
    base_width=8,
    num_classes=5,
    placement="C,CCC,CLLC,L",
    lambda_layer=dict(heads=2, scope_size=5),
)


def test_block_runs():
    assert block_runs("CCCLCCL", scan=False) == [(i, i) for i in range(7)]
    assert block_runs("CCCLCCL", scan=True) == [(0, 0), (1, 2), (3, 3), (4, 5), (6, 6)]
    assert block_runs("LLL", scan=True) == [(0, 0), (1, 2)]
    assert block_runs("C", scan=True) == [(0, 0)]


def test_paper_placement_runs():
    runs = scanned_runs(create_model("lambda_resnet152", scan_blocks=True))
    # c4: 36 blocks, lambda layers at 5, 10, ..., 30: runs of 3 conv blocks between them.
    assert runs["c4_scan2_4"] == [f"c4_block{i}" for i in (2, 3, 4)]
    assert "c4_scan5_5" not in runs  # a lone lambda block stays a block
    assert runs["c3_scan2_8"] == [f"c3_block{i}" for i in range(2, 9)]


def _loss_and_grads(model, variables, x):
    def loss(params):
        logits, updates = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(1)},
        )
        return jnp.sum(logits**2), updates

    (value, updates), grads = jax.value_and_grad(loss, has_aux=True)(variables["params"])
    return value, grads, updates


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(shared_embeddings=True, remat="all"),
        dict(remat="c3,c4", remat_policy="dots_saveable"),
    ],
)
def test_scanned_model_matches_unrolled(overrides):
    unrolled = create_model("lambda_resnet50", **TINY, **overrides)
    scanned = create_model("lambda_resnet50", scan_blocks=True, **TINY, **overrides)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)
    variables = unrolled.init(jax.random.key(0), x)
    converted = scan_variables(scanned, variables)
    expected = jax.eval_shape(lambda: scanned.init(jax.random.key(0), x))
    assert jax.tree.structure(converted) == jax.tree.structure(expected)
    assert converted["params"]["c3_scan2_3"]["block"]["conv1"]["kernel"].shape[0] == 2

    np.testing.assert_allclose(
        scanned.apply(converted, x), unrolled.apply(variables, x), rtol=1e-5, atol=1e-6
    )
    value, grads, updates = _loss_and_grads(unrolled, variables, x)
    value_s, grads_s, updates_s = _loss_and_grads(scanned, converted, x)
    np.testing.assert_allclose(value_s, value, rtol=1e-5)
    back = unscan_variables(scanned, {"params": grads_s, **updates_s})
    for ours, reference in [(back["params"], grads), (back["batch_stats"], updates["batch_stats"])]:
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), ours, reference
        )
    roundtrip = unscan_variables(scanned, converted)
    jax.tree.map(np.testing.assert_array_equal, roundtrip, jax.tree.map(np.asarray, variables))


def test_scanned_drop_path_draws_from_the_dropout_rng():
    """Stochastic depth in scanned stages is random in training (the masks follow the dropout
    key) and off in inference."""
    model = create_model(  # γ = 1 in the last BN: a dropped residual branch changes the output
        "lambda_resnet50", scan_blocks=True, drop_path_rate=0.9, zero_init_last_bn=False, **TINY
    )
    x = jnp.ones((8, 64, 64, 3))
    variables = model.init(jax.random.key(0), x)

    def features(seed):
        return model.apply(
            variables,
            x,
            train=True,
            return_features=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(seed)},
        )[0]["c3"]

    assert not np.allclose(features(1), features(2))
    eval_features = model.apply(variables, x, return_features=True)["c3"]
    assert np.isfinite(np.asarray(eval_features)).all()


def test_incomplete_variables_rejected():
    scanned = create_model("lambda_resnet50", scan_blocks=True, **TINY)
    x = jnp.zeros((1, 64, 64, 3))
    variables = create_model("lambda_resnet50", **TINY).init(jax.random.key(0), x)
    params = dict(variables["params"])
    del params["c3_block3"]
    with pytest.raises(ValueError, match=r"c3_scan2_3 stacks .*'c3_block3'\] are missing"):
        scan_variables(scanned, {"params": params})


def _train_state(variables):
    import optax

    from lambdanet import train

    return train.TrainState.create(
        apply_fn=None,
        params=variables["params"],
        tx=optax.sgd(0.1, momentum=0.9),
        batch_stats=variables["batch_stats"],
        ema_params=None,
        nonfinite_steps=jnp.zeros((), jnp.int32),
        first_nonfinite_step=jnp.full((), -1, jnp.int32),
    )


@pytest.mark.parametrize("saved_scanned", [False, True])
def test_checkpoint_weights_restore_into_the_other_layout(tmp_path, saved_scanned):
    """A real checkpoint written by an unrolled model (or a scanned one) restores, for
    fine-tuning and evaluation (`restore_weights`), into a scanned (or unrolled) model."""
    import ml_collections

    from lambdanet import checkpoint

    unrolled = create_model("lambda_resnet50", **TINY)
    scanned = create_model("lambda_resnet50", scan_blocks=True, **TINY)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 64, 64, 3)), jnp.float32)
    variables = unrolled.init(jax.random.key(0), x)
    layouts = {False: variables, True: scan_variables(scanned, variables)}
    saved, wanted = layouts[saved_scanned], layouts[not saved_scanned]
    manager = checkpoint.create_checkpoint_manager(tmp_path / "checkpoints")
    config = ml_collections.ConfigDict(dict(model_name="lambda_resnet50"))
    checkpoint.save(manager, _train_state(saved).replace(step=jnp.asarray(3)), config, None)
    manager.wait_until_finished()
    fresh = (scanned if not saved_scanned else unrolled).init(jax.random.key(1), x)
    restored = checkpoint.restore_weights(manager, 3, _train_state(fresh))
    for got, expected in [
        (restored.params, wanted["params"]),
        (restored.batch_stats, wanted["batch_stats"]),
    ]:
        assert jax.tree.structure(got) == jax.tree.structure(expected)
        jax.tree.map(np.testing.assert_array_equal, got, expected)
    wrong = create_model("lambda_resnet50", **{**TINY, "base_width": 4}).init(jax.random.key(1), x)
    with pytest.raises(ValueError, match="entries differ"):
        checkpoint.restore_weights(manager, 3, _train_state(wrong))
    manager.close()
