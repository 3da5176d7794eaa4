"""The sweep's table and plot: per entry its top-1 over seeds, parameters and throughput.

`summarize(records)` turns the sweep's result lines (`lambdanet.tools.sweep`: one per finished
run, `kind="run"`, and one per throughput measurement, `kind="throughput"`) into one row per
entry: placement, number of seeds, top-1 mean ± sample standard deviation over seeds,
parameters, inference and training img/s. `write_table` writes PREFIX.csv (full precision),
PREFIX.md (rounded, with the pairs of entries whose top-1 means differ by more than 2 standard
errors, sqrt(s1²/n1 + s2²/n2)) and PREFIX.png (top-1, error bars one std, against inference
img/s; points labelled by entry, the all-conv and all-lambda entries marked as the end points).
"""

import csv
import itertools
import math
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

COLUMNS = ("entry", "placement", "n_seeds", "top1_mean", "top1_std", "params_m")
COLUMNS += ("infer_img_per_s", "train_img_per_s")
HEADERS = ("entry", "placement", "seeds", "top-1 (%), mean ± std", "params (M)")
HEADERS += ("inference (img/s)", "training (img/s)")


def summarize(records: list[dict], order: Sequence[str] = ()) -> list[dict]:
    """One row per entry (those of `order` first, then the others as they appear): placement,
    seeds, top-1 (%) mean and sample std over seeds (None below 2 seeds), parameters (M) and
    img/s of each throughput mode (None when missing)."""
    names = list(dict.fromkeys([*order, *(r["entry"] for r in records)]))
    rows = []
    for name in names:
        own = [r for r in records if r["entry"] == name]
        runs = [r for r in own if r["kind"] == "run"]
        speed = {r["mode"]: r["img_per_s"] for r in own if r["kind"] == "throughput"}
        top1 = [100.0 * r["top1"] for r in runs]
        rows.append(
            dict(
                entry=name,
                placement=next((r["placement"] for r in own), None),
                n_seeds=len(top1),
                top1_mean=statistics.mean(top1) if top1 else None,
                top1_std=statistics.stdev(top1) if len(top1) > 1 else None,
                params_m=runs[0]["num_params"] / 1e6 if runs else None,
                infer_img_per_s=speed.get("infer"),
                train_img_per_s=speed.get("train"),
            )
        )
    return rows


def significant_pairs(rows: list[dict]) -> list[tuple[str, str, float, float]]:
    """(entry a, entry b, mean a - mean b, standard error of the difference) for each pair of
    rows with 2+ seeds whose top-1 means differ by more than 2 standard errors."""
    pairs = []
    for a, b in itertools.combinations([r for r in rows if r["n_seeds"] > 1], 2):
        difference = a["top1_mean"] - b["top1_mean"]
        se = math.sqrt(a["top1_std"] ** 2 / a["n_seeds"] + b["top1_std"] ** 2 / b["n_seeds"])
        if abs(difference) > 2 * se:
            pairs.append((a["entry"], b["entry"], difference, se))
    return pairs


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: list[dict], note: str = "") -> str:
    """The table (top-1 as mean ± std), `note`, and the pairs that differ by more than 2 SE."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for row in rows:
        top1 = _fmt(row["top1_mean"], ".1f")
        if row["top1_std"] is not None:
            top1 += f" ± {row['top1_std']:.1f}"
        cells = (
            row["entry"],
            _fmt(row["placement"], "").replace(",", " → "),
            str(row["n_seeds"]),
            top1,
            _fmt(row["params_m"], ".2f"),
            _fmt(row["infer_img_per_s"], ".0f"),
            _fmt(row["train_img_per_s"], ".0f"),
        )
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", note] if note else []
    lines += ["", "Top-1 differences larger than 2 standard errors (SE = sqrt(s1²/n1 + s2²/n2)):"]
    pairs = significant_pairs(rows)
    lines += [f"- {a} - {b}: {d:+.2f} points (SE {se:.2f})" for a, b, d, se in pairs]
    return "\n".join(lines + ([] if pairs else ["- none"])) + "\n"


def plot(rows: list[dict], path: str) -> None:
    """Top-1 (error bars: one std) against inference img/s, each point labelled by its entry;
    the all-conv and all-lambda entries are the end points (squares, joined by a dotted line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["top1_mean"] is not None and r["infer_img_per_s"]]
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    ends = [r for r in shown if _is_end_point(r["placement"])]
    if len(ends) == 2:
        speeds, top1 = [r["infer_img_per_s"] for r in ends], [r["top1_mean"] for r in ends]
        axes.plot(speeds, top1, ":", color="gray", label="all-conv to all-lambda")
    for row in shown:
        axes.errorbar(
            row["infer_img_per_s"],
            row["top1_mean"],
            yerr=row["top1_std"] or 0.0,
            fmt="s" if row in ends else "o",
            color="C1" if row in ends else "C0",
            capsize=3,
        )
        point = (row["infer_img_per_s"], row["top1_mean"])
        axes.annotate(row["entry"], point, textcoords="offset points", xytext=(5, 4), fontsize=8)
    axes.set(xlabel="inference throughput (images/s)", ylabel="top-1 (%), mean ± std over seeds")
    axes.grid(alpha=0.3)
    if len(ends) == 2:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _is_end_point(placement: str | None) -> bool:
    """Whether the placement holds one kind of layer only (C,C,C,C or L,L,L,L)."""
    letters = set((placement or "").replace(",", ""))
    return letters in ({"C"}, {"L"})


def write_table(rows: list[dict], prefix: str, note: str = "") -> None:
    """PREFIX.csv (full precision), PREFIX.md (rounded, with `note` and the 2-SE pairs) and
    PREFIX.png."""
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    with open(f"{prefix}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    Path(f"{prefix}.md").write_text(markdown_table(rows, note))
    plot(rows, f"{prefix}.png")


def table_note(records: list[dict]) -> str:
    """How the table's numbers were obtained (devices and batch of the throughput lines)."""
    speeds = [r for r in records if r["kind"] == "throughput"]
    devices = ", ".join(sorted({str(r.get("device")) for r in speeds})) or "-"
    batches = ", ".join(sorted({str(r.get("batch_size")) for r in speeds})) or "-"
    return (
        "Top-1: final validation top-1 of each seed (config.seed and data_seed), mean ± sample "
        "standard deviation. Parameters: the trained model's. Throughput: scripts/benchmark.py "
        f"(measure_jax_model), each entry alone on one GPU, synthetic inputs, 1,000 classes, "
        f"batch {batches}, on {devices}."
    )
