"""Train and evaluate LambdaNetworks from a config file.

    python -m lambdanet.main --config=configs/demo.py --workdir=workdir/demo
    python -m lambdanet.main --config=configs/demo.py --workdir=workdir/demo --mode=eval \
        [--checkpoint=STEP_OR_PATH]

`--config=FILE:ARG` passes ARG to the file's `get_config`, e.g.
`--config=configs/lambda_resnet.py:depth=152,size=256`. `--print_config` prints the config after
the overrides below and exits, building nothing (no --workdir needed).

Any field the config defines can be overridden, e.g. with `--config=configs/lambda_resnet.py`:
`--config.global_batch_size=512 --config.model.dropout_rate=0.1`. Every config defines the model's
implementation choices `stem_conv_impl`, `max_pool_grad`, `scan_blocks`, `remat` and
`remat_policy` and the common lambda-layer settings
`lambda_layer.{impl,scope_size,dim_k,heads,dim_u,embedding_init_std}` (unset: the model's own;
`scope_size=0`: the global scope).
ml_collections overrides only fields that exist: another model attribute that the config does not
set (say `se_ratio`) is set in a config file (`config.model.se_ratio = 0.25`).

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
from ml_collections import config_flags

from lambdanet import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).")
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
EXIT_STOPPED = train.EXIT_STOPPED


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing; an override of a field the config lacks names it and the fix."""
    try:
        return app.parse_flags_with_usage(argv)
    except AttributeError as error:  # raised by ml_collections while it parses the overrides
        field = str(error).strip("\"'")
        given = [a.split("=")[0] for a in argv if a.startswith("--config.")]
        named = [a for a in given if a.split(".")[-1] == field] or given
        sys.exit(
            f"FATAL Flags parsing error: {', '.join(named)}: the config has no field "
            f"{field!r}, and --config.FIELD overrides only fields it defines. Set a new field in "
            f"a config file (e.g. `config.model.{field} = VALUE` in a copy of the config) or "
            "check the spelling (python -m lambdanet.main --config=FILE --helpfull lists them)."
        )


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
        train.evaluate(_CONFIG.value, _WORKDIR.value, _CHECKPOINT.value)
    else:
        final = train.train_and_evaluate(
            _CONFIG.value, _WORKDIR.value, run_eval=_MODE.value != "train"
        )
        if final.get("stopped_early"):
            sys.exit(EXIT_STOPPED)


def run() -> None:
    """The `lambdanet-train` command: `python -m lambdanet.main` with absl's flag parsing."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
