"""Checkpoints: keep the last k and the best, resolve --checkpoint, refuse other architectures."""

import os

import jax.numpy as jnp
import ml_collections
import optax
import pytest

from lambdanet import checkpoint, checkpoint_integrity, train, train_loop

CONFIG = ml_collections.ConfigDict(dict(model_name="toy"))


def _state(step: int, width: int = 4, extra: bool = False) -> train.TrainState:
    params = {
        "conv": {"kernel": jnp.full((3, 3, 2, width), float(step))},
        "bn": {"scale": jnp.ones(2)},
    }
    if extra:
        params["head"] = {"kernel": jnp.ones((width, 10))}
    return train.TrainState.create(
        apply_fn=None,
        params=params,
        tx=optax.sgd(0.1, momentum=0.9),
        batch_stats={"bn": {"mean": jnp.zeros(2)}},
        ema_params=None,
        nonfinite_steps=jnp.zeros((), jnp.int32),
        first_nonfinite_step=jnp.full((), -1, jnp.int32),
    ).replace(step=jnp.asarray(step, jnp.int32))


@pytest.fixture
def workdir(tmp_path):
    """A workdir with steps 1..6 saved (keep 2); steps 2 and 4 were evaluated (top-1 0.9, 0.5)."""
    manager = checkpoint.create_checkpoint_manager(tmp_path / checkpoint.CHECKPOINT_DIR, 2)
    for step in range(1, 7):
        metrics = {2: {"top1": 0.9}, 4: {"top1": 0.5}}.get(step)
        checkpoint.save(manager, _state(step), CONFIG, metrics)
    manager.close()
    return tmp_path


def test_keeps_the_last_k_and_the_best(workdir):
    assert checkpoint.list_steps(workdir / checkpoint.CHECKPOINT_DIR) == [2, 5, 6]


def test_a_reopened_manager_ranks_by_the_saved_metrics(workdir):
    """A better step (10, top-1 0.95) replaces the best (2, 0.9); reopened, the manager still
    knows step 10 is the best and keeps it past the next saves."""
    manager = checkpoint.create_checkpoint_manager(workdir / "checkpoints", 2)
    for step, metrics in [(7, None), (8, {"top1": 0.3}), (9, None), (10, {"top1": 0.95})]:
        checkpoint.save(manager, _state(step), CONFIG, metrics)
        manager.wait_until_finished()
    assert sorted(manager.all_steps()) == [9, 10]
    manager.close()
    manager = checkpoint.create_checkpoint_manager(workdir / "checkpoints", 2)
    for step in (11, 12):
        checkpoint.save(manager, _state(step), CONFIG, None)
        manager.wait_until_finished()
    assert sorted(manager.all_steps()) == [10, 11, 12]
    manager.close()


def test_resume_keeps_the_best_of_the_earlier_run(workdir):
    manager = checkpoint.create_checkpoint_manager(workdir / "checkpoints", 2)
    checkpoint.save(manager, _state(7), CONFIG, None)
    manager.wait_until_finished()
    assert sorted(manager.all_steps()) == [2, 6, 7]
    manager.close()


def test_restores_the_saved_state(workdir):
    manager = checkpoint.create_checkpoint_manager(workdir / "checkpoints", read_only=True)
    restored = checkpoint.restore(manager, 5, _state(0))
    assert int(restored.step) == 5
    assert float(restored.params["conv"]["kernel"][0, 0, 0, 0]) == 5.0
    assert restored.opt_state[0].trace["conv"]["kernel"].shape == (3, 3, 2, 4)


def test_resolves_latest_step_and_paths(workdir):
    directory = os.path.abspath(workdir / checkpoint.CHECKPOINT_DIR)
    assert checkpoint.resolve_checkpoint(str(workdir)) == (directory, 6)
    assert checkpoint.resolve_checkpoint(str(workdir), "2") == (directory, 2)
    assert checkpoint.resolve_checkpoint("elsewhere", str(workdir)) == (directory, 6)
    assert checkpoint.resolve_checkpoint("elsewhere", directory) == (directory, 6)
    assert checkpoint.resolve_checkpoint("elsewhere", os.path.join(directory, "5")) == (
        directory,
        5,
    )


@pytest.mark.parametrize(
    "ref, message",
    [
        ("3", r"Checkpoint step 3 does not exist; in .*checkpoints available steps: \[2, 5, 6\]"),
        ("no/such/dir", r"no/such/dir does not exist; in .*available steps: \[2, 5, 6\]"),
    ],
)
def test_missing_step_or_path_lists_the_available_steps(workdir, ref, message):
    with pytest.raises(ValueError, match=message):
        checkpoint.resolve_checkpoint(str(workdir), ref)


def test_empty_workdir_says_there_is_nothing_to_evaluate(tmp_path):
    with pytest.raises(ValueError, match="No checkpoint to evaluate; .* holds no complete"):
        checkpoint.resolve_checkpoint(str(tmp_path))


def test_unfinished_save_is_not_listed(workdir):
    os.makedirs(workdir / checkpoint.CHECKPOINT_DIR / "7.orbax-checkpoint-tmp-1234" / "state")
    assert checkpoint.resolve_checkpoint(str(workdir))[1] == 6


def test_other_architecture_lists_the_mismatched_parameters(workdir):
    manager = checkpoint.create_checkpoint_manager(workdir / "checkpoints", read_only=True)
    with pytest.raises(ValueError) as error:
        checkpoint.restore(manager, 6, _state(0, width=8, extra=True))
    message = str(error.value)
    assert "written by model_name='toy'" in message
    assert "params/conv/kernel: checkpoint (3, 3, 2, 4) vs model (3, 3, 2, 8)" in message
    assert "opt_state/0/trace/conv/kernel: checkpoint (3, 3, 2, 4)" in message
    assert "params/head/kernel: only in the model" in message
    assert "params/bn/scale" not in message


def test_scanned_model_against_unrolled_checkpoint_names_scan_blocks(workdir):
    manager = checkpoint.create_checkpoint_manager(workdir / "checkpoints", read_only=True)
    state = _state(0)
    scanned = state.replace(params={"c3_scan2_3": state.params["conv"], "bn": state.params["bn"]})
    with pytest.raises(ValueError, match=r"set config.model.scan_blocks as the checkpoint"):
        checkpoint.restore(manager, 6, scanned)
    with pytest.raises(ValueError) as error:  # other mismatches keep the plain message
        checkpoint.restore(manager, 6, _state(0, width=8, extra=True))
    assert "scan_blocks" not in str(error.value)


def _save_weights_only(directory, state) -> None:
    """A {'params', 'batch_stats'} checkpoint at step 0, as scripts/convert_timm.py writes."""
    import orbax.checkpoint as ocp

    manager = checkpoint.create_checkpoint_manager(directory / checkpoint.CHECKPOINT_DIR)
    weights = {"params": state.params, "batch_stats": state.batch_stats}
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(weights), config=ocp.args.JsonSave({"model_name": "toy"})
    )
    manager.save(0, args=args)
    manager.wait_until_finished()
    manager.close()


def test_weights_only_checkpoint_restores_params_with_a_fresh_optimizer(tmp_path):
    _save_weights_only(tmp_path, _state(7))
    manager = checkpoint.create_checkpoint_manager(tmp_path / "checkpoints", read_only=True)
    restored = checkpoint.restore(manager, 0, _state(0))
    assert float(restored.params["conv"]["kernel"][0, 0, 0, 0]) == 7.0
    assert int(restored.step) == 0
    assert float(jnp.abs(restored.opt_state[0].trace["conv"]["kernel"]).max()) == 0.0
    with pytest.raises(ValueError, match=r"params/conv/kernel: checkpoint \(3, 3, 2, 4\)"):
        checkpoint.restore(manager, 0, _state(0, width=8))


def test_init_from_takes_the_weights_of_a_full_checkpoint(workdir):
    state = train_loop._init_from(str(workdir), _state(0))  # latest step, 6
    assert float(state.params["conv"]["kernel"][0, 0, 0, 0]) == 6.0
    assert int(state.step) == 0
    state = train_loop._init_from(str(workdir / "checkpoints" / "5"), _state(0))
    assert float(state.params["conv"]["kernel"][0, 0, 0, 0]) == 5.0


def _largest_array_file(step_dir) -> str:
    files = [os.path.join(r, n) for r, _, names in os.walk(step_dir / "state") for n in names]
    return max((f for f in files if os.sep + "d" + os.sep in f), key=os.path.getsize)


def _truncate(step_dir):
    path = _largest_array_file(step_dir)
    os.truncate(path, os.path.getsize(path) // 2)


def _flip_bytes(step_dir):
    path = _largest_array_file(step_dir)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        data = f.read(8)
        f.seek(-len(data), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in data))


def _random_bytes(step_dir):
    path = _largest_array_file(step_dir)
    size = os.path.getsize(path)
    with open(path, "wb") as f:
        f.write(os.urandom(size))


def _delete_metadata(step_dir):
    os.remove(step_dir / "state" / "_METADATA")


@pytest.mark.parametrize(
    "corrupt, reason",
    [
        (_truncate, "truncated"),
        (_flip_bytes, "differs from its SHA-256"),
        (_random_bytes, "differs from its SHA-256"),
        (_delete_metadata, "state/_METADATA is missing"),
    ],
)
def test_corrupt_newest_checkpoint_falls_back_to_the_newest_good_one(
    workdir, corrupt, reason, caplog
):
    directory = workdir / checkpoint.CHECKPOINT_DIR
    assert checkpoint.verify(str(directory / "6")) is None
    corrupt(directory / "6")
    assert reason in checkpoint.verify(str(directory / "6"))

    assert checkpoint.resolve_checkpoint(str(workdir))[1] == 5  # eval-only: the latest good
    assert any(f"Skipping checkpoint step 6 in {directory}: " in m for m in caplog.messages)
    with pytest.raises(ValueError, match=f"Checkpoint step 6 is corrupt: .*{reason}"):
        checkpoint.resolve_checkpoint(str(workdir), "6")

    manager = checkpoint.create_checkpoint_manager(directory, 2)
    assert checkpoint.resume_step(manager) == 5  # and step 6 is deleted, to be saved again
    restored = checkpoint.restore(manager, 5, _state(0))
    assert float(restored.params["conv"]["kernel"][0, 0, 0, 0]) == 5.0
    checkpoint.save(manager, _state(6), CONFIG)
    manager.close()
    assert checkpoint.list_steps(str(directory))[-2:] == [5, 6]
    assert checkpoint.verify(str(directory / "6")) is None


def test_checkpoints_without_checksums_load_unverified_with_a_warning_or_are_refused(
    workdir, caplog
):
    directory = workdir / checkpoint.CHECKPOINT_DIR
    for step in (2, 5, 6):
        os.remove(directory / str(step) / checkpoint.CHECKSUM_FILE)
    _flip_bytes(directory / "6")  # unnoticed without checksums
    assert checkpoint.resolve_checkpoint(str(workdir))[1] == 6
    plainly = f"Checkpoint step 6 in {directory} has no checksums.json (it predates them or "
    assert any(
        m.startswith(plainly)
        and "a damaged byte in it would load unnoticed; using it UNVERIFIED" in m
        for m in caplog.messages
    )
    refused = "--require_checksums refuses it; nothing was changed. Run without"
    for ref in ("", "6"):
        with pytest.raises(checkpoint_integrity.UnverifiedCheckpointError, match=refused):
            checkpoint.resolve_checkpoint(str(workdir), ref, require_checksums=True)
    manager = checkpoint.create_checkpoint_manager(directory, 2)
    with pytest.raises(checkpoint_integrity.UnverifiedCheckpointError, match=refused):
        checkpoint.resume_step(manager, require_checksums=True)
    assert checkpoint.list_steps(str(directory)) == [2, 5, 6]
    manager.close()


def test_a_checkpoint_that_does_not_read_says_which_and_what_to_do(workdir, monkeypatch):
    """Damage that no checksum caught (none recorded) and the files' format did: tensorstore's
    error, as orbax raises it (a ValueError), names the step and the fix."""
    directory = workdir / checkpoint.CHECKPOINT_DIR
    manager = checkpoint.create_checkpoint_manager(directory, 2, read_only=True)
    error = ValueError('DATA_LOSS: Error reading "params.conv.kernel/.zarray"\nmore')
    monkeypatch.setattr(manager, "restore", lambda *a, **k: (_ for _ in ()).throw(error))
    with pytest.raises(ValueError) as raised:
        checkpoint.restore(manager, 6, _state(0))
    assert str(raised.value) == (
        f"Checkpoint step 6 in {directory} does not restore (DATA_LOSS: Error reading "
        '"params.conv.kernel/.zarray"): it is damaged; nothing was changed. Delete '
        f"{directory / '6'} to use the step before it, or use another --workdir."
    )
    manager.close()
