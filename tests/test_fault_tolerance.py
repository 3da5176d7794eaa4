"""Fault tolerance: SIGKILLed runs resume to the uninterrupted result, unfinished saves are
skipped with a warning, impossible configs fail before compiling.

The NaN/inf stop that keeps the last good checkpoint, SIGTERM resumption and the other config
errors are tested in tests/test_train.py; checkpoint mismatches in tests/test_checkpoint.py.
"""

import errno
import logging
import os
import signal

import chex
import orbax.checkpoint as ocp
import pytest

from lambdanet import checkpoint, experiment, train_loop
from lambdanet.data.in_memory import ArraySource
from lambdanet.tools import chaos


@pytest.mark.parametrize("corrupt", [False, True], ids=["kill", "kill_and_corrupt"])
def test_sigkilled_runs_resume_to_the_uninterrupted_result(tmp_path, corrupt):
    summary = chaos.run_chaos(
        trials=2, seed=1, num_train_steps=16, workdir=tmp_path, corrupt_checkpoints=corrupt
    )
    assert summary["trials"] == 2 and summary["runs"] >= 1
    assert sum(summary["kills_during"].values()) == 2
    assert summary["kills_during"]["start-up"] == 0  # kills are drawn over the training phase
    assert summary["corrupt_checkpoints_loaded"] == 0
    assert summary["final_param_max_abs_diff"] == 0.0
    if corrupt:  # every damaged checkpoint was skipped by the restart that found it
        assert summary["fallbacks"] == sum(summary["corruptions"].values()) >= 1
    assert summary["pass"]


def test_kills_are_classified_by_what_the_process_was_doing():
    startup = "I1201 JAX process 0 of 1\n"
    training = startup + "I1201 step 4/16 (25.0%), 2.0 steps/s\n"
    saving = training + "I1201 Saving checkpoint step 4.\n"
    saved = saving + "I1201 Checkpoint step 4 written, checksums recorded.\n"
    assert [chaos.phase_at_death(log) for log in (startup, training, saving, saved)] == [
        "start-up",
        "training",
        "save",
        "training",
    ]


def test_unfinished_save_is_skipped_with_a_warning_for_the_previous_one(
    tiny_config, tmp_path, caplog
):
    tiny_config.keep_checkpoints = 2
    train_loop.train_and_evaluate(tiny_config, str(tmp_path), run_eval=False)
    directory = tmp_path / checkpoint.CHECKPOINT_DIR
    assert checkpoint.list_steps(str(directory)) == [4, 8]
    finished = chaos.final_state(tmp_path)
    unfinished = directory / "8.orbax-checkpoint-tmp-1234"  # as a save killed before its rename
    os.rename(directory / "8", unfinished)

    caplog.set_level(logging.INFO)
    final = train_loop.train_and_evaluate(tiny_config, str(tmp_path), run_eval=False)
    messages = [record.getMessage() for record in caplog.records]
    assert f"Ignoring and deleting the unfinished checkpoint save {unfinished}." in messages
    assert any(m.startswith("Resuming from step 4 in ") for m in messages), messages
    assert final["step"] == 8 and not unfinished.exists()
    chex.assert_trees_all_equal(chaos.final_state(tmp_path), finished)


def _sigterm_then(function):
    """`function`, which first sends this process a SIGTERM."""

    def wrapped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return function(*args, **kwargs)

    return wrapped


def test_sigterm_during_a_save_stops_after_it(tiny_config, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "save", _sigterm_then(checkpoint.save))
    stopped = train_loop.train_and_evaluate(tiny_config, str(tmp_path), run_eval=False)
    assert stopped["stopped_early"] and stopped["step"] == 4  # the first save, every 4 steps
    assert checkpoint.list_steps(str(tmp_path / checkpoint.CHECKPOINT_DIR)) == [4]


def test_sigterm_during_evaluation_abandons_it_and_stops(tiny_config, tmp_path, monkeypatch):
    tiny_config.eval_every_epochs = 4.5 / 93  # every 4 steps of 16 of the 1,497 digits
    monkeypatch.setattr(ArraySource, "eval_iter", _sigterm_then(ArraySource.eval_iter))
    stopped = train_loop.train_and_evaluate(tiny_config, str(tmp_path), run_eval=True)
    assert stopped["stopped_early"] and stopped["step"] == 4
    assert not any(name.startswith("eval_") for name in stopped)
    assert checkpoint.list_steps(str(tmp_path / checkpoint.CHECKPOINT_DIR)) == [4]


def test_image_smaller_than_the_network_stride_fails_before_compiling(tiny_config):
    tiny_config.dataset.image_size = 16
    message = r"image_size=16 is smaller than the network's total stride 32 .* at least 32"
    with pytest.raises(ValueError, match=message):
        experiment.create_experiment(tiny_config)


def test_failed_asynchronous_save_stops_the_run_at_once_with_one_summary_line(
    tiny_config, tmp_path, monkeypatch
):
    """The second save's write fails with ENOSPC in orbax's background thread (injected where
    the state's files are finalised); the run stops at the next log line, not at the next save."""
    # 16 steps between saves leave the failed background save time to end on a loaded machine
    tiny_config.num_train_steps, tiny_config.checkpoint_every_steps = 64, 16
    tiny_config.log_every_steps = 1
    finalize, calls = ocp.StandardCheckpointHandler.finalize, []

    def disk_full_on_the_second_save(self, directory):
        calls.append(directory)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return finalize(self, directory)

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "finalize", disk_full_on_the_second_save)
    fed = []
    monkeypatch.setattr(
        ArraySource, "train_iter", _recording(ArraySource.train_iter, fed), raising=True
    )
    with pytest.raises(checkpoint.CheckpointSaveError) as error:
        train_loop.train_and_evaluate(tiny_config, str(tmp_path), run_eval=False)
    message = str(error.value)
    assert "\n" not in message
    assert (
        f"Saving a checkpoint in {tmp_path / 'checkpoints'} failed: no space left on device"
        in message
    )
    assert "the last good checkpoint, step 16 in " in message and "run the same command" in message
    assert len(fed) < 48  # stopped before the next save, at step 48
    assert checkpoint.list_steps(str(tmp_path / "checkpoints")) == [16]


def _recording(train_iter, fed):
    """`train_iter` that appends the index of every batch it yields to `fed`."""

    def wrapped(self, start_step=0):
        for index, batch in enumerate(train_iter(self, start_step), start_step):
            fed.append(index)
            yield batch

    return wrapped
