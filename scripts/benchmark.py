r"""Training and inference throughput, peak memory and compile time, side by side with timm.

Prints one JSON line per measurement (device, versions, all settings), then the tables of the
run; the protocol (synthetic inputs on the device, bf16, SGD-Nesterov, label smoothing 0.1, EMA
off) is `lambdanet.tools.benchmark_measure`'s, the targets and figures are in
results/throughput.md. The model is a config's (`--config=NAME[:ARG]`, as `lambdanet-train`
takes it; `default:MODEL` is the 90-epoch recipe with any registered model), its settings changed
with `--config.FIELD=VALUE`:

  python scripts/benchmark.py --config=default:resnet50 --peer=timm:resnet50
  python scripts/benchmark.py --config=default:lambda_resnet26t --image-size=256 --modes=train \
      --config.model.lambda_layer.impl=conv --peer=timm:lambda_resnet26t
  python scripts/benchmark.py --config=default:lambda_resnet50ts --peer=timm:lambda_resnet50ts \
      --peer-compile
  python scripts/benchmark.py --layer        # one lambda layer: each implementation and timm's
  python scripts/benchmark.py --table4       # the paper's Table 4 on this device
  python scripts/benchmark.py --cost-table   # GPU-hours of every paper config's full schedule
  python scripts/benchmark.py --cost-table --parallel=4  # four rows at once, one per GPU
  python scripts/benchmark.py --config=default:resnet50 --modes=train --scaling=1,2,4,8
      # data parallel on the first N devices, --batch-size per device; efficiency vs N = 1
      # (--config.sync_batch_norm=False: BatchNorm statistics per device)
  python scripts/benchmark.py --cost-table --estimate-from=results/raw/cost_table.jsonl
      # the same table from measured rows, the missing configs estimated from their FLOPs
  python scripts/benchmark.py --config=default:resnet50 --modes=train --profile-dir=traces
      # then: python scripts/profile_summary.py traces/resnet50_train
  python scripts/benchmark.py --input-pipeline --config=imagenette:resnet50 \
      --config.dataset.path=FILE.npz
      # a training config's own train step fed by its input pipeline vs one batch on the device

Each measurement runs in a fresh process (unless --no-isolate), so that its peak memory is its
own; a failure (e.g. out of memory) is the record's "error", never a crash. The train step's
`compile_s` is its tracing, lowering and compilation; with JAX_COMPILATION_CACHE_DIR set the step
is built as `lambdanet-train` builds it (its traced program saved or loaded, `traced_program`; the
compiled one cached): run twice for a second process's time.
"""

import os

from absl import app, flags
from ml_collections import config_flags

from lambdanet import command_line, configs
from lambdanet.tools import benchmark

_CONFIG = command_line.define_config_flag()
_MODES = flags.DEFINE_list("modes", list(benchmark.MODES), "train and/or inference (infer).")
_BATCH_SIZE = flags.DEFINE_integer("batch-size", 128, "Global batch (per device with --scaling).")
_IMAGE_SIZE = flags.DEFINE_integer("image-size", None, "Image side (default: the config's).")
_PEER = flags.DEFINE_multi_string("peer", [], "timm:MODEL, measured in the same run.")
_PEER_COMPILE = flags.DEFINE_bool("peer-compile", False, "Also torch.compile the peer.")
_WARMUP = flags.DEFINE_integer("warmup", 10, "Steps before the timed windows.")
_WINDOWS = flags.DEFINE_integer("windows", 3, "Timed windows (the median is reported).")
_STEPS = flags.DEFINE_integer("steps", 30, "Steps per timed window.")
_NO_FOLD_BN = flags.DEFINE_bool(
    "no-fold-bn", False, "Inference without folding BatchNorm into the convs."
)
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile-only", False, "Time initialisation (init_s) and the step's compilation only."
)
_PROFILE_DIR = flags.DEFINE_string(
    "profile-dir", None, "Also write a JAX profiler trace of --steps steps of our models."
)
_SCALING = flags.DEFINE_string(
    "scaling",
    None,
    "Comma list of device counts (e.g. 1,2,4,8): data parallel on the first N devices, "
    "--batch-size per device, with a table of scaling efficiency.",
)
_LAYER = flags.DEFINE_bool("layer", False, "Time one lambda layer (ours and timm's) instead.")
_SCOPE = flags.DEFINE_integer("scope", 9, "Lambda layer scope r (--layer).")
_LAYER_SHAPES = flags.DEFINE_string(
    "layer-shapes",
    ",".join("x".join(map(str, shape)) for shape in benchmark.LAYER_SHAPES),
    "Comma list of HxWxD input shapes (--layer; default: lambda_resnet50ts's).",
)
_TABLE4 = flags.DEFINE_bool("table4", False, "The paper's Table 4 (inference).")
_COST_TABLE = flags.DEFINE_bool("cost-table", False, "GPU-hours of the paper's configs.")
_ESTIMATE_FROM = flags.DEFINE_string(
    "estimate-from",
    None,
    "With --cost-table: measure nothing, take the rows of this JSON-lines file and estimate the "
    "missing configs from their forward FLOPs (runs on CPU).",
)
_PARALLEL = flags.DEFINE_integer(
    "parallel", 1, "With --cost-table: measure N rows at once, one process per GPU 0..N-1."
)
_INPUT_PIPELINE = flags.DEFINE_bool(
    "input-pipeline", False, "--config's train step fed by its input pipeline vs by one batch."
)
_ONLY = flags.DEFINE_string(
    "only", None, "Comma list of Table 4 configs, cost-table rows or --layer variants."
)
_NO_ISOLATE = flags.DEFINE_bool("no-isolate", False, "Measure in this process.")


def config_name(flag) -> str:
    """The --config flag's config as NAME[:ARG] for a shipped config, else its PATH[:ARG]."""
    path, sep, arg = config_flags.get_config_filename(flag).partition(":")
    folder, file = os.path.split(path)
    return (file.removesuffix(".py") if folder == configs.CONFIG_DIR else path) + sep + arg


def settings_from_flags() -> benchmark.Settings:
    config_flag = flags.FLAGS["config"]
    given = config_flag.present
    return benchmark.Settings(
        config=config_name(config_flag) if given else None,
        config_overrides=dict(config_flags.get_override_values(config_flag)) if given else {},
        modes=tuple(_MODES.value),
        batch_size=_BATCH_SIZE.value,
        image_size=_IMAGE_SIZE.value,
        peers=tuple(_PEER.value),
        peer_compile=_PEER_COMPILE.value,
        warmup=_WARMUP.value,
        windows=_WINDOWS.value,
        steps=_STEPS.value,
        fold_bn=not _NO_FOLD_BN.value,
        compile_only=_COMPILE_ONLY.value,
        profile_dir=_PROFILE_DIR.value,
        scaling=benchmark.device_counts(_SCALING.value) if _SCALING.value else (),
        layer=_LAYER.value,
        scope=_SCOPE.value,
        layer_shapes=benchmark.layer_shapes(_LAYER_SHAPES.value),
        table4=_TABLE4.value,
        cost_table=_COST_TABLE.value,
        estimate_from=_ESTIMATE_FROM.value,
        parallel=_PARALLEL.value,
        input_pipeline=_INPUT_PIPELINE.value,
        only=_ONLY.value,
        isolate=not _NO_ISOLATE.value,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    try:
        settings = settings_from_flags()
    except ValueError as error:
        raise app.UsageError(str(error)) from error
    benchmark.run(settings)


if __name__ == "__main__":
    app.run(main, flags_parser=command_line.parse_flags)
