"""Traced steps kept across processes: saved, loaded, keyed, replaced when unreadable."""

import json
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lambdanet import experiment, sharding, step_cache


def _step(state, batch):
    """A donated state {w, count} and a batch -> (state, {'loss': scalar})."""
    loss = jnp.mean((batch["x"] @ state["w"]) ** 2)
    grad = batch["x"].T @ batch["x"] @ state["w"]
    new = {"w": state["w"] - 0.1 * grad, "count": state["count"] + 1}
    return new, {"loss": loss}


def _cached(key="a"):
    return step_cache.CachedStep(
        jax.jit(_step, donate_argnums=0),
        lambda state, batch: (state, {"loss": 0}),
        key=dict(step="toy", config={"key": key}),
        donate_argnums=(0,),
    )


def _args():
    state = {"w": jnp.arange(12.0).reshape(4, 3) / 10, "count": jnp.int32(0)}
    return state, {"x": jnp.ones((5, 4))}


@pytest.fixture
def cache_dir(tmp_path):
    """A fresh cache directory for the traced programs (JAX's own cache stays the session's)."""
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    yield tmp_path / step_cache.TRACED_DIR
    jax.config.update("jax_compilation_cache_dir", before)


def test_a_second_step_with_the_same_key_loads_the_traced_program(cache_dir):
    expected = jax.jit(_step)(*_args())
    first = _cached()
    chex.assert_trees_all_equal(first(*_args()), expected)
    assert first.how.startswith("traced and saved to")
    (saved,) = cache_dir.iterdir()
    second = _cached()
    chex.assert_trees_all_equal(second(*_args()), expected)
    assert second.how == f"traced program loaded from {saved}"
    chex.assert_trees_all_equal(second(*_args()), expected)  # later calls: the same program
    compiled = _cached().compile(*_args())  # ahead of time, as the benchmark times it
    chex.assert_trees_all_equal(compiled(*_args()), expected)


_PROCESS = """
import json, sys
import jax
sys.path.insert(0, "tests")
import test_step_cache as t
jax.config.update("jax_compilation_cache_dir", sys.argv[1])
step = t._cached()
state, metrics = step(*t._args())
print(json.dumps(dict(how=step.how, w=state["w"].tolist(), loss=float(metrics["loss"]))))
"""


def test_a_second_process_loads_what_the_first_traced(tmp_path):
    def run():
        command = [sys.executable, "-c", _PROCESS, str(tmp_path)]
        repo = Path(__file__).resolve().parents[1]
        result = subprocess.run(command, cwd=repo, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout.splitlines()[-1])

    first, second = run(), run()
    assert first["how"].startswith("traced and saved to")
    assert second["how"].startswith("traced program loaded from")
    assert (first["w"], first["loss"]) == (second["w"], second["loss"])


def test_another_key_or_shape_names_another_program(cache_dir):
    _cached("a")(*_args())
    _cached("b")(*_args())
    state, batch = _args()
    _cached("a")(state, {"x": jnp.ones((6, 4))})
    assert len(list(cache_dir.iterdir())) == 3


def test_host_arrays_are_arguments_too(cache_dir):
    state, batch = _args()
    host = {"x": np.ones((5, 4), np.float32)}
    expected = jax.jit(_step)(*_args()[:1], host)
    chex.assert_trees_all_equal(_cached()(state, host), expected)
    chex.assert_trees_all_equal(_cached()(_args()[0], host), expected)  # loaded


def test_the_donated_state_is_consumed(cache_dir):
    for _ in range(2):  # traced, then loaded
        state, batch = _args()
        _cached()(state, batch)
        assert state["w"].is_deleted() and not batch["x"].is_deleted()


def test_an_unreadable_program_is_traced_again_and_replaced(cache_dir, caplog):
    _cached()(*_args())
    (saved,) = cache_dir.iterdir()
    saved.write_bytes(b"not a program")
    step = _cached()
    chex.assert_trees_all_equal(step(*_args()), jax.jit(_step)(*_args()))
    assert "is unreadable" in caplog.text and step.how.startswith("traced and saved")
    again = _cached()
    again(*_args())
    assert again.how.startswith("traced program loaded")


def test_without_a_cache_directory_the_step_runs_as_jitted(cache_dir):
    jax.config.update("jax_compilation_cache_dir", "")
    step = _cached()
    chex.assert_trees_all_equal(step(*_args()), jax.jit(_step)(*_args()))
    assert step.how == "traced (no cache)" and not cache_dir.exists()


def test_a_wrong_output_structure_is_named(cache_dir):
    step = step_cache.CachedStep(jax.jit(_step), lambda s, b: (s,), key=dict(step="toy"))
    with pytest.raises(ValueError, match="toy step: out_structure gives"):
        step(*_args())


def test_the_loaded_train_step_equals_the_traced_one_on_8_devices(tiny_config, cache_dir):
    """The experiment's own steps on 8 fake devices: jitted, traced and saved, then loaded."""

    def one_step(run):
        exp = experiment.create_experiment(tiny_config)
        train_step, eval_step = run(exp.train_step), run(exp.eval_step)
        batch = sharding.shard_batch(next(exp.dataset.train_iter(0)), exp.mesh)
        state, metrics = train_step(exp.state, batch, exp.rngs)
        eval_batch = sharding.shard_batch(next(exp.dataset.eval_iter()), exp.mesh)
        outputs = jax.tree.leaves((state, metrics, eval_step(state, eval_batch, exp.rngs)))
        return outputs, exp.train_step.how, exp.eval_step.how

    jitted, _, _ = one_step(lambda step: step.fn)
    saved, train_how, eval_how = one_step(lambda step: step)
    assert train_how.startswith("traced and saved") and eval_how.startswith("traced and saved")
    loaded, train_how, eval_how = one_step(lambda step: step)
    assert train_how.startswith("traced program loaded") and eval_how.startswith("traced program")
    chex.assert_trees_all_equal(saved, jitted)
    chex.assert_trees_all_equal(loaded, jitted)
    assert all(x.sharding.is_fully_replicated for x in loaded)


def test_the_key_covers_code_outside_the_package():
    files = step_cache.source_files()
    assert Path(step_cache.__file__).resolve() in files
    assert Path(__file__).resolve() in files  # e.g. a model the user's own module registers
    assert not any("site-packages" in str(f) for f in files)
