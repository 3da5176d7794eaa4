"""Sweep conv/lambda placements: one training run each, one table (the paper's hybrid table, D.2).

    python scripts/sweep_hybrids.py --config=configs/hybrid_resnet50.py --workdir=workdir/hybrids \
        --config.dataset.manual_dir=DIR_WITH_IMAGENET_TARS [--placement=C,C,L,L ...]

For each placement (default: the config's `hybrid_placements`, every row of the paper's table) it
trains and evaluates the config with `config.model.placement` set, in WORKDIR/<letters> (a
finished run is only re-evaluated, an interrupted one resumes), then measures inference
throughput on synthetic inputs with the protocol of scripts/benchmark.py (1,000 classes, the
config's image size and precision). It writes WORKDIR/hybrids.csv and WORKDIR/hybrids.md:
placement, parameters, inference throughput (images/s) and top-1.
"""

import copy
import csv
import os
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from lambdanet import train

if __package__:  # imported as scripts.sweep_hybrids
    from scripts import benchmark
else:  # run as scripts/sweep_hybrids.py, whose directory is first on sys.path
    import benchmark

COLUMNS = ("placement", "params_m", "images_per_sec", "top1")
HEADERS = ("placement", "params (M)", "inference throughput (images/s)", "top-1 (%)")

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Command-line flags; defined only when run as a script, so tests can import the module."""
    config_flags.DEFINE_config_file("config", None, "A config with hybrid_placements.")
    flags.DEFINE_string("workdir", None, "Directory for the runs and the table.")
    flags.DEFINE_multi_string("placement", None, "Placements (default: the config's).")
    flags.DEFINE_integer("throughput_batch_size", 128, "Batch of the throughput runs.")
    flags.DEFINE_integer("throughput_steps", 30, "Steps per timed throughput window.")
    flags.mark_flags_as_required(["config", "workdir"])


def measure_throughput(config, placement: str, batch_size: int, steps: int) -> float:
    """Inference images/s of the config's model with `placement` (`scripts/benchmark.py`)."""
    spec = dict(
        model=config.model_name,
        overrides=dict(config.model.to_dict(), placement=placement),
        mode="infer",
        image_size=config.dataset.image_size,
        dtype="bfloat16" if config.half_precision else "float32",
        batch_size=batch_size,
        num_classes=1000,
        warmup=steps,
        windows=3,
        steps=steps,
    )
    return benchmark.measure_jax_model(spec)["img_per_s"]


def run_sweep(config, workdir: str, placements, batch_size: int, steps: int) -> list[dict]:
    """Trains, evaluates and times each placement; returns one row per placement."""
    rows = []
    for placement in placements:
        run_config = copy.deepcopy(config)
        run_config.model.placement = placement
        run_dir = os.path.join(workdir, placement.replace(",", ""))
        final = train.train_and_evaluate(run_config, run_dir)
        rows.append(
            dict(
                placement=placement,
                params_m=final["num_params"] / 1e6,
                images_per_sec=measure_throughput(config, placement, batch_size, steps),
                top1=100.0 * final["eval_top1"],
            )
        )
    return rows


def write_table(rows: list[dict], workdir: str) -> None:
    """WORKDIR/hybrids.csv (full precision) and WORKDIR/hybrids.md (rounded)."""
    with open(os.path.join(workdir, "hybrids.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for row in rows:
        cells = (
            row["placement"].replace(",", " → "),
            f"{row['params_m']:.2f}",
            f"{row['images_per_sec']:.0f}",
            f"{row['top1']:.1f}",
        )
        lines.append("| " + " | ".join(cells) + " |")
    with open(os.path.join(workdir, "hybrids.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    placements = FLAGS.placement or list(FLAGS.config.hybrid_placements)
    rows = run_sweep(
        FLAGS.config, FLAGS.workdir, placements, FLAGS.throughput_batch_size, FLAGS.throughput_steps
    )
    write_table(rows, FLAGS.workdir)
    print(Path(FLAGS.workdir, "hybrids.md").read_text())


if __name__ == "__main__":
    define_flags()
    app.run(main)
