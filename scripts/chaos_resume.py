"""Chaos test of resumption: SIGKILL a small training job at random times, resume, compare.

    python scripts/chaos_resume.py --trials=20 --seed=0

Trains the demo config shrunk by flags (a conv ResNet of base width 4 on the digits, 48 steps of
16, a checkpoint every 4 steps, no evaluation) once without interruption, then again in fresh
workdirs, each process killed with SIGKILL after a random delay (uniform over the duration of
a whole run, measured) and restarted with the same command, until `--trials` kills have happened and
the last run has finished. It checks that

* every restart resumed from the latest checkpoint that was complete (orbax-finalised, with
  all its items) when the previous process died, or started afresh if there was none: else it
  counts a corrupt checkpoint loaded (a restart killed before it logged either is not judged);
* every finished run ends with the same train state (parameters, BatchNorm statistics,
  optimizer state, EMA) as the uninterrupted one, within `--tolerance`;

and prints one JSON line: trials (kills), runs (workdirs trained to the end), resumes,
kills_during_save (a kill that left an unfinished save behind), corrupt_checkpoints_loaded,
final_param_max_abs_diff, seconds and pass. The subprocesses share a persistent compilation
cache and compile with `--xla_backend_optimization_level=0`, so each run takes seconds on CPU.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lambdanet import checkpoint  # noqa: E402

OVERRIDES = (
    "--mode=train",
    "--config.model_name=resnet50",
    "--config.model.base_width=4",
    "--config.model.placement=C,C,C,C",
    "--config.global_batch_size=16",
    "--config.eval_batch_size=16",
    "--config.checkpoint_every_steps=4",
    "--config.log_every_steps=4",
    "--config.keep_checkpoints=2",
)
_RESUMED = re.compile(r"Resuming from step (\d+) in ")
_PROGRESS = re.compile(r"step \d+/\d+ \(")  # a progress line: training had started
_LAUNCH_TIMEOUT_SEC = 600


def _environment(cache_dir: str, devices: int) -> dict[str, str]:
    """The parent's environment with `devices` CPU devices, fast compiles and a shared cache."""
    xla_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    xla_flags += [
        f"--xla_force_host_platform_device_count={devices}",
        "--xla_backend_optimization_level=0",
    ]
    return dict(
        os.environ,
        XLA_FLAGS=" ".join(xla_flags),
        JAX_COMPILATION_CACHE_DIR=cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )


def _command(workdir: Path, num_train_steps: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lambdanet.main",
        "--config=configs/demo.py",
        f"--workdir={workdir}",
        f"--config.num_train_steps={num_train_steps}",
        *OVERRIDES,
    ]


def _launch(command: list[str], env: dict[str, str], kill_after: float | None, log_path: Path):
    """Runs `command`, SIGKILLed after `kill_after` seconds if given; returns (killed, rc, log,
    seconds)."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=log)
        try:
            process.wait(timeout=kill_after or _LAUNCH_TIMEOUT_SEC)
            killed = False
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
            killed = kill_after is not None
    return killed, process.returncode, log_path.read_text(), time.perf_counter() - start


def complete_steps(directory: Path) -> list[int]:
    """Steps whose directory orbax has finalised and that hold both items (state, config)."""
    return sorted(
        step
        for step in ocp.path.step.checkpoint_steps(directory)
        if all((directory / str(step) / item).is_dir() for item in ("state", "config"))
    )


def final_state(workdir: Path) -> dict:
    """The train state of the latest checkpoint in `workdir`, as numpy arrays."""
    directory = workdir / checkpoint.CHECKPOINT_DIR
    step = complete_steps(directory)[-1]
    return ocp.StandardCheckpointer().restore(directory / str(step) / "state")


def max_abs_diff(a: dict, b: dict) -> float:
    """The largest |a - b| over all array leaves; inf if the trees differ in structure."""
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    if tree_a != tree_b:
        return float("inf")
    diffs = [
        np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)), initial=0.0)
        for x, y in zip(leaves_a, leaves_b, strict=True)
    ]
    return float(max(diffs, default=0.0))


def _corrupt_resume(log: str, complete: list[int]) -> bool:
    """Whether the run that wrote `log` did not resume from the latest of the `complete` steps
    (or did not start afresh when there were none); False if it died before deciding."""
    resumed = _RESUMED.search(log)
    if resumed is not None:
        return not complete or int(resumed.group(1)) != complete[-1]
    return bool(complete) and _PROGRESS.search(log) is not None


def run_chaos(
    trials: int,
    seed: int = 0,
    num_train_steps: int = 48,
    devices: int = 1,
    tolerance: float = 1e-6,
    workdir: str | None = None,
) -> dict:
    """Runs the chaos test (see the module docstring) in `workdir` (default a temporary one);
    returns the summary."""
    start = time.perf_counter()
    rng = random.Random(seed)
    root = Path(workdir or tempfile.mkdtemp(prefix="chaos_resume_"))
    root.mkdir(parents=True, exist_ok=True)
    env = _environment(str(root / "jax_cache"), devices)
    summary = dict(trials=trials, runs=0, resumes=0, kills_during_save=0)
    summary |= dict(corrupt_checkpoints_loaded=0, final_param_max_abs_diff=0.0)

    reference = root / "uninterrupted"
    _, rc, log, duration = _launch(
        _command(reference, num_train_steps), env, None, root / "ref.log"
    )
    if rc != 0:
        raise RuntimeError(f"the uninterrupted run failed (exit code {rc}):\n{log[-3000:]}")
    expected = final_state(reference)

    kills, launches = 0, 0
    while kills < trials:
        run_dir = root / f"run{summary['runs']}"
        directory = run_dir / checkpoint.CHECKPOINT_DIR
        while True:
            complete = complete_steps(directory) if directory.is_dir() else []
            kill_after = rng.uniform(0.0, duration) if kills < trials else None
            launches += 1
            command = _command(run_dir, num_train_steps)
            killed, rc, log, seconds = _launch(command, env, kill_after, root / f"{launches}.log")
            summary["resumes"] += bool(_RESUMED.search(log))
            summary["corrupt_checkpoints_loaded"] += _corrupt_resume(log, complete)
            if killed:
                kills += 1
                summary["kills_during_save"] += bool(checkpoint.unfinished_saves(str(directory)))
                continue
            if rc != 0:
                raise RuntimeError(f"run {run_dir} failed (exit code {rc}):\n{log[-3000:]}")
            if not complete:  # a whole run with a warm compilation cache: kill within its time
                duration = min(duration, seconds)
            break
        summary["runs"] += 1
        diff = max_abs_diff(final_state(run_dir), expected)
        summary["final_param_max_abs_diff"] = max(summary["final_param_max_abs_diff"], diff)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    summary["pass"] = (
        summary["corrupt_checkpoints_loaded"] == 0
        and summary["final_param_max_abs_diff"] <= tolerance
    )
    return summary


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags; defined only when run as a script, so tests can import the module."""
    flags.DEFINE_integer("trials", 20, "Number of SIGKILLs.")
    flags.DEFINE_integer("seed", 0, "Seed of the kill times.")
    flags.DEFINE_integer("num_train_steps", 48, "Training steps of each run.")
    flags.DEFINE_integer("devices", 1, "CPU devices of each run (the same for all runs).")
    flags.DEFINE_float("tolerance", 1e-6, "Largest final-state difference that passes.")
    flags.DEFINE_string("workdir", None, "Where runs and logs go (default: a temporary dir).")


def main(argv: list[str]) -> None:
    del argv
    summary = run_chaos(
        FLAGS.trials,
        FLAGS.seed,
        FLAGS.num_train_steps,
        FLAGS.devices,
        FLAGS.tolerance,
        FLAGS.workdir,
    )
    print(json.dumps(summary))
    sys.exit(0 if summary["pass"] else 1)


if __name__ == "__main__":
    define_flags()
    app.run(main)
