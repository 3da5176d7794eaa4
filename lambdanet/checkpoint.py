"""Checkpoints with orbax `CheckpointManager`: asynchronous saves, keep the last k and the best.

Layout of a workdir:

    WORKDIR/config.json             the run's config (written once the checkpoints match it)
    WORKDIR/lock                    the running process (`lambdanet.workdir_lock`)
    WORKDIR/checkpoints/STEP/state  the train state (params, batch_stats, opt_state, EMA, step)
    WORKDIR/checkpoints/STEP/config the config that wrote this checkpoint (JSON)
    WORKDIR/checkpoints/STEP/checksums.json  size and SHA-256 of every file of the two items

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
in the middle of a save leaves no partial checkpoint in `all_steps()`; resuming takes the last
complete one, and warns about (then deletes) the unfinished one (`unfinished_saves`). The data
position and every random key derive from the step, so restoring the state is all that exact
resumption needs.

Integrity: when a save's files are written, process 0 records their checksums (orbax's
post-finalization callback, before the rename where orbax calls it there). A checkpoint is
*good* when every recorded file is there with its size and SHA-256 (`verify`); resuming and
evaluating the latest step take the newest good one, warning about each newer one and why
(`newest_good_step`). Orbax itself verifies nothing (a flipped byte loads silently). A
directory none of whose steps has checksums (written before they were recorded) is restored
unverified, with a warning.
"""

import errno
import hashlib
import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

from lambdanet.models import scanned

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
CHECKSUM_FILE = "checksums.json"
NO_CHECKSUMS = (
    f"it has no {CHECKSUM_FILE} (its process ended before writing it, or it predates them)"
)
BEST_METRIC = "top1"
_ITEM_HANDLERS = {"state": ocp.StandardCheckpointHandler, "config": ocp.JsonCheckpointHandler}
_MAX_LISTED = 20
WEIGHTS = ("params", "batch_stats")  # the model's variables: all a weights-only checkpoint holds

# Orbax's default on CPU and TPU splits each replicated array over its replicas for the host
# transfer: one small compiled slice per array shape and device, which dominates a first save of
# a replicated state (thousands of compiles for a deep model on 8 devices). It is off on GPU.
ocp.type_handlers.register_type_handler(
    jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True
)


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-serialisable copy of `config`."""
    return json.loads(config.to_json())


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes `config` as WORKDIR/config.json (call on process 0 only)."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(config.to_json(indent=2) + "\n")


def unfinished_saves(directory: str) -> list[str]:
    """The temporary directories of saves that never completed (e.g. killed), sorted."""
    if not os.path.isdir(directory):
        return []
    suffix = ocp.path.step.TMP_DIR_SUFFIX
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if suffix in n)


def _item_files(step_dir: str) -> dict[str, int]:
    """{path relative to `step_dir`: size} of the files of the checkpoint's items (state,
    config), without orbax's commit markers, which it may write after the callback."""
    files = {}
    for item in _ITEM_HANDLERS:
        for root, _, names in os.walk(os.path.join(step_dir, item)):
            for name in names:
                if name != "commit_success.txt":
                    path = os.path.join(root, name)
                    files[os.path.relpath(path, step_dir)] = os.path.getsize(path)
    return files


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_checksums(step_dir: str) -> None:
    """Records {relative path: [size, sha256]} of the items' files as STEP/checksums.json."""
    files = {
        name: [size, _sha256(os.path.join(step_dir, name))]
        for name, size in sorted(_item_files(step_dir).items())
    }
    path = os.path.join(step_dir, CHECKSUM_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(files, f, indent=0)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def verify(step_dir: str) -> str | None:
    """None if every file recorded in STEP/checksums.json has its size and SHA-256; else what is
    wrong with the checkpoint (NO_CHECKSUMS if none were recorded)."""
    try:
        with open(os.path.join(step_dir, CHECKSUM_FILE)) as f:
            recorded = json.load(f)
    except FileNotFoundError:
        return NO_CHECKSUMS
    except ValueError:
        return f"its {CHECKSUM_FILE} is unreadable"
    present = _item_files(step_dir)
    for name, (size, digest) in recorded.items():
        if name not in present:
            return f"{name} is missing"
        if present[name] != size:
            return f"{name} has {present[name]} bytes, {size} when saved (truncated or overwritten)"
        if _sha256(os.path.join(step_dir, name)) != digest:
            return f"{name} differs from its SHA-256 when saved (corrupted)"
    return None


def _checksum_newest_save(directory: str) -> None:
    """Writes the checksums of the newest step in `directory`, in flight (its temporary
    directory, where orbax calls this before renaming it) or finished."""
    if jax.process_index() != 0:
        return
    named = [(name.split(".")[0], name) for name in os.listdir(directory)]
    steps = [(int(step), name) for step, name in named if step.isdigit()]
    if steps:
        step_dir = os.path.join(directory, max(steps)[1])
        if not os.path.exists(os.path.join(step_dir, CHECKSUM_FILE)):
            write_checksums(step_dir)
            logging.info("Checkpoint step %d written, checksums recorded.", max(steps)[0])


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
    callback = None if read_only else lambda: _checksum_newest_save(directory)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation,
        # Writes each save's metrics next to it (orbax does so only with a best_fn): without
        # them a reopened manager (a resumed run) ranks nothing and deletes the best step.
        best_fn=lambda metrics: metrics[BEST_METRIC],
        best_mode="max",
        enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=callback),
        read_only=read_only,
        cleanup_tmp_directories=not read_only,  # leftovers of a save that was killed
    )
    handlers = {name: handler() for name, handler in _ITEM_HANDLERS.items()}
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
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_to_dict(config))
    )
    _check_free_space(manager, int(state.step))
    logging.info("Saving checkpoint step %d.", int(state.step))
    try:
        manager.save(int(state.step), args=args, metrics=metrics)
    except Exception as error:  # the previous asynchronous save's, or this one's start
        raise _save_error(manager, error) from None


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be saved; the message says why, what is kept and what to do."""


def _step_path(manager: ocp.CheckpointManager, step: int) -> str:
    return os.path.join(str(manager.directory), str(step))


def _size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, n)) for r, _, names in os.walk(path) for n in names)


def last_good(manager: ocp.CheckpointManager) -> str:
    """'the last good checkpoint, step N in DIR, is kept', of a verified step, or that there is
    none."""
    good = newest_good_step(str(manager.directory), sorted(manager.all_steps()), warn=False)
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


def _save_error(manager: ocp.CheckpointManager, error: BaseException) -> CheckpointSaveError:
    cause = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    steps = sorted(manager.all_steps())
    size = f" (a checkpoint takes {_size(_step_path(manager, steps[-1])) / 2**20:.1f} MiB)"
    fix = (
        f"free space on that file system{size if steps else ''} or move the workdir"
        if _no_space(error)
        else "fix the cause"
    )
    what = "no space left on device" if _no_space(error) else type(error).__name__
    return CheckpointSaveError(
        f"Saving a checkpoint in {manager.directory} failed: {what} ({cause}); "
        f"{last_good(manager)}. To resume, {fix}, then run the same command."
    )


def _check_free_space(manager: ocp.CheckpointManager, step: int) -> None:
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
        raise _save_error(manager, error)


def check_saves(manager: ocp.CheckpointManager, wait: bool = False) -> None:
    """CheckpointSaveError if an asynchronous save failed: one that has ended, or any after
    waiting for all, if `wait`. (Orbax raises a failed save's error from `wait_until_finished`
    once, at once when the save has ended.)"""
    try:
        if wait or not manager.is_saving_in_progress():
            manager.wait_until_finished()
    except Exception as error:
        raise _save_error(manager, error) from None


def newest_good_step(directory: str, steps: list[int], warn: bool = True) -> int | None:
    """The newest of `steps` that `verify` passes, warning about each newer one and why; with no
    checksummed step at all (written before checksums were recorded), the newest, unverified."""
    if steps and not any(
        os.path.exists(os.path.join(directory, str(s), CHECKSUM_FILE)) for s in steps
    ):
        if warn:
            logging.warning(
                "Checkpoints in %s have no checksums (saved before they were recorded); "
                "using step %d unverified.",
                directory,
                steps[-1],
            )
        return steps[-1]
    for step in reversed(steps):
        problem = verify(os.path.join(directory, str(step)))
        if problem is None:
            return step
        if warn:
            logging.warning("Skipping checkpoint step %d in %s: %s.", step, directory, problem)
    return None


def resume_step(manager: ocp.CheckpointManager) -> int | None:
    """The newest good step to resume from (None: start afresh); the unusable newer steps are
    deleted, so that the resumed run can save them again."""
    steps = sorted(manager.all_steps())
    good = newest_good_step(str(manager.directory), steps)
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


def _path_key(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{'params/stem/conv/kernel': shape, ...} for the array leaves of `tree`."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_path_key(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def _stored_model_name(manager: ocp.CheckpointManager, step: int) -> str:
    restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return str(restored["config"].get("model_name", "unknown"))


def check_compatible(
    manager: ocp.CheckpointManager, step: int, abstract_state: Any, stored: Any = None
) -> None:
    """Raises ValueError listing every entry whose name or shape differs from the checkpoint
    (or from ``stored``, a part of its metadata tree)."""
    stored = _shapes(_stored_tree(manager, step) if stored is None else stored)
    expected = _shapes(abstract_state)
    problems = [
        f"  {name}: checkpoint {stored[name]} vs model {expected[name]}"
        for name in sorted(stored.keys() & expected.keys())
        if stored[name] != expected[name]
    ]
    problems += [f"  {name}: only in the checkpoint" for name in sorted(stored.keys() - expected)]
    problems += [f"  {name}: only in the model" for name in sorted(expected.keys() - stored)]
    if not problems:
        return
    listed = problems[:_MAX_LISTED]
    if len(problems) > _MAX_LISTED:
        listed.append(f"  ... and {len(problems) - _MAX_LISTED} more")
    one_side = stored.keys() ^ expected.keys()
    layout = (
        "One side has scanned stages (`_scan` modules) and the other not: set "
        "config.model.scan_blocks as the checkpoint was written, or convert the variables with "
        "lambdanet.models.scanned.scan_variables / unscan_variables.\n"
        if any("_scan" in name for name in one_side)
        else ""
    )
    raise ValueError(
        f"Checkpoint step {step} in {manager.directory} (written by model_name="
        f"'{_stored_model_name(manager, step)}') does not match the model and optimizer built "
        f"from this config; {len(problems)} entries differ:\n"
        + "\n".join(listed)
        + "\n"
        + layout
        + "Use the config the checkpoint was written with (its config.json), or a fresh workdir."
    )


def _stored_tree(manager: ocp.CheckpointManager, step: int) -> Any:
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
    return manager.restore(step, args=args)["state"]


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
    restored = manager.restore(step, args=args)["state"]
    weights = scanned.match_layout({name: restored[name] for name in WEIGHTS}, target)
    ema = None if state.ema_params is None else weights["params"]
    return state.replace(**weights, ema_params=ema)


def _unavailable(what: str, directory: str, steps: list[int]) -> ValueError:
    available = f"available steps: {steps}" if steps else "it holds no complete checkpoint"
    return ValueError(f"{what}; in {directory} {available}.")


def resolve_checkpoint(workdir: str, checkpoint: str = "") -> tuple[str, int]:
    """Maps `--checkpoint` to (checkpoint directory, step).

    checkpoint: '' for the latest step in WORKDIR/checkpoints; a step number ('1200') in it; or a
      path: a workdir, a checkpoints directory (latest step) or one step's directory.
    """
    directory = os.path.join(workdir, CHECKPOINT_DIR)
    step = None
    if checkpoint.isdigit():
        step = int(checkpoint)
    elif checkpoint:
        path = os.path.abspath(os.path.expanduser(checkpoint))
        if not os.path.isdir(path):
            steps = list_steps(directory)
            raise _unavailable(f"Checkpoint path {path} does not exist", directory, steps)
        directory = path
        if os.path.isdir(os.path.join(path, CHECKPOINT_DIR)):
            directory = os.path.join(path, CHECKPOINT_DIR)
        elif os.path.basename(path).isdigit():
            directory, step = os.path.dirname(path), int(os.path.basename(path))
    steps = list_steps(directory)
    if step is None:
        if not steps:
            raise _unavailable("No checkpoint to evaluate", directory, steps)
        step = newest_good_step(directory, steps)
        if step is None:
            raise _unavailable(
                "No checkpoint passes its checksums (see the warnings)", directory, steps
            )
        return directory, step
    if step not in steps:
        raise _unavailable(f"Checkpoint step {step} does not exist", directory, steps)
    problem = verify(os.path.join(directory, str(step)))
    if problem == NO_CHECKSUMS:
        logging.warning("Checkpoint step %d in %s is unverified: %s.", step, directory, problem)
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
