"""Subprocesses packed onto GPU slots, with a deadline: the sweep's job runner.

`run_jobs` starts each `Job` (a command, its log, its extra environment, its expected wall time)
on a free slot (a GPU index, CUDA_VISIBLE_DEVICES; a GPU given several times holds as many jobs
at once), never one expected to end after the `Stopper`'s deadline, and when the deadline passes
or a signal arrives stops those in flight: SIGTERM (lambdanet-train saves a checkpoint and exits
with EXIT_STOPPED), then SIGKILL after a grace period. A training run's log (key ("run", ...))
is appended to, so that a resumed run keeps its earlier log; any other job's log is rewritten.
"""

import dataclasses
import math
import os
import subprocess
import time
from collections.abc import Callable

from lambdanet.train_loop import EXIT_STOPPED

POLL_S = 0.5


@dataclasses.dataclass
class Job:
    """One subprocess of the sweep (a training run or a throughput measurement)."""

    key: tuple  # ("run", entry, seed) or ("throughput", entry)
    command: list[str]
    log: str  # its stdout and stderr
    env: dict  # added to the environment, with the slot's GPU
    estimate_s: Callable[[], float | None]  # its expected wall time now (None: unknown)
    finish: Callable[[float], list[dict]]  # (wall s) -> its result lines, [] if it failed


class Stopper:
    """Whether the sweep must stop: its deadline passed, or `on_signal` was called."""

    def __init__(self, deadline_s: float):
        self.deadline = time.monotonic() + deadline_s if deadline_s > 0 else math.inf
        self.signalled = False

    def on_signal(self, signum, frame) -> None:
        """A signal handler: stop now."""
        del signum, frame
        self.signalled = True

    def __call__(self) -> bool:
        return self.signalled or time.monotonic() >= self.deadline

    def fits(self, estimate: float | None) -> bool:
        """Whether a job expected to take `estimate` s (None: unknown) ends before the deadline."""
        return estimate is None or time.monotonic() + estimate <= self.deadline


def run_jobs(jobs: list[Job], slots: list[str], stop: Stopper, on_result, grace_s: float):
    """Runs `jobs`, one per slot (the GPU index it runs on) at a time, in the working directory;
    calls `on_result(line)` for each that succeeded. Returns (keys of the jobs left, logs of
    those that failed)."""
    pending, running = list(jobs), {}  # running: slot number -> (job, process, start)
    left, failed = [], []
    while pending or running:
        for slot, (job, process, start) in list(running.items()):
            if process.poll() is None:
                continue
            del running[slot]
            results = job.finish(time.monotonic() - start) if process.returncode == 0 else []
            for result in results:
                on_result(result)
            if results:
                continue
            if process.returncode == EXIT_STOPPED or stop():  # stopped by a signal
                left.append(job.key)
            else:
                failed.append(job.log)
        if stop():
            _stop_processes([process for _, process, _ in running.values()], grace_s)
            in_flight = [job for job, _, _ in running.values()]
            return left + [job.key for job in pending + in_flight], failed
        for slot in [i for i in range(len(slots)) if i not in running]:
            job = next((j for j in pending if stop.fits(j.estimate_s())), None)
            if job is None:
                break
            pending.remove(job)
            running[slot] = (job, _start(job, slots[slot]), time.monotonic())
        if pending and not running:  # none fits before the deadline
            return left + [job.key for job in pending], failed
        time.sleep(POLL_S)
    return left, failed


def _start(job: Job, gpu: str) -> subprocess.Popen:
    os.makedirs(os.path.dirname(job.log), exist_ok=True)
    mode = "a" if job.key[0] == "run" else "w"  # a resumed run keeps its earlier log
    with open(job.log, mode) as log:
        env = os.environ | {"CUDA_VISIBLE_DEVICES": gpu} | job.env
        return subprocess.Popen(job.command, env=env, stdout=log, stderr=log)


def _stop_processes(processes: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM (lambdanet.main saves a checkpoint), then SIGKILL those still alive after
    `grace_s`."""
    for process in processes:
        process.terminate()
    end = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
