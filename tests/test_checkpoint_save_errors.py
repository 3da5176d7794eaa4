"""The one line a failed checkpoint save stops the run with."""

import errno
import os

from lambdanet import checkpoint_save_errors


class _Manager:
    """What `checkpoint_save_errors` reads of an orbax CheckpointManager."""

    def __init__(self, directory, steps):
        self.directory, self._steps = directory, steps

    def all_steps(self):
        return self._steps


def test_a_full_disk_before_any_checkpoint_names_none_kept(tmp_path):
    error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    message = str(checkpoint_save_errors.save_error(_Manager(tmp_path, []), error))
    assert message == (
        f"Saving a checkpoint in {tmp_path} failed: no space left on device ([Errno 28] "
        f"{os.strerror(errno.ENOSPC)}); no good checkpoint has been saved yet. To resume, free "
        "space on that file system or move the workdir, then run the same command."
    )


def test_other_errors_are_named_by_type_with_the_size_only_for_a_full_disk(tmp_path):
    os.makedirs(tmp_path / "2" / "state")
    (tmp_path / "2" / "state" / "data").write_bytes(b"\0" * 2**20)
    manager = _Manager(tmp_path, [2])
    message = str(checkpoint_save_errors.save_error(manager, ValueError("bad\nmore")))
    assert f"failed: ValueError (bad); the last good checkpoint, step 2 in {tmp_path}" in message
    assert "To resume, fix the cause, then" in message
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, "quota")
    message = str(checkpoint_save_errors.save_error(manager, wrapped))
    assert "free space on that file system (a checkpoint takes 1.0 MiB)" in message
