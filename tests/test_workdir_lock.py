"""One run per workdir: a second process is refused with the holder named; a killed holder's
lock is taken over with a warning."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from lambdanet import train_loop, workdir_lock

REPO = Path(__file__).resolve().parents[1]
_HOLD = (
    "import sys, time; from lambdanet import workdir_lock\n"
    "with workdir_lock.hold(sys.argv[1]):\n"
    "    print('locked', flush=True); time.sleep(600)\n"
)


@pytest.fixture
def holder(tmp_path):
    """Another process that holds the lock of `tmp_path / 'run'` until killed."""
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(tmp_path / "run")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "locked"
    yield process
    process.kill()
    process.wait()


def test_second_run_on_a_workdir_is_refused_and_names_the_holder(tiny_config, tmp_path, holder):
    workdir = tmp_path / "run"
    message = rf"Workdir {workdir} is in use by another run \(pid {holder.pid} on host .*--workdir"
    with pytest.raises(workdir_lock.WorkdirLockedError, match=message):
        train_loop.train_and_evaluate(tiny_config, str(workdir), run_eval=False)
    assert sorted(os.listdir(workdir)) == [workdir_lock.LOCK_FILE]  # nothing else was written


def test_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path, holder, caplog):
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with workdir_lock.hold(str(tmp_path / "run")):
        assert str(os.getpid()) in (tmp_path / "run" / workdir_lock.LOCK_FILE).read_text()
    assert any(
        f"from a run that ended without releasing it (pid {holder.pid}" in m
        for m in caplog.messages
    )
    assert (tmp_path / "run" / workdir_lock.LOCK_FILE).read_text() == ""
    with workdir_lock.hold(str(tmp_path / "run")):  # released: no warning this time
        pass
    assert sum("Taking over" in m for m in caplog.messages) == 1
