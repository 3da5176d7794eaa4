"""The integrity manifest on hand-made step directories: what `verify` reports, which step
`newest_good_step` takes, and where the save callback writes."""

import json
import os

import pytest

from lambdanet import checkpoint_integrity as integrity


def _step(directory, step: int, name: str | None = None, checksummed: bool = True) -> str:
    """DIRECTORY/STEP (or NAME) with a state and a config item (and their commit markers)."""
    step_dir = os.path.join(directory, name or str(step))
    for item, data in (("state", b"\x00\x01" * 64), ("config", b'{"model_name": "toy"}')):
        os.makedirs(os.path.join(step_dir, item, "d"))
        with open(os.path.join(step_dir, item, "d", "data"), "wb") as f:
            f.write(data)
        with open(os.path.join(step_dir, item, "commit_success.txt"), "w") as f:
            f.write("done")
    if checksummed:
        integrity.write_checksums(step_dir)
    return step_dir


def test_the_manifest_records_the_items_files_without_commit_markers(tmp_path):
    step_dir = _step(tmp_path, 3)
    with open(os.path.join(step_dir, integrity.CHECKSUM_FILE)) as f:
        recorded = json.load(f)
    files = [os.path.join(item, "d", "data") for item in ("config", "state")]
    assert sorted(recorded) == files and recorded[files[1]][0] == 128
    os.remove(os.path.join(step_dir, "state", "commit_success.txt"))  # written after the callback
    assert integrity.verify(step_dir) is None


def _remove_manifest(step_dir):
    os.remove(os.path.join(step_dir, integrity.CHECKSUM_FILE))


def _garble_manifest(step_dir):
    with open(os.path.join(step_dir, integrity.CHECKSUM_FILE), "w") as f:
        f.write("{")


def _remove_config(step_dir):
    os.remove(os.path.join(step_dir, "config", "d", "data"))


def _truncate_state(step_dir):
    os.truncate(os.path.join(step_dir, "state", "d", "data"), 7)


def _overwrite_state(step_dir):
    with open(os.path.join(step_dir, "state", "d", "data"), "r+b") as f:
        f.write(b"\xff")


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_remove_manifest, integrity.NO_CHECKSUMS),
        (_garble_manifest, f"its {integrity.CHECKSUM_FILE} is unreadable"),
        (_remove_config, "config/d/data is missing"),
        (_truncate_state, "state/d/data has 7 bytes, 128 when saved"),
        (_overwrite_state, "state/d/data differs from its SHA-256"),
    ],
)
def test_verify_says_what_is_wrong(tmp_path, damage, reason):
    step_dir = _step(tmp_path, 1)
    damage(step_dir)
    assert reason in integrity.verify(step_dir)


def test_newest_good_step_skips_damaged_steps_with_a_warning(tmp_path, caplog):
    for step in (1, 2, 3):
        _step(tmp_path, step)
    os.truncate(os.path.join(tmp_path, "3", "state", "d", "data"), 1)
    assert integrity.newest_good_step(str(tmp_path), [1, 2, 3]) == 2
    assert any(f"Skipping checkpoint step 3 in {tmp_path}: " in m for m in caplog.messages)
    os.truncate(os.path.join(tmp_path, "2", "state", "d", "data"), 1)
    os.truncate(os.path.join(tmp_path, "1", "state", "d", "data"), 1)
    assert integrity.newest_good_step(str(tmp_path), [1, 2, 3], warn=False) is None
    assert integrity.newest_good_step(str(tmp_path), []) is None


def test_steps_that_predate_checksums_give_the_newest_unverified(tmp_path, caplog):
    for step in (1, 2):
        _step(tmp_path, step, checksummed=False)
    assert integrity.newest_good_step(str(tmp_path), [1, 2]) == 2
    assert any(
        f"step 2 in {tmp_path} has no checksums.json" in m and "using it UNVERIFIED" in m
        for m in caplog.messages
    )
    with pytest.raises(integrity.UnverifiedCheckpointError, match="--require_checksums refuses"):
        integrity.newest_good_step(str(tmp_path), [1, 2], require_checksums=True)


def test_the_save_callback_checksums_the_newest_step_in_flight(tmp_path):
    _step(tmp_path, 4)
    in_flight = _step(tmp_path, 8, name="8.orbax-checkpoint-tmp-1", checksummed=False)
    integrity.checksum_newest_save(str(tmp_path))
    assert integrity.verify(in_flight) is None
