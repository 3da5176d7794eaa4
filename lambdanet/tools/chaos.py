"""Chaos test of resumption: SIGKILL a small training run at random times, resume, compare.

`run_chaos` trains the demo config shrunk by overrides (`--config=demo` with conv layers only,
`--config.model.placement=C,C,C,C`, base width 4, on the digits: `num_train_steps` steps of 16,
a checkpoint every 4 steps, no evaluation) once without interruption, then again in fresh
workdirs, each process killed with SIGKILL and restarted with the same command, until `trials`
kills have happened and the last run has finished. Each kill comes a random delay after the
process logged its first training step, uniform over the training phase of the uninterrupted run
(start-up, compilation included, is not drawn from), so that kills land during training and
saves. With `corrupt_checkpoints`, before every restart the newest complete checkpoint is also
damaged at random (truncating an array file, flipping 8 bytes of one, or deleting
`state/_METADATA`), and the restart must fall back to the newest good one. It checks that

* every restart resumed from the newest complete, undamaged checkpoint (orbax-finalised, with
  both items and its checksums) present when it started, or started afresh if there was none:
  else it counts a corrupt checkpoint loaded (a restart killed before it logged either is not
  judged);
* every finished run ends with the same train state (parameters, BatchNorm statistics,
  optimizer state, EMA) as the uninterrupted one, within `tolerance`;

and returns the summary: trials (kills), runs (workdirs trained to the end), resumes, kills
during start-up / training / a save (from the killed process's log: a save is in progress from
its "Saving checkpoint step N." line to its "Checkpoint step N written" line), corruptions (by
kind) and fallbacks (restarts that skipped a damaged checkpoint), corrupt_checkpoints_loaded,
final_param_max_abs_diff, seconds and pass. The runs are `python -m lambdanet.main` (the
command `lambdanet-train`); they share a persistent compilation cache and compile with
`--xla_backend_optimization_level=0`, so each takes seconds on CPU. The command line is
scripts/chaos_resume.py.
"""

import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from lambdanet import checkpoint

OVERRIDES = (
    "--mode=train",
    "--config.model.base_width=4",
    "--config.model.placement=C,C,C,C",
    "--config.global_batch_size=16",
    "--config.eval_batch_size=16",
    "--config.checkpoint_every_steps=4",
    "--config.log_every_steps=4",
    "--config.keep_checkpoints=2",
    "--require_checksums",  # a checkpoint that lost its checksums is skipped or refused
)
_RESUMED = re.compile(r"Resuming from step (\d+) in ")
_PROGRESS = re.compile(r"step \d+/\d+ \(")  # a progress line: training had started
_SAVING = re.compile(r"Saving checkpoint step (\d+)\.")
_SAVED = re.compile(r"Checkpoint step (\d+) written")
_FALLBACK = re.compile(r"Skipping checkpoint step \d+ in ")
_REFUSED = re.compile(r"FATAL Checkpoint step (\d+) in \S+ has no checksums\.json")
_LAUNCH_TIMEOUT_SEC = 600
_POLL_SEC = 0.01


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
        "--config=demo",
        f"--workdir={workdir}",
        f"--config.num_train_steps={num_train_steps}",
        *OVERRIDES,
    ]


def _launch(command: list[str], env: dict[str, str], kill_after: float | None, log_path: Path):
    """Runs `command`; if `kill_after` is given, SIGKILLs it that many seconds after its log
    shows the first training step. Returns (killed, rc, log, seconds to the first training
    step or None, seconds)."""
    start = time.perf_counter()
    training_since = None
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        while process.poll() is None and time.perf_counter() - start < _LAUNCH_TIMEOUT_SEC:
            now = time.perf_counter()
            if training_since is None and _PROGRESS.search(log_path.read_text()):
                training_since = now
            if kill_after is not None and training_since is not None:
                if now - training_since >= kill_after:
                    break
            time.sleep(_POLL_SEC)
        killed = process.poll() is None
        if killed:
            process.send_signal(signal.SIGKILL)
        process.wait()
    to_training = None if training_since is None else training_since - start
    return (
        killed,
        process.returncode,
        log_path.read_text(),
        to_training,
        time.perf_counter() - start,
    )


def phase_at_death(log: str) -> str:
    """What a killed process was doing, from its log: 'save' (a save started and not written),
    'training' (after its first training step) or 'start-up'."""
    saving = [int(m.group(1)) for m in _SAVING.finditer(log)]
    saved = {int(m.group(1)) for m in _SAVED.finditer(log)}
    if saving and saving[-1] not in saved:
        return "save"
    return "training" if _PROGRESS.search(log) else "start-up"


def complete_steps(directory: Path) -> list[int]:
    """Steps whose directory orbax has finalised and that hold both items (state, config) and
    their checksums."""
    return sorted(
        step
        for step in ocp.path.step.checkpoint_steps(directory)
        if all((directory / str(step) / item).is_dir() for item in ("state", "config"))
        and (directory / str(step) / checkpoint.CHECKSUM_FILE).is_file()
    )


def _array_file(step_dir: Path, rng: random.Random) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    return rng.choice(sorted(files))


def corrupt(step_dir: Path, rng: random.Random) -> str:
    """Damages the checkpoint in `step_dir` at random; returns how ('truncate', 'flip_bytes',
    'delete_metadata' or 'delete_checksums': its checksums.json deleted and 8 bytes flipped, an
    unverifiable checkpoint that `--require_checksums` must not load)."""
    kind = rng.choice(["truncate", "flip_bytes", "delete_metadata", "delete_checksums"])
    if kind == "delete_metadata":
        (step_dir / "state" / "_METADATA").unlink()
        return kind
    if kind == "delete_checksums":
        (step_dir / checkpoint.CHECKSUM_FILE).unlink()
    path = _array_file(step_dir, rng)
    size = path.stat().st_size
    if kind == "truncate":
        os.truncate(path, rng.randrange(size))
        return kind
    with open(path, "r+b") as f:
        offset = rng.randrange(max(size - 8, 1))
        f.seek(offset)
        data = f.read(8)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))
    return kind


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
    corrupt_checkpoints: bool = False,
) -> dict:
    """Runs the chaos test (see the module docstring) in `workdir` (default a temporary one);
    returns the summary."""
    start = time.perf_counter()
    rng = random.Random(seed)
    root = Path(workdir or tempfile.mkdtemp(prefix="chaos_resume_"))
    root.mkdir(parents=True, exist_ok=True)
    env = _environment(str(root / "jax_cache"), devices)
    kills_during = {"start-up": 0, "training": 0, "save": 0}
    summary = dict(trials=trials, runs=0, resumes=0, kills_during=kills_during)
    if corrupt_checkpoints:
        summary |= dict(corruptions={}, fallbacks=0, refused_unverified=0)
    summary |= dict(corrupt_checkpoints_loaded=0, final_param_max_abs_diff=0.0)

    reference = root / "uninterrupted"
    _, rc, log, to_training, duration = _launch(
        _command(reference, num_train_steps), env, None, root / "ref.log"
    )
    if rc != 0 or to_training is None:
        raise RuntimeError(f"the uninterrupted run failed (exit code {rc}):\n{log[-3000:]}")
    training_duration = duration - to_training
    expected = final_state(reference)

    kills, launches = 0, 0
    while kills < trials:
        run_dir = root / f"run{summary['runs']}"
        directory = run_dir / checkpoint.CHECKPOINT_DIR
        damaged = {}  # step -> inode of the damaged step directory
        while True:
            complete = complete_steps(directory) if directory.is_dir() else []
            if corrupt_checkpoints and complete and launches and kills:
                kind = corrupt(directory / str(complete[-1]), rng)
                summary["corruptions"][kind] = summary["corruptions"].get(kind, 0) + 1
                damaged[complete[-1]] = (directory / str(complete[-1])).stat().st_ino
            good = [
                step
                for step in complete
                if damaged.get(step) != (directory / str(step)).stat().st_ino
            ]
            kill_after = rng.uniform(0.0, training_duration) if kills < trials else None
            launches += 1
            command = _command(run_dir, num_train_steps)
            killed, rc, log, to_training, seconds = _launch(
                command, env, kill_after, root / f"{launches}.log"
            )
            summary["resumes"] += bool(_RESUMED.search(log))
            summary["corrupt_checkpoints_loaded"] += _corrupt_resume(log, good)
            if corrupt_checkpoints:
                summary["fallbacks"] += bool(_FALLBACK.search(log))
            if killed:
                kills += 1
                kills_during[phase_at_death(log)] += 1
                continue
            refused = _REFUSED.search(log) if rc == 1 else None
            if corrupt_checkpoints and refused:  # its only checkpoint is unverifiable
                summary["refused_unverified"] += 1
                shutil.rmtree(directory / refused.group(1))
                continue
            if rc != 0:
                raise RuntimeError(f"run {run_dir} failed (exit code {rc}):\n{log[-3000:]}")
            if not complete and to_training is not None:  # a whole run, with a warm cache
                training_duration = min(training_duration, seconds - to_training)
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
