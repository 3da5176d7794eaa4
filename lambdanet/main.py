"""Train and evaluate LambdaNetworks from a config (`lambdanet-train` is this command).

    lambdanet-train --config=demo --workdir=workdir/demo
    lambdanet-train --config=demo --workdir=workdir/demo --mode=eval [--checkpoint=STEP_OR_PATH]

`--config` names a config shipped in lambdanet/configs (`demo`, `imagenette:hybrid`,
`lambda_resnet:depth=152,size=256`: ARG after ':' goes to its `get_config`) or a path to a config
file of your own (`--config=path/to/mine.py:ARG`). `--print_config` prints the config after the
overrides below and exits, building nothing (no --workdir needed).

Every field of the config can be overridden, e.g. `--config.global_batch_size=512
--config.model.dropout_rate=0.1`. The model's fields are all there: `config.model` holds every
architecture setting of `config.model_name` (`lambdanet.configs.model_config`), so
`--config.model.se_ratio=0.25` or `--config.model.lambda_layer.scope_size=9` (`=None`: the global
scope) reach `ResNet(**config.model)` and its lambda layers as they are. Another model is another
config or config argument (`--config=default:lambda_resnet50_u4`), not `--config.model_name`,
which only labels the run.

Modes: `train_and_eval` (default) trains, resuming from WORKDIR/checkpoints if present, evaluates
every `config.eval_every_epochs` and at the end; `train` skips evaluation; `eval` evaluates a
checkpoint: the latest in WORKDIR, a step number, or a path (a workdir, its checkpoints
directory or one step's directory).

Resuming: the same command resumes from the newest checkpoint that passes its checksums. A
resume with another recipe than the workdir's config record is refused, listing the fields,
unless `--allow_config_change` (then recorded as WORKDIR/config.step_N.json; config.json stays
the first); `--require_checksums` refuses checkpoints without checksums (written before they
were recorded), which are otherwise used with a warning saying they are unverified.

Exit status: 0 when the run finished (or was already finished: it is then left unchanged); 75
(EXIT_STOPPED, sysexits' EX_TEMPFAIL) when SIGTERM/SIGINT stopped it after saving a checkpoint:
run the same command to resume (a scheduler requeues on it); 1 on an error, whose last line says
what went wrong, what was kept and what to do (`--verbose` adds the tracebacks above it).

Compiled programs are cached in `--compilation_cache` (default $JAX_COMPILATION_CACHE_DIR or
~/.cache/lambdanet/jax; '' turns it off, whatever $JAX_COMPILATION_CACHE_DIR says); the log says
whether the train step was compiled or loaded, and how long its first step took.

Several hosts: start one process per host with `--distributed` (cluster auto-detection: SLURM,
Open MPI, Cloud TPU, Kubernetes) or with `--coordinator_address=HOST:PORT --num_processes=N
--process_id=I` (defaults from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
"""

import gc
import logging as std_logging
import os
import sys
from typing import Any

import jax
from absl import app, flags, logging

from lambdanet import checkpoint, command_line, evaluate, train_loop, workdir_lock

_CONFIG = command_line.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, events and metrics.")
_PRINT_CONFIG = flags.DEFINE_bool(
    "print_config", False, "Print the config (after the --config.FIELD overrides) and exit."
)
_MODE = flags.DEFINE_enum("mode", "train_and_eval", ["train", "eval", "train_and_eval"], "Mode.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", "", "For --mode=eval: a step in WORKDIR or a checkpoint path (default latest)."
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with cluster auto-detection."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", os.environ.get("JAX_COORDINATOR_ADDRESS"), "Process 0's HOST:PORT."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", int(os.environ.get("JAX_NUM_PROCESSES", 0)) or None, "Number of processes."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id",
    int(os.environ["JAX_PROCESS_ID"]) if "JAX_PROCESS_ID" in os.environ else None,
    "This process's index.",
)
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache",
    os.environ.get("JAX_COMPILATION_CACHE_DIR")
    or os.path.join(os.path.expanduser("~"), ".cache", "lambdanet", "jax"),
    "JAX's persistent compilation cache: a resumed run, an eval-only run and the n-th run of a "
    "sweep load their compiled programs from it. '' turns it off.",
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume a workdir with another recipe than its config record (recorded as config.step_N.json).",
)
_REQUIRE_CHECKSUMS = flags.DEFINE_bool(
    "require_checksums", False, "Refuse checkpoints without checksums instead of using them."
)
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "On an error, show the tracebacks (the program's and its libraries')."
)
flags.mark_flag_as_required("config")
flags.register_multi_flags_validator(
    ["workdir", "print_config"],
    lambda values: values["workdir"] or values["print_config"],
    "--workdir is required (except with --print_config).",
)

# Stopped by a signal with a checkpoint saved: resume with the same command.
EXIT_STOPPED = train_loop.EXIT_STOPPED


# The errors whose message says what happened, what was kept and what to do: one line each.
_EXPLAINED = (
    ValueError,
    FloatingPointError,
    checkpoint.CheckpointSaveError,
    workdir_lock.WorkdirLockedError,
)


class _QuietLibraries(std_logging.Filter):
    """Keeps warnings and errors of orbax (which logs every save at INFO), drops its info lines
    and the warning it gives for each save without eval metrics: only the saves after an
    evaluation carry them (the best checkpoint is ranked among those), by design. The tracebacks
    of its errors (a failed save logs several) are dropped unless `tracebacks`."""

    tracebacks = False

    def filter(self, record: std_logging.LogRecord) -> bool:
        if "/orbax/" not in record.pathname:
            return True
        if not self.tracebacks:
            record.exc_info, record.exc_text = None, None
        return record.levelno >= std_logging.WARNING and not record.getMessage().startswith(
            "Requested `tracked_metric`; did not provide metrics"
        )


_QUIET_LIBRARIES = _QuietLibraries()


def _without_closed_loop_errors(unraisable: Any) -> None:
    """`sys.unraisablehook` without the "Event loop is closed" RuntimeErrors that a failed
    checkpoint read leaves (tensorstore calls back into the event loop orbax closed on the
    error): tracebacks of a library's clean-up above the error's last line."""
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
        sys.__unraisablehook__(unraisable)


def _set_compilation_cache(directory: str) -> None:
    """JAX's persistent compilation cache in `directory`; '' turns it off, also when
    $JAX_COMPILATION_CACHE_DIR (which JAX reads itself) names one."""
    jax.config.update("jax_compilation_cache_dir", directory or None)
    jax.config.update("jax_enable_compilation_cache", bool(directory))


def main(argv: list[str]) -> None:
    """Runs the mode; an explained error (`_EXPLAINED`) ends it with its message as the last
    line, above which only `--verbose` shows tracebacks."""
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _PRINT_CONFIG.value:
        print(_CONFIG.value, end="")
        return
    _QUIET_LIBRARIES.tracebacks = _VERBOSE.value
    logging.get_absl_handler().addFilter(_QUIET_LIBRARIES)
    if not _VERBOSE.value:
        sys.unraisablehook = _without_closed_loop_errors
    _set_compilation_cache(_COMPILATION_CACHE.value)
    message = _failure()
    if message is None:
        return
    gc.collect()  # frees what the failed run held (its input workers' shared memory) first
    listed, last = _last_line(message)
    if listed:
        print(listed, file=sys.stderr)
    sys.exit(f"FATAL {last}")


def _failure() -> str | None:
    """Runs the mode; the message of the explained error that ended it, if one did (with its
    traceback logged under `--verbose`)."""
    try:
        _run()
    except _EXPLAINED as error:
        if _VERBOSE.value:
            logging.exception("The run failed:")
        return str(error)
    return None


def _last_line(message: str) -> tuple[str, str]:
    """(the lines above, the last line) of an error's message: one of several lines (a headline
    ending in ':', an indented list, maybe sentences after it) ends on its headline and those
    sentences, a list of several above it."""
    head, *rest = message.splitlines()
    listed = [line for line in rest if line.startswith(" ")]
    after = [line for line in rest if not line.startswith(" ")]
    if len(listed) > 1:
        return "\n".join(listed), " ".join([f"{head.rstrip(':')} (listed above).", *after])
    return "", " ".join([head, *(line.strip() for line in listed), *after])


def _run() -> None:
    """Starts JAX (on several processes if asked) and runs the mode."""
    if _DISTRIBUTED.value or _COORDINATOR.value:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    logging.info(
        "JAX process %d of %d; %d local / %d global devices (%s).",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].platform,
    )
    if _MODE.value == "eval":
        evaluate.evaluate(
            _CONFIG.value, _WORKDIR.value, _CHECKPOINT.value, _REQUIRE_CHECKSUMS.value
        )
    else:
        final = train_loop.train_and_evaluate(
            _CONFIG.value,
            _WORKDIR.value,
            run_eval=_MODE.value != "train",
            allow_config_change=_ALLOW_CONFIG_CHANGE.value,
            require_checksums=_REQUIRE_CHECKSUMS.value,
        )
        if final.get("stopped_early"):
            sys.exit(EXIT_STOPPED)


def run() -> None:
    """The `lambdanet-train` command: `python -m lambdanet.main` with absl's flag parsing."""
    app.run(main, flags_parser=command_line.parse_flags)


if __name__ == "__main__":
    run()
