r"""Sweep conv/lambda placements with seeds: every entry x --seeds runs, throughput, a table.

`--config=NAME[:ARG]` names a sweep: a config whose file defines `get_sweep()` (`imagenette`:
the hybrid table on Imagenette) or a config with `hybrid_placements` (`hybrid_resnet50`: the
paper's table on ImageNet); every `--config.FIELD=VALUE` goes to every run. Runs are packed
`--parallel` per GPU of `--gpus`, results appended to the first `--results` file, and a killed or
stopped sweep continues where it stopped when run again; exit status 0 when nothing is left, 75
when some work is left, 1 when a run failed. How it works: `lambdanet.tools.sweep`; the table
(TABLE.csv, .md with the pairs beyond 2 standard errors, .png): `lambdanet.tools.sweep_table`.

(a) The Imagenette table on one H200 (the array file, 44 MiB, written once on any machine from
fast.ai's imagenette2-160 folder; see lambdanet/configs/imagenette.py):

    python scripts/make_arrays.py --folder=IMAGENETTE_DIR --splits=train,val --size=128 \
        --quality=85 --output=artifacts/imagenette_128.npz
    python scripts/sweep_hybrids.py --config=imagenette --workdir=workdir/hybrids \
        --seeds=3 --parallel=3 --deadline_s=480 --stop_grace_s=30 \
        --results=results/raw/hybrids_imagenette.jsonl --table=results/raw/hybrids_imagenette \
        --config.dataset.path=artifacts/imagenette_128.npz

Run it again until it exits 0; on a fresh machine it reruns only what the results file lacks.

(b) The table and plot again, from the results files of one or several calls:

    python scripts/sweep_hybrids.py --config=imagenette --table_only \
        --results=results/raw/hybrids_imagenette.jsonl[,MORE.jsonl] \
        --table=results/raw/hybrids_imagenette

The paper's table on ImageNet: `--config=hybrid_resnet50 --workdir=workdir/hybrids
--config.dataset.manual_dir=DIR_WITH_IMAGENET_TARS`.
"""

import dataclasses
import sys

from absl import app, flags

from lambdanet import command_line
from lambdanet.tools import sweep

FLAGS = flags.FLAGS
_CONFIG = command_line.define_config_flag()
flags.DEFINE_string("workdir", None, "Directory of the runs (WORKDIR/<entry>/seed<k>).")
flags.DEFINE_list("results", [], "JSON-lines files: all read, new lines go to the first.")
flags.DEFINE_string("table", None, "TABLE.csv/.md/.png (default WORKDIR/hybrids).")
flags.DEFINE_integer("seeds", 3, "Seeds per entry: config.seed = config.data_seed = 0 .. N-1.")
flags.DEFINE_integer("parallel", 1, "Runs at once per GPU.")
flags.DEFINE_list("gpus", ["0"], "GPU indices the runs are spread over.")
flags.DEFINE_list("only", None, "Entries to run (default: all of the sweep).")
flags.DEFINE_float("deadline_s", 0.0, "Budget in seconds from the start (0: none).")
flags.DEFINE_float("run_estimate_s", 0.0, "A run's wall time before any finished (0: none).")
flags.DEFINE_float("stop_grace_s", 60.0, "Seconds between SIGTERM and SIGKILL at a stop.")
flags.DEFINE_integer("throughput_batch_size", 128, "Batch of the throughput runs.")
flags.DEFINE_integer("throughput_steps", 30, "Steps per timed throughput window.")
flags.DEFINE_bool("table_only", False, "Only write the table and plot from --results.")
flags.register_validator(
    "seeds", lambda n: n >= 1, "--seeds is the number of seeds per entry: give 1 or more."
)
flags.register_validator(
    "parallel", lambda n: n >= 1, "--parallel is the number of runs per GPU: give 1 or more."
)
flags.register_validator(
    "gpus",
    lambda ids: bool(ids) and all(i.isdigit() for i in ids),
    "--gpus lists the GPU indices to use, e.g. --gpus=0,1.",
)


def options() -> sweep.SweepOptions:
    """The flags as the sweep's options."""
    names = [field.name for field in dataclasses.fields(sweep.SweepOptions)]
    return sweep.SweepOptions(**{name: FLAGS[name].value for name in names})


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        sys.exit(
            f"sweep_hybrids: unexpected arguments {argv[1:]}: give flags as --NAME=VALUE (the "
            "runs' overrides as --config.FIELD=VALUE)."
        )
    config = command_line.config_name(FLAGS["config"]) if _CONFIG.value is not None else None
    overrides = command_line.config_overrides(sys.argv[1:])
    try:
        if FLAGS.table_only:
            sweep.write_table_only(config, overrides, options())
        elif config is None:
            raise ValueError("--config and --workdir are needed (except with --table_only).")
        else:
            sys.exit(sweep.run_sweep(config, overrides, options()))
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"sweep_hybrids: {error}")


if __name__ == "__main__":
    app.run(main, flags_parser=command_line.parse_flags)
