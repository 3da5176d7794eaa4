"""Every config a workdir has run with, never overwritten: WORKDIR/config.json (the first) and
one WORKDIR/config.step_N.json per resume that changed it, N the step it took effect at.

A resume compares the config with the newest record (`changes`). A change of the recipe (any
field but those that only say how often to log, evaluate and checkpoint, or how many data
workers to use) is refused unless the user says it is meant (`lambdanet-train
--allow_config_change`); a changed model is refused earlier, by the checkpoint's shapes. A
change that goes on is recorded (`record`), so the config of every step stays in the workdir.
"""

import itertools
import json
import os
import re
from typing import Any

import ml_collections
from absl import logging

from lambdanet import metric_writers

CONFIG_FILE = "config.json"
# Fields that change no step's result: changing them on resume needs no --allow_config_change.
BOOKKEEPING = frozenset(
    {
        "log_every_steps",
        "eval_every_epochs",
        "checkpoint_every_steps",
        "keep_checkpoints",
        "init_from",
        "dataset.workers",
    }
)
_RECORD = re.compile(r"config\.step_(\d+)(?:\.(\d+))?\.json")


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-serialisable copy of `config` (what a record holds)."""
    return json.loads(config.to_json())


class ConfigChangedError(ValueError):
    """A resume with a changed recipe, without --allow_config_change."""


def _records(workdir: str) -> list[str]:
    """The workdir's config records, oldest first."""
    if not os.path.isdir(workdir):
        return []
    later = [(_RECORD.fullmatch(name), name) for name in os.listdir(workdir)]
    later = sorted(
        ((int(m.group(1)), int(m.group(2) or 1)), name) for m, name in later if m is not None
    )
    first = [CONFIG_FILE] if os.path.exists(os.path.join(workdir, CONFIG_FILE)) else []
    return first + [name for _, name in later]


def changes(workdir: str, config: ml_collections.ConfigDict) -> tuple[str | None, list[str]]:
    """(the newest record's name, ['field: old -> new', ...] for each field `config` changes
    from it); (None, []) for a workdir with no record."""
    records = _records(workdir)
    if not records:
        return None, []
    with open(os.path.join(workdir, records[-1])) as f:
        old = metric_writers.flatten(json.load(f))
    new = metric_writers.flatten(config_to_dict(config))
    return records[-1], [
        f"{name}: {_value(old, name)} -> {_value(new, name)}"
        for name in sorted(old.keys() | new.keys())
        if _value(old, name) != _value(new, name)
    ]


def _value(fields: dict[str, Any], name: str) -> str:
    return json.dumps(fields[name]) if name in fields else "(absent)"


def check(
    workdir: str, config: ml_collections.ConfigDict, step: int, allow_change: bool
) -> list[str]:
    """The changes of `config` from the workdir's newest record (`changes`); ConfigChangedError
    when a checkpoint (`step` > 0) was trained with another recipe and not `allow_change`."""
    record, changed = changes(workdir, config)
    recipe = [c for c in changed if c.split(":")[0] not in BOOKKEEPING]
    if recipe and step > 0 and not allow_change:
        raise ConfigChangedError(
            f"Resuming {workdir} at step {step} with another recipe than its {record}: "
            f"{'; '.join(recipe)}. Nothing was changed. Run the same command without these "
            "overrides to resume as the run was, pass --allow_config_change to train on with "
            f"them (recorded as config.step_{step}.json, {record} kept), or use another --workdir."
        )
    return changed


def record(workdir: str, config: ml_collections.ConfigDict, step: int, changed: list[str]) -> None:
    """Writes `config` as config.json in a workdir without one, else as config.step_STEP.json
    (config.step_STEP.K.json if that exists) when `changed` (from `check`) is not empty."""
    first = not _records(workdir)
    if not first and not changed:
        return
    name = CONFIG_FILE if first else f"config.step_{step}.json"
    for k in itertools.count(2):  # never overwrite a record
        if not os.path.exists(os.path.join(workdir, name)):
            break
        name = f"config.step_{step}.{k}.json"
    if name != CONFIG_FILE:
        logging.warning("Training on from step %d with %s; recorded as %s.", step, changed, name)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, name)
    with open(path + ".tmp", "w") as f:
        f.write(config.to_json(indent=2) + "\n")
    os.replace(path + ".tmp", path)
