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

Exit status: 0 when the run finished (or was already finished: it is then left unchanged); 75
(EXIT_STOPPED, sysexits' EX_TEMPFAIL) when SIGTERM/SIGINT stopped it after saving a checkpoint:
run the same command to resume (a scheduler requeues on it); 1 on an error, whose last line says
what went wrong and what to do.

Compiled programs are cached in `--compilation_cache` (default $JAX_COMPILATION_CACHE_DIR or
~/.cache/lambdanet/jax; '' turns it off); the log says whether the train step was compiled or
loaded, and how long its first step took.

Several hosts: start one process per host with `--distributed` (cluster auto-detection: SLURM,
Open MPI, Cloud TPU, Kubernetes) or with `--coordinator_address=HOST:PORT --num_processes=N
--process_id=I` (defaults from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).
"""

import logging as std_logging
import os
import sys

import jax
from absl import app, flags, logging

from lambdanet import command_line, evaluate, train_loop

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
flags.mark_flag_as_required("config")
flags.register_multi_flags_validator(
    ["workdir", "print_config"],
    lambda values: values["workdir"] or values["print_config"],
    "--workdir is required (except with --print_config).",
)

# Stopped by a signal with a checkpoint saved: resume with the same command.
EXIT_STOPPED = train_loop.EXIT_STOPPED


class _QuietLibraries(std_logging.Filter):
    """Keeps warnings and errors of orbax (which logs every save at INFO), drops its info lines
    and the warning it gives for each save without eval metrics: only the saves after an
    evaluation carry them (the best checkpoint is ranked among those), by design."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if "/orbax/" not in record.pathname:
            return True
        return record.levelno >= std_logging.WARNING and not record.getMessage().startswith(
            "Requested `tracked_metric`; did not provide metrics"
        )


_QUIET_LIBRARIES = _QuietLibraries()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if _PRINT_CONFIG.value:
        print(_CONFIG.value, end="")
        return
    logging.get_absl_handler().addFilter(_QUIET_LIBRARIES)
    if _COMPILATION_CACHE.value:
        jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE.value)
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
        evaluate.evaluate(_CONFIG.value, _WORKDIR.value, _CHECKPOINT.value)
    else:
        final = train_loop.train_and_evaluate(
            _CONFIG.value, _WORKDIR.value, run_eval=_MODE.value != "train"
        )
        if final.get("stopped_early"):
            sys.exit(EXIT_STOPPED)


def run() -> None:
    """The `lambdanet-train` command: `python -m lambdanet.main` with absl's flag parsing."""
    app.run(main, flags_parser=command_line.parse_flags)


if __name__ == "__main__":
    run()
