"""Checkpoints with orbax `CheckpointManager`: asynchronous saves, keep the last k and the best.

Layout of a workdir:

    WORKDIR/config.json             the run's config (written once the checkpoints match it)
    WORKDIR/config.step_N.json      the config of a resume at step N that changed it
                                    (`lambdanet.config_records`)
    WORKDIR/lock                    the running process (`lambdanet.workdir_lock`)
    WORKDIR/checkpoints/STEP/state  the train state (params, batch_stats, opt_state, EMA, step)
    WORKDIR/checkpoints/STEP/config the config that wrote this checkpoint (JSON)
    WORKDIR/checkpoints/STEP/checksums.json  size and SHA-256 of every file of the two items

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
in the middle of a save leaves no partial checkpoint in `all_steps()`; resuming takes the last
complete one, and warns about (then deletes) the unfinished one (`unfinished_saves`). The data
position and every random key derive from the step, so restoring the state is all that exact
resumption needs.

Integrity: every save records the size and SHA-256 of its files, and resuming or evaluating
the latest step takes the newest checkpoint that matches them (`lambdanet.checkpoint_integrity`).
A save that fails, or would find the disk full, stops the run with one line that says what is
kept (`lambdanet.checkpoint_save_errors`); a checkpoint whose variables do not fit the model is
refused with the entries that differ (`lambdanet.checkpoint_compat`).
"""

import contextlib
import logging as std_logging
import os
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

from lambdanet import (
    checkpoint_compat,
    checkpoint_integrity,
    checkpoint_save_errors,
    config_records,
)
from lambdanet.models import scanned

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = config_records.CONFIG_FILE
BEST_METRIC = "top1"
# The items of a save, those whose files checkpoint_integrity.ITEMS records.
_ITEM_HANDLERS = {"state": ocp.StandardCheckpointHandler, "config": ocp.JsonCheckpointHandler}
WEIGHTS = ("params", "batch_stats")  # the model's variables: all a weights-only checkpoint holds

# Used as `checkpoint.NAME`, defined beside their job.
CHECKSUM_FILE = checkpoint_integrity.CHECKSUM_FILE
verify = checkpoint_integrity.verify
CheckpointSaveError = checkpoint_save_errors.CheckpointSaveError
last_good = checkpoint_save_errors.last_good


class _Without(std_logging.Filter):
    """Drops the log records whose message starts with `prefix`."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: std_logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


@contextlib.contextmanager
def _without_warning(prefix: str) -> Iterator[None]:
    """A warning orbax gives by design (starting with `prefix`) dropped from absl's logger (all
    its handlers) in the block."""
    logger, quiet = logging.get_absl_logger(), _Without(prefix)
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


# Orbax's default on CPU and TPU splits each replicated array over its replicas for the host
# transfer: one small compiled slice per array shape and device, which dominates a first save of
# a replicated state (thousands of compiles for a deep model on 8 devices). It is off on GPU.
with _without_warning("Type handler registry type"):  # overriding, as meant
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
    )


def unfinished_saves(directory: str) -> list[str]:
    """The temporary directories of saves that never completed (e.g. killed), sorted."""
    if not os.path.isdir(directory):
        return []
    suffix = ocp.path.step.TMP_DIR_SUFFIX
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if suffix in n)


def create_checkpoint_manager(
    directory: str, keep_last: int = 1, read_only: bool = False
) -> ocp.CheckpointManager:
    """An async manager that keeps the `keep_last` latest steps and the best by eval top-1.

    Unless `read_only`, unfinished saves are reported with a warning and deleted.
    """
    if not read_only:
        for path in unfinished_saves(directory):
            logging.warning("Ignoring and deleting the unfinished checkpoint save %s.", path)
    preservation = checkpoint_managers.AnyPreservationPolicy(
        [
            checkpoint_managers.LatestN(keep_last),
            checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics[BEST_METRIC],
                n=1,
                keep_checkpoints_without_metrics=False,
            ),
        ]
    )
    directory = os.path.abspath(directory)
    callback = None if read_only else lambda: checkpoint_integrity.checksum_newest_save(directory)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation,
        # Writes each save's metrics next to it (orbax does so only with a best_fn): without
        # them a reopened manager (a resumed run) ranks nothing and deletes the best step.
        best_fn=lambda metrics: metrics[BEST_METRIC],
        best_mode="max",
        enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=callback),
        read_only=read_only,
        # What orbax sets for read_only itself, each time with a warning.
        save_interval_steps=0 if read_only else 1,
        create=not read_only,
        cleanup_tmp_directories=not read_only,  # leftovers of a save that was killed
    )
    handlers = {name: handler() for name, handler in _ITEM_HANDLERS.items()}
    with _without_warning("Given directory is read only"):  # for every read-only manager
        return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def save(
    manager: ocp.CheckpointManager,
    state: Any,
    config: ml_collections.ConfigDict,
    metrics: dict[str, float] | None = None,
) -> None:
    """Starts an asynchronous save of `state` (and `config`) at `state.step`.

    Device arrays are copied to host before this returns, so `state` may then be donated.
    `metrics` (with key 'top1') ranks the checkpoint for keep-the-best.
    """
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(config_records.config_to_dict(config)),
    )
    checkpoint_save_errors.check_free_space(manager, int(state.step))
    logging.info("Saving checkpoint step %d.", int(state.step))
    try:
        manager.save(int(state.step), args=args, metrics=metrics)
    except Exception as error:  # the previous asynchronous save's, or this one's start
        raise checkpoint_save_errors.save_error(manager, error) from None


def check_saves(manager: ocp.CheckpointManager, wait: bool = False) -> None:
    """CheckpointSaveError if an asynchronous save failed: one that has ended, or any after
    waiting for all, if `wait`. (Orbax raises a failed save's error from `wait_until_finished`
    once, at once when the save has ended.)"""
    try:
        if wait or not manager.is_saving_in_progress():
            manager.wait_until_finished()
    except Exception as error:
        raise checkpoint_save_errors.save_error(manager, error) from None


def resume_step(manager: ocp.CheckpointManager, require_checksums: bool = False) -> int | None:
    """The newest good step to resume from (None: start afresh); the unusable newer steps are
    deleted, so that the resumed run can save them again. Without checksums in any step, the
    newest, unverified, or UnverifiedCheckpointError if `require_checksums`."""
    steps = sorted(manager.all_steps())
    good = checkpoint_integrity.newest_good_step(
        str(manager.directory), steps, require_checksums=require_checksums
    )
    newer = [step for step in steps if good is None or step > good]
    if newer:
        logging.warning(
            "Deleting the unusable checkpoint step(s) %s; %s.",
            newer,
            f"resuming from step {good}" if good is not None else "starting afresh",
        )
        for step in newer:
            manager.delete(step)
    return good


def _stored_model_name(manager: ocp.CheckpointManager, step: int) -> str:
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return str(restored["config"].get("model_name", "unknown"))


def check_compatible(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any, stored: Any = None
) -> None:
    """Raises ValueError listing every entry whose name or shape differs from the checkpoint
    (or from ``stored``, a part of its metadata tree)."""
    problem = checkpoint_compat.mismatch(
        _stored_tree(manager, step) if stored is None else stored, abstract_state
    )
    if problem is None:
        return
    raise ValueError(
        f"Checkpoint step {step} in {manager.directory} (written by model_name="
        f"'{_stored_model_name(manager, step)}') does not match the model and optimizer built "
        f"from this config; {problem}"
    )


def _stored_tree(manager: ocp.CheckpointManager, step: int) -> Any:
    with _reading(manager, step):
        stored = manager.item_metadata(step)["state"]
    return getattr(stored, "tree", stored)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any) -> Any:
    """Restores the state at `step` into the structure/shardings of `abstract_state`.

    A weights-only checkpoint ({'params', 'batch_stats'}, e.g. written by
    `lambdanet.convert_timm`) restores through `restore_weights`.
    """
    if set(_stored_tree(manager, step)) == set(WEIGHTS):
        return restore_weights(manager, step, abstract_state)
    check_compatible(manager, step, abstract_state)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
    return _restored_state(manager, step, args)


def _restored_state(manager: ocp.CheckpointManager, step: int, args: Any) -> Any:
    """The state item of `manager.restore(step, args)` (`_reading` it)."""
    with _reading(manager, step):
        return manager.restore(step, args=args)["state"]


@contextlib.contextmanager
def _reading(manager: ocp.CheckpointManager, step: int) -> Iterator[None]:
    """Checkpoint `step` read in the block; files that do not read (damaged where no checksum
    caught it) raise ValueError saying what to do."""
    try:
        yield
    except (ValueError, OSError) as error:
        path = os.path.join(str(manager.directory), str(step))
        raise ValueError(
            f"Checkpoint step {step} in {manager.directory} does not restore "
            f"({str(error).splitlines()[0][:300]}): it is damaged; nothing was changed. "
            f"Delete {path} to use the step before it, or use another --workdir."
        ) from error


def restore_weights(manager: ocp.CheckpointManager, step: int, state: Any) -> Any:
    """`state` with the params and batch_stats of checkpoint `step` (a full train state or a
    weights-only checkpoint); step and optimizer state stay those of `state`, and the EMA (if
    any) starts from the restored params. For eval-only and `config.init_from` (fine-tuning)."""
    target = {name: getattr(state, name) for name in WEIGHTS}
    sharding = jax.tree.leaves(target)[0].sharding
    abstract = jax.tree.map(
        lambda meta: jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=sharding),
        _stored_tree(manager, step),
    )
    # Unrolled weights (timm's, older runs) load into a scanned model and back.
    stored = {k: abstract[k] for k in WEIGHTS if k in abstract}
    converted = jax.eval_shape(lambda w: scanned.match_layout(w, target), stored)
    check_compatible(manager, step, target, stored=converted)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    restored = _restored_state(manager, step, args)
    weights = scanned.match_layout({name: restored[name] for name in WEIGHTS}, target)
    ema = None if state.ema_params is None else weights["params"]
    return state.replace(**weights, ema_params=ema)


def _unavailable(what: str, directory: str, steps: list[int]) -> ValueError:
    available = f"available steps: {steps}" if steps else "it holds no complete checkpoint"
    return ValueError(f"{what}; in {directory} {available}.")


def _location(workdir: str, checkpoint: str) -> tuple[str, int | None]:
    """(checkpoint directory, step) that `--checkpoint` names; step None: the newest good one."""
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    if checkpoint.isdigit():
        return directory, int(checkpoint)
    if not checkpoint:
        return directory, None
    path = os.path.abspath(os.path.expanduser(checkpoint))
    if not os.path.isdir(path):
        steps = list_steps(directory)
        raise _unavailable(f"Checkpoint path {path} does not exist", directory, steps)
    if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
        return os.path.join(path, CHECKPOINT_DIR), None
    if os.path.basename(path).isdigit():
        return os.path.dirname(path), int(os.path.basename(path))
    return path, None


def _newest_good(directory: str, steps: list[int], require_checksums: bool) -> int:
    """The newest of `steps` that passes its checksums; ValueError if none does."""
    if not steps:
        raise _unavailable("No checkpoint to evaluate", directory, steps)
    step = checkpoint_integrity.newest_good_step(
        directory, steps, require_checksums=require_checksums
    )
    if step is None:
        raise _unavailable(
            "No checkpoint passes its checksums (see the warnings)", directory, steps
        )
    return step


def resolve_checkpoint(
    workdir: str, checkpoint: str = "", require_checksums: bool = False
) -> tuple[str, int]:
    """Maps `--checkpoint` to (checkpoint directory, step).

    checkpoint: '' for the latest step in WORKDIR/checkpoints; a step number ('1200') in it; or a
      path: a workdir, a checkpoints directory (latest step) or one step's directory.
    require_checksums: refuse a checkpoint without checksums (UnverifiedCheckpointError).
    """
    directory, step = _location(workdir, checkpoint)
    steps = list_steps(directory)
    if step is None:
        return directory, _newest_good(directory, steps, require_checksums)
    if step not in steps:
        raise _unavailable(f"Checkpoint step {step} does not exist", directory, steps)
    problem = checkpoint_integrity.verify(os.path.join(directory, str(step)))
    if problem == checkpoint_integrity.NO_CHECKSUMS:
        checkpoint_integrity.unverified(directory, step, require_checksums)
    elif problem:
        raise _unavailable(f"Checkpoint step {step} is corrupt: {problem}", directory, steps)
    return directory, step


def list_steps(directory: str) -> list[int]:
    """The complete checkpoint steps under `directory` (empty if it does not exist)."""
    if not os.path.isdir(directory):
        return []
    manager = create_checkpoint_manager(directory, read_only=True)
    steps = sorted(manager.all_steps())
    manager.close()
    return steps
