"""The training loop on CPU: 8 fake devices (tests/conftest.py), tiny models, digits at 32x32."""

import functools
import itertools
import logging
import os
import re
import signal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from lambdanet import data, evaluate, experiment, models, sharding, train, train_loop


def _losses(exp: experiment.Experiment, num_steps: int) -> list[float]:
    state, losses = exp.state, []
    batches = sharding.prefetch_to_device(exp.dataset.train_iter(0), exp.mesh)
    for batch in itertools.islice(batches, num_steps):
        state, step_metrics = exp.train_step(state, batch, exp.rngs)
        losses.append(float(step_metrics.loss.compute()))
    return losses


def test_learning_rate_warms_up_linearly_then_decays_by_cosine(tiny_config):
    tiny_config.global_batch_size, tiny_config.warmup_epochs = 1024, 5.0
    lr = train.create_learning_rate_fn(tiny_config, steps_per_epoch=100, num_train_steps=1000)
    peak = tiny_config.learning_rate * 1024 / 256
    expected = {0: 0.0, 250: peak / 2, 500: peak, 750: peak / 2, 1000: 0.0}
    for step, value in expected.items():
        assert float(lr(step)) == pytest.approx(value, abs=1e-6), step


def test_weight_decay_skips_1d_params_and_clipping_bounds_the_update(tiny_config):
    tiny_config.weight_decay, tiny_config.momentum, tiny_config.grad_clip_norm = 0.5, 0.0, 1.0
    tx = train.create_optimizer(tiny_config, optax.constant_schedule(1.0))
    params = {"conv": {"kernel": jnp.ones((2, 2))}, "bn": {"scale": jnp.ones(2)}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(updates["conv"]["kernel"], -0.5)  # -lr * wd * kernel
    np.testing.assert_allclose(updates["bn"]["scale"], 0.0)
    big = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), params)
    tiny_config.weight_decay = 0.0
    tx = train.create_optimizer(tiny_config, optax.constant_schedule(1.0))
    updates, _ = tx.update(big, tx.init(params), params)
    assert float(optax.tree.norm(updates)) == pytest.approx(1.0, rel=1e-5)


def test_label_smoothing_matches_the_formula():
    logits = jnp.array([[2.0, 0.0, -1.0]])
    targets = jax.nn.one_hot(jnp.array([0]), 3)
    log_p = jax.nn.log_softmax(logits)[0]
    expected = -(0.9 + 0.1 / 3) * log_p[0] - (0.1 / 3) * (log_p[1] + log_p[2])
    loss = train.cross_entropy_loss(logits.astype(jnp.bfloat16), targets, 0.1)
    assert loss.dtype == jnp.float32
    assert float(loss[0]) == pytest.approx(float(expected), rel=1e-2)


def test_sharded_step_matches_one_device_fits_a_batch_and_evaluates_exactly(tiny_config):
    tiny_config.dataset.eval_split = "train"  # 1,003 eval examples: not a multiple of 8 x 32
    tiny_config.dataset.max_eval_examples = 1003
    exp8 = experiment.create_experiment(tiny_config)
    exp1 = experiment.create_experiment(tiny_config, devices=jax.devices()[:1])
    assert exp8.mesh.devices.size == 8 and exp1.mesh.devices.size == 1
    initial_params = jax.device_get(exp8.state.params)
    batch = next(exp8.dataset.train_iter(0))
    batch8 = sharding.shard_batch(batch, exp8.mesh)
    state8, metrics8 = exp8.train_step(exp8.state, batch8, exp8.rngs)
    state1, metrics1 = exp1.train_step(
        exp1.state, sharding.shard_batch(batch, exp1.mesh), exp1.rngs
    )

    # Same update (BatchNorm statistics over the global batch on both meshes).
    chex.assert_trees_all_close(state8.params, state1.params, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(state8.batch_stats, state1.batch_stats, rtol=1e-4, atol=1e-5)
    assert float(metrics8.loss.compute()) == pytest.approx(float(metrics1.loss.compute()), 1e-5)
    moved = jax.tree.map(lambda a, b: not np.allclose(a, b), initial_params, state8.params)
    assert any(jax.tree.leaves(moved))

    losses = [float(metrics8.loss.compute())]
    for _ in range(7):  # the whole 8-step schedule on the same batch
        state8, step_metrics = exp8.train_step(state8, batch8, exp8.rngs)
        losses.append(float(step_metrics.loss.compute()))
    assert np.mean(losses[-3:]) < 0.85 * losses[0], losses

    eval8 = evaluate.eval_loop(exp8, state8)
    state_on_1 = jax.device_put(state8, sharding.replicated_sharding(exp1.mesh))
    eval1 = evaluate.eval_loop(exp1, state_on_1)
    assert eval8["num_examples"] == eval1["num_examples"] == 1003
    assert eval8["top1"] == eval1["top1"]
    assert eval8["loss"] == pytest.approx(eval1["loss"], rel=1e-5)


def test_same_seed_gives_identical_losses_for_20_steps(tiny_config):
    first = _losses(experiment.create_experiment(tiny_config), 20)
    second = _losses(experiment.create_experiment(tiny_config), 20)
    assert first == second
    assert len(set(first)) > 1


def test_nonfinite_step_leaves_the_state_unchanged(tiny_config):
    exp = experiment.create_experiment(tiny_config)
    batch = next(exp.dataset.train_iter(0))
    batch["image"] = batch["image"].astype(np.float32)
    batch["image"][0, 0, 0, 0] = np.nan
    before = jax.device_get((exp.state.params, exp.state.opt_state, exp.state.batch_stats))
    state, _ = exp.train_step(exp.state, sharding.shard_batch(batch, exp.mesh), exp.rngs)
    chex.assert_trees_all_equal(before, (state.params, state.opt_state, state.batch_stats))
    assert (int(state.step), int(state.nonfinite_steps), int(state.first_nonfinite_step)) == (
        1,
        1,
        0,
    )


class _EditedDataset:
    """A dataset whose train batches pass through `edit(batch, step)` (images as float32)."""

    def __init__(self, dataset, edit):
        self._dataset, self._edit, self.start_steps = dataset, edit, []

    def __getattr__(self, name):
        return getattr(self._dataset, name)

    def train_iter(self, start_step=0):
        self.start_steps.append(start_step)
        for step, batch in enumerate(self._dataset.train_iter(start_step), start_step):
            yield self._edit(batch, step)


def _wrap_dataset(monkeypatch, edit) -> list[_EditedDataset]:
    created = []

    def create_dataset(*args, **kwargs):
        created.append(_EditedDataset(data.create_dataset(*args, **kwargs), edit))
        return created[-1]

    monkeypatch.setattr(experiment, "create_dataset", create_dataset)
    return created


def _final_state(workdir) -> dict:
    steps = sorted(int(name) for name in os.listdir(workdir / "checkpoints") if name.isdigit())
    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(steps[-1]) / "state")


def test_stopped_and_resumed_run_equals_uninterrupted_run(tiny_config, tmp_path, monkeypatch):
    tiny_config.checkpoint_every_steps = 100  # only the stop and the end save

    def sigterm_at_step_4(batch, step):
        if step == 4:  # prefetched as the loop takes batch 3: the run stops after 4 steps
            os.kill(os.getpid(), signal.SIGTERM)
        return batch

    created = _wrap_dataset(monkeypatch, lambda batch, step: batch)
    train_loop.train_and_evaluate(tiny_config, str(tmp_path / "full"), run_eval=False)
    assert created[-1].start_steps == [0]

    created = _wrap_dataset(monkeypatch, sigterm_at_step_4)
    stopped = train_loop.train_and_evaluate(tiny_config, str(tmp_path / "resumed"), run_eval=False)
    assert stopped["stopped_early"] and stopped["step"] == 4
    assert os.listdir(tmp_path / "resumed" / "checkpoints") == ["4"]
    created = _wrap_dataset(monkeypatch, lambda batch, step: batch)
    resumed = train_loop.train_and_evaluate(tiny_config, str(tmp_path / "resumed"), run_eval=False)
    assert created[-1].start_steps == [4] and resumed["step"] == 8

    full, restarted = _final_state(tmp_path / "full"), _final_state(tmp_path / "resumed")
    assert int(full["step"]) == int(restarted["step"]) == 8
    chex.assert_trees_all_equal(full, restarted)


def test_nonfinite_loss_stops_and_names_the_last_good_checkpoint(
    tiny_config, tmp_path, monkeypatch, caplog
):
    tiny_config.log_every_steps, tiny_config.checkpoint_every_steps = 1, 2

    def nan_at_step_4(batch, step):
        batch = dict(batch, image=batch["image"].astype(np.float32))
        if step == 4:
            batch["image"][:] = np.nan
        return batch

    _wrap_dataset(monkeypatch, nan_at_step_4)
    message = r"in step 5 .*last good checkpoint, step 4 in .* is kept"
    with pytest.raises(FloatingPointError, match=message):
        train_loop.train_and_evaluate(tiny_config, str(tmp_path / "stop"), run_eval=False)
    assert sorted(os.listdir(tmp_path / "stop" / "checkpoints")) == ["2", "4"]

    tiny_config.skip_nonfinite_steps, tiny_config.max_nonfinite_fraction = True, 0.2
    with caplog.at_level(logging.WARNING):
        final = train_loop.train_and_evaluate(tiny_config, str(tmp_path / "skip"), run_eval=False)
    assert final["step"] == 8 and final["nonfinite_steps"] == 1
    assert any(
        m.startswith("Skipped 1 non-finite step(s) up to step 5: 1 of the run's 8 so far")
        for m in caplog.messages
    ), caplog.messages


def test_skipping_nonfinite_steps_stops_above_the_allowed_fraction(
    tiny_config, tmp_path, monkeypatch
):
    tiny_config.log_every_steps, tiny_config.skip_nonfinite_steps = 1, True

    def nan_from_step_2(batch, step):
        batch = dict(batch, image=batch["image"].astype(np.float32))
        if step >= 2:
            batch["image"][:] = np.nan
        return batch

    _wrap_dataset(monkeypatch, nan_from_step_2)
    message = (
        r"1 of the first 3 steps had a non-finite loss .* skipped: more than "
        r"config.max_nonfinite_fraction=0.05 of the run's 8 steps. Training stopped and no good "
    )
    with pytest.raises(FloatingPointError, match=message):
        train_loop.train_and_evaluate(tiny_config, str(tmp_path), run_eval=False)
    assert not (tmp_path / train_loop.FINAL_METRICS_FILE).exists()


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("global_batch_size", 12, "global_batch_size=12 is not divisible by the number of devices"),
        ("eval_batch_size", 20, "eval_batch_size=20 is not divisible by the number of devices"),
        ("model.stem", "conv9x9", r"stem='conv9x9'; choose one of \('conv7x7'"),
        ("learning_rate", -0.1, r"config.learning_rate=-0.1: must be a positive number"),
        ("label_smoothing", 2.0, r"config.label_smoothing=2.0: must be a number in \[0.0, 1.0\)"),
        ("checkpoint_every_steps", 0, "config.checkpoint_every_steps=0: must be an integer >= 1"),
        ("log_every_steps", 0, "config.log_every_steps=0: must be an integer >= 1"),
        ("global_batch_size", 0, "config.global_batch_size=0: must be an integer >= 1"),
        ("model.lambda_layer.impl", "fast", r"unknown impl 'fast'; choose one of \('einsum'"),
        ("model.lambda_layer.scope_size", 4, "scope_size must be a positive odd integer"),
        ("model.dropout_rate", 1.0, r"dropout_rate=1.0; use a rate in \[0, 1\)"),
    ],
)
def test_bad_config_fails_before_compiling(tiny_config, field, value, message, monkeypatch):
    monkeypatch.setattr(jax, "jit", None)  # nothing may be compiled before the error
    *parents, name = field.split(".")
    functools.reduce(getattr, parents, tiny_config)[name] = value
    with pytest.raises(ValueError, match=message):
        experiment.create_experiment(tiny_config)


def test_every_bad_value_is_listed_at_once(tiny_config):
    tiny_config.momentum, tiny_config.ema_decay, tiny_config.num_epochs = 1.5, -1.0, 0.0
    tiny_config.num_train_steps = -1
    with pytest.raises(ValueError, match="3 config value") as error:
        experiment.create_experiment(tiny_config)
    assert "config.momentum=1.5" in str(error.value) and "config.ema_decay=-1.0" in str(error.value)
    assert "set num_train_steps > 0 or num_epochs > 0" in str(error.value)


def test_finished_workdir_is_left_unchanged_and_another_model_keeps_its_config(
    tiny_config, tmp_path, caplog
):
    train_loop.train_and_evaluate(tiny_config, str(tmp_path), run_eval=False)
    files = {name: (tmp_path / name).read_bytes() for name in ("config.json", "final_metrics.json")}

    again = train_loop.train_and_evaluate(tiny_config, str(tmp_path), run_eval=False)
    assert again["already_finished"] and again["step"] == 8 and "train_loss" in again
    assert any(f"The run in {tmp_path} is finished at step 8" in m for m in caplog.messages)
    assert {name: (tmp_path / name).read_bytes() for name in files} == files

    tiny_config.model.base_width = 8
    tiny_config.num_train_steps = 12
    with pytest.raises(ValueError, match="does not match the model"):
        train_loop.train_and_evaluate(tiny_config, str(tmp_path), run_eval=False)
    assert (tmp_path / "config.json").read_bytes() == files["config.json"]


def _all_reduces(exp: experiment.Experiment, batch) -> int:
    hlo = exp.train_step.fn.lower(exp.state, batch, exp.rngs).compile().as_text()
    return len(re.findall(r"= [^\n]*all-reduce(?:-start)?\(", hlo))


def test_batch_norm_groups_normalise_each_group_on_its_own():
    model = models.create_model("resnet50", stage_sizes=(1, 1, 1, 1), base_width=4, num_classes=10)
    images = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))
    images = images * jnp.repeat(jnp.array([1.0, 3.0]), 4)[:, None, None, None] + 0.5
    variables = model.init(jax.random.key(1), images[:1])
    rng = jax.random.key(2)
    logits, stats = train.apply_for_training(model.apply, variables, images, rng, groups=2)

    keys = jax.random.split(rng, 2)  # naive reference: each group through the model on its own
    parts = [
        train.apply_for_training(model.apply, variables, images[4 * g : 4 * g + 4], keys[g])
        for g in range(2)
    ]
    np.testing.assert_allclose(logits, jnp.concatenate([p[0] for p in parts]), rtol=1e-5, atol=1e-5)
    mean_stats = jax.tree.map(lambda a, b: (a + b) / 2, parts[0][1], parts[1][1])
    chex.assert_trees_all_close(stats, mean_stats, rtol=1e-5, atol=1e-6)
    whole, _ = train.apply_for_training(model.apply, variables, images, rng)
    assert not np.allclose(whole, logits, atol=1e-3)  # the grouping changes the statistics
    with pytest.raises(ValueError, match="does not split into 3 BatchNorm groups"):
        train.apply_for_training(model.apply, variables, images, rng, groups=3)


def test_each_batch_norm_group_draws_its_own_dropout():
    model = models.create_model(
        "resnet50", stage_sizes=(1, 1, 1, 1), base_width=4, num_classes=10, dropout_rate=0.5
    )
    group = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    variables = model.init(jax.random.key(1), group)
    images = jnp.concatenate([group, group])
    logits, _ = train.apply_for_training(model.apply, variables, images, jax.random.key(2), 2)
    assert not np.allclose(logits[:2], logits[2:])


def test_unsynced_batch_norm_is_per_device_and_needs_no_all_reduce(tiny_config):
    tiny_config.global_batch_size = 64  # 8 examples per device
    synced = experiment.create_experiment(tiny_config)
    tiny_config.sync_batch_norm = False
    exp8 = experiment.create_experiment(tiny_config)
    exp1 = experiment.create_experiment(tiny_config, devices=jax.devices()[:1])
    batch = next(exp8.dataset.train_iter(0))
    batch8 = sharding.shard_batch(batch, exp8.mesh)
    state8, metrics8 = exp8.train_step(exp8.state, batch8, exp8.rngs)

    # The same step on one device with 8 groups of 8: per-device statistics, nothing else changes.
    step1 = jax.jit(
        functools.partial(
            train.train_step,
            learning_rate_fn=exp1.learning_rate_fn,
            preprocess_fn=exp1.dataset.device_preprocess,
            label_smoothing=tiny_config.label_smoothing,
            ema_decay=tiny_config.ema_decay,
            batch_norm_groups=8,
        )
    )
    state1, metrics1 = step1(exp1.state, sharding.shard_batch(batch, exp1.mesh), exp1.rngs)
    # Statistics over 8 examples of 2x2 and 1x1 maps have near-constant channels, which amplify
    # float32 rounding: params agree to 1e-4 (synced statistics move them by 0.17).
    chex.assert_trees_all_close(state8.params, state1.params, rtol=1e-4, atol=5e-4)
    state_synced, _ = synced.train_step(synced.state, batch8, synced.rngs)
    moved = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), state_synced.params, state8.params)
    assert max(jax.tree.leaves(moved)) > 1e-2
    chex.assert_trees_all_close(state8.batch_stats, state1.batch_stats, rtol=1e-4, atol=1e-5)
    assert float(metrics8.loss.compute()) == pytest.approx(float(metrics1.loss.compute()), 1e-5)

    # Global statistics all-reduce in every BatchNorm (17 here, forward and backward); per-device
    # ones leave only the gradient's and the metrics' all-reduces.
    assert _all_reduces(synced, batch8) >= 10
    assert _all_reduces(exp8, batch8) <= 3


def test_train_state_built_on_the_host_for_an_accelerator_equals_the_jitted_one(
    tiny_config, monkeypatch
):
    """On a GPU/TPU backend `create_train_state` initialises on the host CPU and copies the state
    to the mesh: the same values, dtypes and replicated shardings over all 8 devices."""
    model = train.create_model(tiny_config, 10)
    mesh = sharding.create_mesh()
    lr = train.create_learning_rate_fn(tiny_config, steps_per_epoch=10, num_train_steps=100)
    on_mesh = train.create_train_state(tiny_config, model, 32, lr, mesh)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    from_host = train.create_train_state(tiny_config, model, 32, lr, mesh)
    leaves, host_leaves = jax.tree.leaves(on_mesh), jax.tree.leaves(from_host)
    assert len(leaves) == len(host_leaves) > 10
    for x, y in zip(leaves, host_leaves, strict=True):
        assert (x.shape, x.dtype) == (y.shape, y.dtype)
        assert y.sharding.is_equivalent_to(sharding.replicated_sharding(mesh), y.ndim)
        assert len(y.addressable_shards) == 8
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    def no_cpu_backend(backend=None):  # JAX_PLATFORMS=cuda: the CPU backend is not there
        raise RuntimeError(f"Unknown backend {backend}")

    monkeypatch.setattr(jax, "local_devices", no_cpu_backend)
    on_devices = jax.tree.leaves(train.create_train_state(tiny_config, model, 32, lr, mesh))
    for x, y in zip(on_devices, host_leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
