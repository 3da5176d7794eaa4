"""Summaries of training runs: a Markdown table and a plot of validation top-1 against epochs.

`summarize(name, workdir)` reads a workdir's TensorBoard events (written by lambdanet's writers,
with or without TensorFlow), config.json, final_metrics.json and, if an eval-only run wrote it,
eval_metrics.json; `markdown_table` has one row per run: model, parameters, epochs, training
img/s (median over the logged windows, evaluation windows included), final validation top-1 and
the eval-only top-1; `plot_curves` draws every run's validation top-1 by epoch. The command line
is scripts/summarize_runs.py.
"""

import json
import os
import statistics
from collections.abc import Sequence
from pathlib import Path

from lambdanet.checkpoint import CONFIG_FILE
from lambdanet.evaluate import EVAL_METRICS_FILE
from lambdanet.train_loop import FINAL_METRICS_FILE


def read_scalars(workdir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the workdir's event files: tag -> [(step, value)] in step order."""
    import numpy as np
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.util import tensor_util

    series: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(workdir).glob("events.out.tfevents.*")):
        for event in event_file_loader.EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    number = value.simple_value
                elif value.HasField("tensor"):  # written by clu's (TensorFlow's) writer
                    array = np.asarray(tensor_util.make_ndarray(value.tensor))
                    if array.ndim or array.dtype.kind not in "fiu":
                        continue  # not a scalar (e.g. hparams metadata)
                    number = float(array)
                else:
                    continue
                series.setdefault(value.tag, []).append((event.step, number))
    return {tag: sorted(dict(points).items()) for tag, points in series.items()}


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def summarize(name: str, workdir: str) -> dict:
    """One run: its config, final and eval-only metrics, and the eval_top1 curve by epoch."""
    config = _read_json(os.path.join(workdir, CONFIG_FILE))
    final = _read_json(os.path.join(workdir, FINAL_METRICS_FILE))
    scalars = read_scalars(workdir)
    if "eval_top1" not in scalars:
        raise ValueError(f"{workdir} has no eval_top1 scalars: is it a lambdanet workdir?")
    last_step = max(step for step, _ in scalars["eval_top1"])
    steps_per_epoch = last_step / config["num_epochs"] if config.get("num_epochs") else 1.0
    rates = [rate for _, rate in scalars.get("images_per_sec", [])]
    return {
        "name": name,
        "model": config.get("model_name", "?"),
        "num_params": final.get("num_params"),
        "epochs": last_step / steps_per_epoch,
        "img_per_s": statistics.median(rates) if rates else None,
        "top1": final.get("eval_top1", scalars["eval_top1"][-1][1]),
        "eval_only_top1": _read_json(os.path.join(workdir, EVAL_METRICS_FILE)).get("eval_top1"),
        "curve": [(step / steps_per_epoch, value) for step, value in scalars["eval_top1"]],
    }


def markdown_table(runs: Sequence[dict]) -> str:
    """One row per run of `summarize`'s dicts (top-1 as a percentage, "-" when unknown)."""

    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}%"

    lines = [
        "| run | model | params | epochs | train img/s | val top-1 | eval-only top-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        params = "-" if run["num_params"] is None else f"{run['num_params'] / 1e6:.2f}M"
        rate = "-" if run["img_per_s"] is None else f"{run['img_per_s']:.0f}"
        lines.append(
            f"| {run['name']} | {run['model']} | {params} | {run['epochs']:.0f} | {rate} | "
            f"{pct(run['top1'])} | {pct(run['eval_only_top1'])} |"
        )
    return "\n".join(lines)


def plot_curves(runs: Sequence[dict], path: str, title: str = "") -> None:
    """Every run's validation top-1 (%) against epochs, in one PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    for run in runs:
        epochs, top1 = zip(*run["curve"], strict=True)
        axes.plot(epochs, [100 * v for v in top1], marker="o", markersize=3, label=run["name"])
    axes.set(xlabel="epoch", ylabel="validation top-1 (%)", title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
