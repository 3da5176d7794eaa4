"""The training loop: `train_and_evaluate(config, workdir)` trains, evaluates and checkpoints.

A workdir holds one run at a time (`lambdanet.workdir_lock`); a run resumes from the newest
checkpoint that passes its checksums, refuses a changed recipe unless allowed and records every
config the workdir ran with (`lambdanet.config_records`) once the checkpoint matches it, and
leaves a finished workdir unchanged. SIGTERM/SIGINT, preemption and non-finite steps stop it as
`lambdanet.stopping` says, a shard that does not read stops it at once, always with the last
good checkpoint kept.
"""

import contextlib
import json
import os
import threading
import time
from typing import Any

import jax
import ml_collections
from absl import logging

from lambdanet import (
    analysis,
    checkpoint,
    config_records,
    metric_writers,
    sharding,
    step_cache,
    workdir_lock,
)
from lambdanet.data.array_record import ShardReadError
from lambdanet.evaluate import eval_loop
from lambdanet.experiment import Experiment, create_experiment, log_experiment
from lambdanet.stopping import check_finite, should_stop, stop_requested_by_signal, warn_nonfinite
from lambdanet.train import TrainState

FINAL_METRICS_FILE = "final_metrics.json"


# lambdanet.main's exit status when a signal stopped the run with a checkpoint saved (defined
# here so that tools read it without importing main's flags).
EXIT_STOPPED = 75


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    run_eval: bool = True,
    *,
    allow_config_change: bool = False,
    require_checksums: bool = False,
) -> dict[str, Any]:
    """Trains (resuming from WORKDIR/checkpoints if present), evaluates, returns final metrics.

    Holds the workdir's lock throughout (process 0); writes TensorBoard events, config.json and
    final_metrics.json to `workdir`; evaluates every `config.eval_every_epochs` and at the end
    when `run_eval`. SIGTERM/SIGINT stop the run after the current step with a checkpoint; the
    returned metrics then have 'stopped_early' (and no final_metrics.json is written). A
    finished run that trains on keeps its final metrics as final_metrics.step_N.json. A
    finished workdir (its final step saved, final_metrics.json written) is left unchanged and
    its final metrics returned, with 'already_finished'. A resume with another recipe than the
    workdir's config record is refused (ConfigChangedError) unless `allow_config_change`; a
    checkpoint without checksums is refused when `require_checksums`.
    """
    is_chief = jax.process_index() == 0
    with workdir_lock.hold(workdir) if is_chief else contextlib.nullcontext():
        exp = create_experiment(config)
        log_experiment(config, exp)
        manager = checkpoint.create_checkpoint_manager(
            os.path.join(workdir, checkpoint.CHECKPOINT_DIR), config.keep_checkpoints
        )
        try:
            state = _initial_state(config, exp, manager, require_checksums)
            start_step = int(state.step)
            final_path = os.path.join(workdir, FINAL_METRICS_FILE)
            if start_step >= exp.num_train_steps and os.path.exists(final_path):
                return _finished(workdir, start_step, final_path)
            changed = config_records.check(workdir, config, start_step, allow_config_change)
            if is_chief:
                config_records.record(workdir, config, start_step, changed)
                _keep_final_metrics(final_path, start_step)
            writer = metric_writers.create_metric_writer(workdir, write_files=is_chief)
            try:
                with stop_requested_by_signal() as stop:
                    final = _train(config, exp, state, manager, writer, run_eval, stop)
                checkpoint.check_saves(manager, wait=True)
            except ShardReadError as error:
                raise _stopped_by_data(error, manager) from None
            finally:
                _close(writer, workdir)
        finally:
            manager.close()  # waits for pending asynchronous saves
        if start_step >= exp.num_train_steps:  # resumed after the final save: no step logged
            final = _logged_train_metrics(workdir, start_step) | final
        if is_chief and not final.get("stopped_early"):
            warn_nonfinite(final)
            metric_writers.write_json(final_path, final)
    logging.info("Final metrics: %s", final)
    return final


def _initial_state(
    config: ml_collections.ConfigDict, exp: Experiment, manager: Any, require_checksums: bool
) -> TrainState:
    """The newest good checkpoint's state if any (checked against the config), else the
    initial state, with `config.init_from`'s weights if set."""
    step = checkpoint.resume_step(manager, require_checksums)
    if step is not None:
        logging.info("Resuming from step %d in %s.", step, manager.directory)
        return checkpoint.restore(manager, step, exp.state)
    if config.init_from:
        return _init_from(config.init_from, exp.state)
    return exp.state


def _finished(workdir: str, step: int, final_path: str) -> dict[str, Any]:
    logging.warning(
        "The run in %s is finished at step %d (final metrics in %s); nothing was changed. "
        "--mode=eval evaluates it again; a larger --config.num_train_steps (or num_epochs) "
        "with --allow_config_change trains on from its last checkpoint.",
        workdir,
        step,
        final_path,
    )
    with open(final_path) as f:
        return json.load(f) | {"already_finished": True}


def _keep_final_metrics(final_path: str, step: int) -> None:
    """Renames the final metrics of a finished run that trains on (a larger num_train_steps) to
    final_metrics.step_STEP.json, so that the new end does not overwrite them."""
    if os.path.exists(final_path):
        kept = final_path.replace(".json", f".step_{step}.json")
        os.replace(final_path, kept)
        logging.info(
            "Training on from the finished step %d; its final metrics kept as %s.", step, kept
        )


def _close(writer: metric_writers.MetricWriter, workdir: str) -> None:
    """Closes `writer`; a failure (a full disk) is a warning: the events are not the run's
    record, and the error that stopped the run (if any) must stay its last line."""
    try:
        writer.close()
    except OSError as error:
        logging.warning("Could not finish the TensorBoard events in %s: %s.", workdir, error)


def _stopped_by_data(error: ShardReadError, manager: Any) -> ShardReadError:
    """`error` with what training kept and how to go on."""
    checkpoint.check_saves(manager, wait=True)
    return ShardReadError(
        f"{error} Training stopped; {checkpoint.last_good(manager)}: run the same command to "
        "resume once the shard is rewritten."
    )


def _logged_train_metrics(workdir: str, step: int) -> dict[str, float]:
    """The train metrics logged at `step` (the run's final step) to the workdir's events."""
    logged = metric_writers.read_scalars(workdir, step)
    return {k: v for k, v in logged.items() if not k.startswith("eval_")}


def _init_from(path: str, state: TrainState) -> TrainState:
    """Fine-tuning: params and batch_stats from a checkpoint (a workdir, its checkpoints
    directory or one step's directory; e.g. weights converted by scripts/convert_timm.py)."""
    directory, step = checkpoint.resolve_checkpoint(os.curdir, path)
    source = checkpoint.create_checkpoint_manager(directory, read_only=True)
    logging.info("Initialising params and batch_stats from step %d in %s.", step, directory)
    state = checkpoint.restore_weights(source, step, state)
    source.close()
    return state


def _evaluate(
    exp: Experiment,
    state: TrainState,
    stop: threading.Event,
    writer: metric_writers.MetricWriter,
    step: int,
) -> dict[str, float]:
    """`eval_loop`, written as eval_* scalars at `step`; {} when a signal interrupted it."""
    results = eval_loop(exp, state, stop)
    if results is None:
        logging.warning(
            "Evaluation of step %d interrupted; --mode=eval --checkpoint=%d evaluates it.",
            step,
            step,
        )
        return {}
    writer.write_scalars(step, {f"eval_{k}": v for k, v in results.items()})
    return results


def _train(
    config: ml_collections.ConfigDict,
    exp: Experiment,
    state: TrainState,
    manager: Any,
    writer: metric_writers.MetricWriter,
    run_eval: bool,
    stop: threading.Event,
) -> dict[str, Any]:
    """The training loop of `train_and_evaluate`, from `state` on."""
    start_step = int(state.step)
    if start_step == 0:
        writer.write_hparams(config_records.config_to_dict(config))
    eval_every = int(config.eval_every_epochs * exp.steps_per_epoch) if run_eval else 0
    train_iter = sharding.prefetch_to_device(exp.dataset.train_iter(start_step), exp.mesh)
    progress = metric_writers.ProgressLogger(
        exp.num_train_steps, config.global_batch_size, start_step
    )
    train_metrics, eval_metrics, summary = None, {}, {}
    nonfinite = int(state.nonfinite_steps)
    start_time = time.perf_counter()
    for step in range(start_step, exp.num_train_steps):
        if step == start_step:
            state, step_metrics = _first_train_step(config, exp, state, next(train_iter))
        else:
            state, step_metrics = exp.train_step(state, next(train_iter), exp.rngs)
        train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
        done, is_last = step + 1, step + 1 == exp.num_train_steps
        stopping = should_stop(stop, done)
        if done % config.log_every_steps == 0 or is_last or stopping:
            nonfinite = check_finite(state, config, manager, exp.num_train_steps, nonfinite)
            checkpoint.check_saves(manager)
            summary = {f"train_{k}": float(v) for k, v in train_metrics.compute().items()}
            summary |= progress(done) | {"nonfinite_steps": int(state.nonfinite_steps)}
            writer.write_scalars(done, summary)
            train_metrics = None
        evaluated = run_eval and (is_last or (eval_every > 0 and done % eval_every == 0))
        interrupted = False
        if evaluated:
            eval_metrics = _evaluate(exp, state, stop, writer, done)
            interrupted, evaluated = not eval_metrics, bool(eval_metrics)
        if (
            evaluated
            or interrupted
            or is_last
            or stopping
            or done % config.checkpoint_every_steps == 0
        ):
            nonfinite = check_finite(state, config, manager, exp.num_train_steps, nonfinite)
            writer.flush()  # the events of the steps saved: a resume at the end reads them
            checkpoint.save(manager, state, config, eval_metrics if evaluated else None)
            stopping = stopping or stop.is_set()  # a signal during the save
        if interrupted or (stopping and not is_last):
            logging.warning(
                "Stopped at step %d with a checkpoint in %s; run the same command to resume.",
                done,
                manager.directory,
            )
            return summary | {"step": done, "stopped_early": True}
    if run_eval and not eval_metrics:
        eval_metrics = eval_loop(exp, state)
    return (
        {f"eval_{k}": v for k, v in eval_metrics.items()}
        | summary
        | {
            "step": int(state.step),
            "num_params": analysis.num_params(state.params),
            "train_time_sec": time.perf_counter() - start_time,
            "nonfinite_steps": int(state.nonfinite_steps),
            "first_nonfinite_step": int(state.first_nonfinite_step),
        }
    )


def _first_train_step(config, exp: Experiment, state: TrainState, batch) -> tuple:
    """The first step of a run, with a console line before and after: it traces the train step
    (or loads its traced program) and compiles it (or loads it from JAX's persistent compilation
    cache), which can take minutes for deep models."""
    cache_dir = jax.config.jax_compilation_cache_dir
    cached = _cache_entries(cache_dir)
    logging.info(
        "Compiling the train step for %s (or loading it from the compilation cache %s) ...",
        config.model_name,
        cache_dir or "(off)",
    )
    start = time.perf_counter()
    state, step_metrics = exp.train_step(state, batch, exp.rngs)
    jax.block_until_ready(step_metrics)
    how = "compiled"
    if cache_dir:
        how = "compiled and cached" if _cache_entries(cache_dir) > cached else "loaded from cache"
    logging.info(
        "Train step %s (%s); the first step took %.1f s.",
        how,
        exp.train_step.how,
        time.perf_counter() - start,
    )
    return state, step_metrics


def _cache_entries(cache_dir: str | None) -> int:
    """Compiled programs in JAX's cache directory (the traced programs' folder not counted)."""
    if not cache_dir or not os.path.isdir(cache_dir):
        return 0
    return len(set(os.listdir(cache_dir)) - {step_cache.TRACED_DIR})
