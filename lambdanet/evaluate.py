"""Evaluation: exact metrics over the eval split (`eval_loop`) and eval-only mode (`evaluate`)."""

import os
import threading

import jax
import ml_collections
from absl import logging

from lambdanet import checkpoint, metric_writers, sharding
from lambdanet.experiment import Experiment, create_experiment
from lambdanet.train import TrainState

EVAL_METRICS_FILE = "eval_metrics.json"


def eval_loop(
    exp: Experiment, state: TrainState, stop: threading.Event | None = None
) -> dict[str, float] | None:
    """Exact metrics over the whole eval split: padded examples are masked out.

    Returns None, abandoning the evaluation, as soon as `stop` (a SIGTERM/SIGINT) is set.
    """
    total = None
    for batch in sharding.prefetch_to_device(exp.dataset.eval_iter(), exp.mesh):
        if stop is not None and stop.is_set():
            return None
        batch_metrics = exp.eval_step(state, batch, exp.rngs)
        total = batch_metrics if total is None else total.merge(batch_metrics)
    results = {name: float(value) for name, value in total.compute().items()}
    return results | {"num_examples": int(total.loss.count)}


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    checkpoint_ref: str = "",
    require_checksums: bool = False,
) -> dict:
    """Eval-only: restores a checkpoint ('' latest in workdir, a step, or a path) and evaluates.

    Writes `eval_metrics.json` (with the checkpoint's step and directory) to `workdir`. A
    checkpoint without checksums is refused when `require_checksums`.
    """
    directory, step = checkpoint.resolve_checkpoint(workdir, checkpoint_ref, require_checksums)
    # Eval-only reads no training data (a folder may hold only val/): the eval split stands in
    # for the training split, with the smallest valid batch.
    config = config.copy_and_resolve_references()
    config.dataset.train_split = config.dataset.eval_split
    config.global_batch_size = jax.device_count()
    exp = create_experiment(config)
    manager = checkpoint.create_checkpoint_manager(directory, read_only=True)
    try:
        state = checkpoint.restore(manager, step, exp.state)
    finally:
        manager.close()  # also after a failed restore: its threads end before the process
    logging.info("Evaluating checkpoint step %d from %s.", step, directory)
    results = {f"eval_{k}": v for k, v in eval_loop(exp, state).items()}
    results |= {"step": step, "checkpoint_dir": directory}
    if jax.process_index() == 0:
        metric_writers.write_json(os.path.join(workdir, EVAL_METRICS_FILE), results)
    logging.info("Eval metrics: %s", results)
    return results
