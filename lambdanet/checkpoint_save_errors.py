"""A checkpoint save that fails, or would: one line that says why, what is kept and what to do.

Before a save starts, `check_free_space` refuses it when the file system lacks room for one more
checkpoint the size of the newest; a save that fails (then, or later in orbax's background
thread) becomes a `CheckpointSaveError` through `save_error`. Both name the last good checkpoint
(`last_good`, verified by `lambdanet.checkpoint_integrity`), which a resumed run starts from.
"""

import errno
import os
import shutil

import orbax.checkpoint as ocp

from lambdanet import checkpoint_integrity


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be saved; the message says why, what is kept and what to do."""


def _step_path(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(manager.directory), str(step))


def _size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, n)) for r, _, names in os.walk(path) for n in names)


def _newest_size(manager: ocp.CheckpointManager) -> str:
    """' (a checkpoint takes N MiB)', the size of the newest step, or '' if there is none."""
    steps = sorted(manager.all_steps())
    if not steps:
        return ""
    return f" (a checkpoint takes {_size(_step_path(manager, steps[-1])) / 2**20:.1f} MiB)"


def last_good(manager: ocp.CheckpointManager) -> str:
    """'the last good checkpoint, step N in DIR, is kept', of a verified step, or that there is
    none."""
    steps = sorted(manager.all_steps())
    good = checkpoint_integrity.newest_good_step(str(manager.directory), steps, warn=False)
    if good is None:
        return "no good checkpoint has been saved yet"
    return f"the last good checkpoint, step {good} in {manager.directory}, is kept"


def _no_space(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "no space left on device" in str(error).lower():
            return True
        error = error.__cause__ or error.__context__
    return False


def save_error(manager: ocp.CheckpointManager, error: BaseException) -> CheckpointSaveError:
    """The one-line CheckpointSaveError for `error`, raised by a save to `manager`'s directory."""
    cause = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    fix = (
        f"free space on that file system{_newest_size(manager)} or move the workdir"
        if _no_space(error)
        else "fix the cause"
    )
    what = "no space left on device" if _no_space(error) else type(error).__name__
    return CheckpointSaveError(
        f"Saving a checkpoint in {manager.directory} failed: {what} ({cause}); "
        f"{last_good(manager)}. To resume, {fix}, then run the same command."
    )


def check_free_space(manager: ocp.CheckpointManager, step: int) -> None:
    """CheckpointSaveError if the file system lacks room for one more checkpoint the size of
    the newest (the old ones are deleted only once the new one is complete)."""
    steps = sorted(manager.all_steps())
    if not steps:
        return
    needed = _size(_step_path(manager, steps[-1]))
    free = shutil.disk_usage(manager.directory).free
    if free < needed:
        error = OSError(
            errno.ENOSPC, f"step {step} needs {needed / 2**20:.1f} MiB, {free / 2**20:.1f} free"
        )
        raise save_error(manager, error)
