"""Checkpoints with orbax `CheckpointManager`: asynchronous saves, keep the last k and the best.

Layout of a workdir:

    WORKDIR/config.json             the run's config (written at start-up)
    WORKDIR/checkpoints/STEP/state  the train state (params, batch_stats, opt_state, EMA, step)
    WORKDIR/checkpoints/STEP/config the config that wrote this checkpoint (JSON)

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
in the middle of a save leaves no partial checkpoint in `all_steps()`; resuming takes the last
complete one, and warns about (then deletes) the unfinished one (`unfinished_saves`). The data
position and every random key derive from the step, so restoring the state is all that exact
resumption needs.
"""

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
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
    options = ocp.CheckpointManagerOptions(
        preservation_policy=preservation,
        enable_async_checkpointing=True,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,  # leftovers of a save that was killed
    )
    handlers = {name: handler() for name, handler in _ITEM_HANDLERS.items()}
    return ocp.CheckpointManager(
        os.path.abspath(directory), options=options, item_handlers=handlers
    )


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
    manager.save(int(state.step), args=args, metrics=metrics)


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
    raise ValueError(
        f"Checkpoint step {step} in {manager.directory} (written by model_name="
        f"'{_stored_model_name(manager, step)}') does not match the model and optimizer built "
        f"from this config; {len(problems)} entries differ:\n" + "\n".join(listed) + "\n"
        "Use the config the checkpoint was written with (its config.json), or a fresh workdir."
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
    stored = _stored_tree(manager, step)
    check_compatible(manager, step, target, stored={k: stored[k] for k in WEIGHTS if k in stored})
    sharding = jax.tree.leaves(target)[0].sharding
    abstract = jax.tree.map(
        lambda meta: jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=sharding), stored
    )
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
    restored = manager.restore(step, args=args)["state"]
    weights = {name: restored[name] for name in WEIGHTS}
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
        step = steps[-1]
    if step not in steps:
        raise _unavailable(f"Checkpoint step {step} does not exist", directory, steps)
    return directory, step


def list_steps(directory: str) -> list[int]:
    """The complete checkpoint steps under `directory` (empty if it does not exist)."""
    if not os.path.isdir(directory):
        return []
    manager = create_checkpoint_manager(directory, read_only=True)
    steps = sorted(manager.all_steps())
    manager.close()
    return steps
