"""When training stops early: SIGTERM/SIGINT, a preemption notice, non-finite steps.

A step whose loss or gradients are not finite leaves the state unchanged and is counted
(`lambdanet.train.train_step`). Training then stops with a message naming the step and the last
good checkpoint, unless `config.skip_nonfinite_steps` is set: then every log line with new
skipped steps warns, and training stops once more than `config.max_nonfinite_fraction` of the
run's steps were skipped.
"""

import contextlib
import math
import signal
import threading
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
from absl import logging
from jax.experimental import multihost_utils

from lambdanet import checkpoint
from lambdanet.train import TrainState


@contextlib.contextmanager
def stop_requested_by_signal() -> Iterator[threading.Event]:
    """An Event set by SIGTERM or SIGINT (a second SIGINT interrupts at once).

    The training loop checks it after every step (`should_stop`), during evaluation (which it
    abandons) and after starting a save, saves a checkpoint and returns, so a preempted job
    resumes where it stopped. Only the main thread of a single-process run installs the
    handlers; several processes rely on JAX's preemption service (checked after every step).
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logging.warning(
            "Received %s; stopping after the current step.", signal.Signals(signum).name
        )
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, old_handler in previous.items():
            signal.signal(sig, old_handler)


def should_stop(stop: threading.Event, step: int) -> bool:
    """Whether to stop after `step`: on all processes at the same step when there are several
    (`jax.distributed` turns SIGTERM into a preemption notice), else when `stop` is set."""
    if jax.process_count() > 1:
        return multihost_utils.reached_preemption_sync_point(step)
    return stop.is_set()


def check_finite(
    state: TrainState,
    config: ml_collections.ConfigDict,
    manager: Any,
    num_train_steps: int,
    reported: int,
) -> int:
    """Stops training (FloatingPointError) after a non-finite step unless skipping is enabled;
    with skipping, warns about the steps skipped since `reported` of them were, and stops once
    more than `config.max_nonfinite_fraction` of the run's steps were. Returns the count."""
    count = int(state.nonfinite_steps)
    if count == reported:
        return count
    first = int(state.first_nonfinite_step) + 1
    limit = config.max_nonfinite_fraction * num_train_steps
    if config.skip_nonfinite_steps and count <= limit:
        logging.warning(
            "Skipped %d non-finite step(s) up to step %d: %d of the run's %d so far (the first, "
            "step %d); training stops above %d (config.max_nonfinite_fraction=%g).",
            count - reported,
            int(state.step),
            count,
            num_train_steps,
            first,
            int(limit),
            config.max_nonfinite_fraction,
        )
        return count
    checkpoint.check_saves(manager, wait=True)
    kept = checkpoint.last_good(manager)
    if config.skip_nonfinite_steps:
        raise FloatingPointError(
            f"{count} of the first {int(state.step)} steps had a non-finite loss or gradients "
            f"(the first, step {first}) and were skipped: more than config."
            f"max_nonfinite_fraction={config.max_nonfinite_fraction} of the run's "
            f"{num_train_steps} steps. Training stopped and {kept}. Resume with a lower "
            "--config.learning_rate or with --config.grad_clip_norm (or a larger "
            "--config.max_nonfinite_fraction)."
        )
    raise FloatingPointError(
        f"Non-finite loss or gradients in step {first} (its update was not applied); training "
        f"stopped and {kept}. Resume with a lower --config.learning_rate or with "
        "--config.grad_clip_norm, or pass --config.skip_nonfinite_steps=True to skip such steps."
    )


def warn_nonfinite(final: dict[str, Any]) -> None:
    """Warns about final metrics that are NaN/inf (the averages over skipped steps)."""
    bad = sorted(k for k, v in final.items() if isinstance(v, float) and not math.isfinite(v))
    if bad:
        logging.warning(
            "Final metrics %s are not finite: %d step(s) had a non-finite loss or gradients and "
            "were skipped (the first, step %d), and the train averages include them.",
            bad,
            final.get("nonfinite_steps", 0),
            final.get("first_nonfinite_step", -1) + 1,
        )
