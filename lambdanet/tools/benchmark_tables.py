"""The benchmark's tables: which configs the paper's Table 4 and the cost table measure, and the
Markdown of their records (and of a data-parallel scaling study).

Rows are data: config names (`lambdanet.configs.load_config`), the cost table's under the short
labels its records carry (`"config"` of a record, `--only`). A record is one JSON line of
`lambdanet.tools.benchmark_measure.run_measurement`.
"""

import math

import ml_collections

from lambdanet import configs
from lambdanet.configs.lambda_resnet import TABLE_13
from lambdanet.data.synthetic import IMAGENET_TRAIN_EXAMPLES

# Table 4: config, row, paper memory (GB), paper inference ex/s on 8 TPUv3 cores, and the layer
# of the analytic memory model (`analysis.table4_memory_gib`) with its settings.
TABLE4_ROWS = (
    ("default:global_sa_resnet50", "Global self-attention", "120", "OOM", "global_sa", {}),
    ("default:axial_sa_resnet50", "Axial self-attention", "4.8", "960", "axial_sa", {}),
    ("default:local_sa_resnet50", "Local self-attention (7x7)", "-", "440", "local_sa", {}),
    ("default:lambda_resnet50_all", "Lambda layer", "1.9", "1160", "lambda", {}),
    ("default:lambda_resnet50_k8", "Lambda layer (|k|=8)", "0.95", "1640", "lambda", {"dim_k": 8}),
    ("default:lambda_resnet50_shared", "Lambda layer (shared embeddings)", "0.63", "1210",
     "lambda_shared", {}),
    ("default:lambda_conv_resnet50", "Lambda convolution (7x7)", "-", "1100", "lambda_conv", {}),
)  # fmt: skip
# Every training config of the paper, label -> config name. The LambdaResNets are the rows of
# Table 13 but depth 200, which the paper does not report.
COST_CONFIGS = {
    "resnet50": "resnet50",
    "lambda_resnet50_all": "lambda_resnet50_all",
    **{
        f"lambda_resnet{depth}:{size}": f"lambda_resnet:depth={depth},size={size}"
        for depth, size in TABLE_13
        if depth != 200
    },
}


def load_config(name: str) -> ml_collections.ConfigDict:
    """A cost-table row's config by its label (COST_CONFIGS), or any config NAME[:ARG]."""
    return configs.load_config(COST_CONFIGS.get(name, name))


def selected(rows, only: str | None):
    """The rows (names, or tuples starting with a name) named in the comma list `only`."""
    if not only:
        return rows
    names = only.split(",")
    return [row for row in rows if (row if isinstance(row, str) else row[0]) in names]


def with_gpu_hours(record: dict) -> dict:
    """A cost record with the GPU-hours of its config's whole ImageNet schedule at its img/s."""
    if "img_per_s" not in record:
        return record
    hours = record["epochs"] * IMAGENET_TRAIN_EXAMPLES / record["img_per_s"] / 3600
    return record | dict(gpu_hours_1gpu=hours, wall_hours_8gpu_linear=hours / 8)


def config_flops(name: str) -> float:
    """FLOPs of one image's inference forward pass at config `name`'s resolution (XLA)."""
    from lambdanet import analysis, train

    config = load_config(name)
    size = config.dataset.image_size
    return analysis.flops(train.create_model(config, 1000), (1, size, size, 3))


def estimate_cost_rows(measured: list[dict], only: str | None = None, flops_of=None):
    """The cost table from measured rows, with every missing config estimated.

    The training FLOP rate, img/s x forward FLOPs per image, grows with the FLOPs per image (larger
    matrix products). A config without a measurement gets the rate interpolated linearly in
    log FLOPs between the two measured configs of its model family (registry family) whose FLOPs
    bracket its own, or the nearest one's rate outside the measured range (no extrapolation), and
    the batch size of that nearest row: img/s = rate / FLOPs. Such rows carry `estimated_from`;
    nothing runs on a device.
    """
    flops_of = flops_of or config_flops
    done = {r["config"]: r for r in measured if "img_per_s" in r}
    names = selected(list(COST_CONFIGS), only)
    flops = {name: flops_of(name) for name in {*names, *done}}
    family = {name: _family(name) for name in flops}
    records = []
    for name in names:
        if name in done:
            records.append(done[name] | dict(fwd_gflops=flops[name] / 1e9))
            continue
        refs = sorted((r for r in done if family[r] == family[name]), key=flops.get)
        if not refs:
            raise ValueError(f"no measured {family[name]!r} row to estimate {name!r} from")
        rate = {r: done[r]["img_per_s"] * flops[r] for r in refs}
        below = [r for r in refs if flops[r] <= flops[name]] or refs[:1]
        above = [r for r in refs if flops[r] >= flops[name]] or refs[-1:]
        lo, hi = below[-1], above[0]
        t = 0.0 if lo == hi else math.log(flops[name] / flops[lo]) / math.log(flops[hi] / flops[lo])
        nearest = min((lo, hi), key=lambda r: abs(math.log(flops[r] / flops[name])))
        config = load_config(name)
        record = dict(config=name, image_size=config.dataset.image_size, epochs=config.num_epochs)
        record |= dict(batch_size=done[nearest]["batch_size"])
        record |= dict(estimated_from=lo if lo == hi else f"{lo} .. {hi}")
        record |= dict(img_per_s=((1 - t) * rate[lo] + t * rate[hi]) / flops[name])
        records.append(with_gpu_hours(record | dict(fwd_gflops=flops[name] / 1e9)))
    return records


def _family(config_name: str) -> str:
    from lambdanet.models import model_entry

    return model_entry(load_config(config_name).model_name).family


def _markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _fmt(value, digits=0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def scaling_markdown(records: list[dict]) -> str:
    """Throughput on N devices against N x the one-device throughput of the same config and
    mode."""
    base = {
        (r["config"], r["mode"]): r["img_per_s"]
        for r in records
        if r.get("num_devices") == 1 and "img_per_s" in r
    }
    rows = []
    for r in records:
        rate, one = r.get("img_per_s"), base.get((r["config"], r["mode"]))
        n = r["num_devices"]
        efficiency = None if rate is None or one is None else rate / (n * one)
        rows.append(
            [r["config"], r["mode"], n, r["batch_size"], _fmt(rate), _fmt(rate and rate / n),
             _fmt(efficiency, 3), _fmt(r.get("peak_gib"), 2), r.get("error", "")[:60]]
        )  # fmt: skip
    header = ["config", "mode", "devices", "global batch", "img/s", "img/s per device",
              "efficiency", "peak GiB (device 0)", "error"]  # fmt: skip
    return _markdown(header, rows)


def table4_markdown(records: list[dict], only: str | None = None) -> str:
    """Table 4 beside its measured inference records (in TABLE4_ROWS order, `only` selected)."""
    from lambdanet import analysis

    rows = []
    for (name, row, paper_mem, paper_rate, layer, kwargs), record in zip(
        selected(TABLE4_ROWS, only), records, strict=True
    ):
        analytic = analysis.table4_memory_gib(layer, **kwargs)
        rate = record.get("error", "OOM")[:40] if "img_per_s" not in record else record["img_per_s"]
        rate = _fmt(rate) if isinstance(rate, float) else rate
        model = name.partition(":")[2]
        peak = _fmt(record.get("peak_gib"), 2)
        rows.append([row, model, paper_mem, f"{analytic:.3g}", peak, paper_rate, rate])
    header = ["Layer (Table 4)", "model", "paper GB", "analytic GiB", "peak GiB", "paper ex/s",
              "ex/s here"]  # fmt: skip
    return _markdown(header, rows)


def _cost_source(record: dict) -> str:
    """A cost row's source cell: the GPU it was measured on, or the rows it is estimated from."""
    if "estimated_from" in record:
        return f"estimated from {record['estimated_from']}"
    device = record.get("device", "").removeprefix("NVIDIA ")
    return f"measured on {device}" if device else "measured"


def cost_markdown(records: list[dict]) -> str:
    """The cost table: each config's train img/s and the GPU-hours of its whole schedule."""
    rows = [
        [r["config"], r.get("image_size", "-"), _fmt(r.get("epochs")), r["batch_size"],
         _fmt(r.get("fwd_gflops"), 1), _fmt(r.get("img_per_s")),
         _fmt(r.get("gpu_hours_1gpu"), 1),
         _fmt(r.get("wall_hours_8gpu_linear"), 1),
         _cost_source(r),
         r.get("error", "")[:60]]
        for r in records
    ]  # fmt: skip
    header = ["config", "image size", "epochs", "batch", "forward GFLOPs / image", "train img/s",
              "GPU-hours (1 GPU)", "hours on 8 GPUs (linear)", "source", "error"]  # fmt: skip
    return _markdown(header, rows)
