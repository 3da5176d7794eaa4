"""Fault tolerance: SIGKILLed runs resume to the uninterrupted result, unfinished saves are
skipped with a warning, impossible configs fail before compiling.

The NaN/inf stop that keeps the last good checkpoint, SIGTERM resumption and the other config
errors are tested in tests/test_train.py; checkpoint mismatches in tests/test_checkpoint.py.
"""

import logging
import os
import signal

import chex
import pytest

from lambdanet import checkpoint, train
from lambdanet.data.in_memory import ArraySource
from scripts import chaos_resume


def test_sigkilled_runs_resume_to_the_uninterrupted_result(tmp_path):
    summary = chaos_resume.run_chaos(trials=2, seed=1, num_train_steps=16, workdir=tmp_path)
    assert summary["trials"] == 2 and summary["runs"] >= 1
    assert summary["corrupt_checkpoints_loaded"] == 0
    assert summary["final_param_max_abs_diff"] == 0.0
    assert summary["pass"]


def test_unfinished_save_is_skipped_with_a_warning_for_the_previous_one(
    tiny_config, tmp_path, caplog
):
    tiny_config.keep_checkpoints = 2
    train.train_and_evaluate(tiny_config, str(tmp_path), run_eval=False)
    directory = tmp_path / checkpoint.CHECKPOINT_DIR
    assert checkpoint.list_steps(str(directory)) == [4, 8]
    finished = chaos_resume.final_state(tmp_path)
    unfinished = directory / "8.orbax-checkpoint-tmp-1234"  # as a save killed before its rename
    os.rename(directory / "8", unfinished)

    caplog.set_level(logging.INFO)
    final = train.train_and_evaluate(tiny_config, str(tmp_path), run_eval=False)
    messages = [record.getMessage() for record in caplog.records]
    assert f"Ignoring and deleting the unfinished checkpoint save {unfinished}." in messages
    assert any(m.startswith("Resuming from step 4 in ") for m in messages), messages
    assert final["step"] == 8 and not unfinished.exists()
    chex.assert_trees_all_equal(chaos_resume.final_state(tmp_path), finished)


def _sigterm_then(function):
    """`function`, which first sends this process a SIGTERM."""

    def wrapped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return function(*args, **kwargs)

    return wrapped


def test_sigterm_during_a_save_stops_after_it(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "save", _sigterm_then(checkpoint.save))
    stopped = train.train_and_evaluate(tiny_config, str(tmp_path), run_eval=False)
    assert stopped["stopped_early"] and stopped["step"] == 4  # the first save, every 4 steps
    assert checkpoint.list_steps(str(tmp_path / checkpoint.CHECKPOINT_DIR)) == [4]


def test_sigterm_during_evaluation_abandons_it_and_stops(tiny_config, tmp_path, monkeypatch):
    tiny_config.eval_every_epochs = 4.5 / 93  # every 4 steps of 16 of the 1,497 digits
    monkeypatch.setattr(ArraySource, "eval_iter", _sigterm_then(ArraySource.eval_iter))
    stopped = train.train_and_evaluate(tiny_config, str(tmp_path), run_eval=True)
    assert stopped["stopped_early"] and stopped["step"] == 4
    assert not any(name.startswith("eval_") for name in stopped)
    assert checkpoint.list_steps(str(tmp_path / checkpoint.CHECKPOINT_DIR)) == [4]


def test_image_smaller_than_the_network_stride_fails_before_compiling(tiny_config):
    tiny_config.dataset.image_size = 16
    message = r"image_size=16 is smaller than the network's total stride 32 .* at least 32"
    with pytest.raises(ValueError, match=message):
        train.create_experiment(tiny_config)
