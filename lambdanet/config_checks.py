"""One check of a training config's values, before anything is built or compiled.

`check_config` raises one ValueError listing every field out of its range or enum, each with
its value and what it must be. The training recipe's fields are checked here; the dataset's
where the dataset is built (`lambdanet.data.create_dataset`), the model's settings
(`config.model`) by the modules that own them (`ResNet`, `LambdaLayer`).
"""

import math
from collections.abc import Callable

import ml_collections


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _integer(low: int) -> tuple[Callable, str]:
    return (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low), (
        f"an integer >= {low}"
    )


def _within(low: float, high: float, high_open: bool = True) -> tuple[Callable, str]:
    def ok(v):
        return _number(v) and low <= v and (v < high if high_open else v <= high)

    return ok, f"a number in [{low}, {high}{')' if high_open else ']'}"


_POSITIVE = (lambda v: _number(v) and v > 0), "a positive number"
_NON_NEGATIVE = (lambda v: _number(v) and v >= 0), "a number >= 0"
_BOOL = (lambda v: isinstance(v, bool)), "True or False"

# field -> (test, what it must be)
_RULES = {
    "global_batch_size": _integer(1),
    "eval_batch_size": _integer(1),
    "num_epochs": _NON_NEGATIVE,
    "learning_rate": _POSITIVE,
    "warmup_epochs": _NON_NEGATIVE,
    "momentum": _within(0.0, 1.0),
    "nesterov": _BOOL,
    "weight_decay": _NON_NEGATIVE,
    "weight_decay_exclude_bn_and_bias": _BOOL,
    "grad_clip_norm": _NON_NEGATIVE,
    "label_smoothing": _within(0.0, 1.0),
    "ema_decay": _within(0.0, 1.0),
    "half_precision": _BOOL,
    "sync_batch_norm": _BOOL,
    "skip_nonfinite_steps": _BOOL,
    "max_nonfinite_fraction": _within(0.0, 1.0, high_open=False),
    "log_every_steps": _integer(1),
    "eval_every_epochs": _NON_NEGATIVE,
    "checkpoint_every_steps": _integer(1),
    "keep_checkpoints": _integer(1),
    "seed": _integer(0),
    "data_seed": _integer(0),
}


def config_problems(config: ml_collections.ConfigDict) -> list[str]:
    """One line per bad field: `config.FIELD=VALUE: must be ...`."""
    problems = [
        f"config.{name}={config[name]!r}: must be {what}"
        for name, (ok, what) in _RULES.items()
        if name in config and not ok(config[name])
    ]
    if not (
        isinstance(config.num_train_steps, int) and not isinstance(config.num_train_steps, bool)
    ):
        problems.append(f"config.num_train_steps={config.num_train_steps!r}: must be an integer")
    elif config.num_train_steps <= 0 and not (_number(config.num_epochs) and config.num_epochs > 0):
        problems.append(
            f"config.num_train_steps={config.num_train_steps} and config.num_epochs="
            f"{config.num_epochs!r}: set num_train_steps > 0 or num_epochs > 0"
        )
    return problems


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError listing every problem of `config_problems`."""
    problems = config_problems(config)
    if problems:
        raise ValueError(
            f"{len(problems)} config value(s) out of range; fix them in the config file or with "
            "--config.FIELD=VALUE:\n  " + "\n  ".join(problems)
        )
