"""One run per workdir: an exclusive lock on WORKDIR/lock, held for the run's lifetime.

The lock is an advisory `fcntl.flock` on the file, which the operating system releases when the
holder exits, however it exits (kill -9 included); the file names the holder (host, pid, start
time) for the error a second run gets. A holder that ended without emptying the file (killed)
left a stale record: the next run takes the lock over with a warning naming it. On several
hosts only process 0 takes the lock. flock works on local file systems and on NFS (Linux turns
it into a POSIX byte-range lock there).
"""

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator

from absl import logging

LOCK_FILE = "lock"


class WorkdirLockedError(RuntimeError):
    """Another live process holds the workdir's lock."""


def _holder(record: str) -> str:
    try:
        info = json.loads(record)
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError):
        return "an unknown process"


def _take(fd: int, workdir: str, path: str) -> None:
    """Takes the flock on `fd`, warning about a stale record; WorkdirLockedError if held."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(os.pread(fd, 4096, 0).decode(errors="replace"))
        raise WorkdirLockedError(
            f"Workdir {workdir} is in use by another run ({holder}; lock file {path}). "
            "Wait for it to finish or stop it (it checkpoints on SIGTERM), or use another "
            "--workdir."
        ) from None
    stale = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if stale:
        logging.warning(
            "Taking over the lock of workdir %s from a run that ended without releasing it (%s).",
            workdir,
            _holder(stale),
        )


def _write_record(fd: int) -> None:
    """Names this process (host, pid, start time) in the lock file, for a second run's error."""
    record = dict(
        host=socket.gethostname(),
        pid=os.getpid(),
        started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    os.fsync(fd)


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
    """Holds WORKDIR/lock until the block ends; WorkdirLockedError if a live process holds it.

    A workdir this call created and that holds nothing but the lock at the end (a run that
    failed at its start) is removed."""
    created = not os.path.isdir(workdir)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _take(fd, workdir, path)
        _write_record(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # an empty file: released, not stale
            if created and os.listdir(workdir) == [LOCK_FILE]:
                os.unlink(path)  # still locked: no other run took this workdir meanwhile
                os.rmdir(workdir)
    finally:
        os.close(fd)  # releases the flock
