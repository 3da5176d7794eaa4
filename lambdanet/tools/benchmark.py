"""Training and inference throughput, peak memory and compile time, side by side with timm: the
library behind `scripts/benchmark.py` (whose docstring gives the commands).

`Settings` holds the command line's choices; `build_specs` turns them into measurement specs
(JSON dicts, `benchmark_measure`), each measured in a fresh process (`run_isolated`: its peak
memory is its own; a crash or out-of-memory becomes the record's "error") or in this one; `run`
prints one JSON line per record, then the tables (`benchmark_tables`).

A spec names its config as `--config` does (NAME[:ARG] or PATH[:ARG]) with the `--config.FIELD`
overrides as a flat dict ({"model.lambda_layer.impl": "conv"}), so that a worker rebuilds it.
"""

import concurrent.futures
import dataclasses
import functools
import json
import queue
from pathlib import Path

from lambdanet.data import synthetic
from lambdanet.tools import benchmark_tables as tables
from lambdanet.tools.benchmark_measure import (
    LAYER_SHAPES,
    LAYER_VARIANTS,
    run_isolated,
    run_measurement,
    spec_config,
)

DEFAULT_CONFIG = "default"  # the 90-epoch recipe's ResNet-50
MODES = ("train", "infer")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to measure, and how (the command line's flags); a ValueError names a bad combination.

    config / config_overrides: the model's config (None: DEFAULT_CONFIG) and its dotted field
      overrides; the Table 4, cost-table and layer runs measure configs of their own.
    batch_size: the global batch (per device with `scaling`); image_size: None for the config's.
    peers: timm models ("timm:NAME") timed beside it, also torch.compiled with `peer_compile`.
    scaling: device counts (data parallel on the first N devices, 1 included).
    """

    config: str | None = None
    config_overrides: dict = dataclasses.field(default_factory=dict)
    modes: tuple[str, ...] = MODES
    batch_size: int = 128
    image_size: int | None = None
    peers: tuple[str, ...] = ()
    peer_compile: bool = False
    warmup: int = 10
    windows: int = 3
    steps: int = 30
    fold_bn: bool = True
    compile_only: bool = False
    profile_dir: str | None = None
    scaling: tuple[int, ...] = ()
    layer: bool = False
    scope: int = 9
    layer_shapes: tuple[tuple[int, int, int], ...] = LAYER_SHAPES
    table4: bool = False
    cost_table: bool = False
    estimate_from: str | None = None
    parallel: int = 1
    input_pipeline: bool = False
    only: str | None = None
    isolate: bool = True

    def __post_init__(self):
        own_configs = self.layer or self.table4 or self.cost_table
        problems = [
            (self.parallel < 1, f"--parallel {self.parallel}: give a number of GPUs, 1 or more"),
            (
                self.parallel > 1 and not self.cost_table,
                "--parallel runs rows of --cost-table: add --cost-table or drop --parallel",
            ),
            (
                self.parallel > 1 and not self.isolate,
                "--parallel runs each row in its own process: drop --no-isolate",
            ),
            (
                bool(self.scaling) and bool(self.peers or own_configs),
                "--scaling times --config's model alone: drop --peer, --layer, --table4, "
                "--cost-table",
            ),
            (
                own_configs and (self.config is not None or bool(self.config_overrides)),
                "--layer, --table4 and --cost-table measure configs of their own: drop --config",
            ),
            (
                not set(self.modes) <= set(MODES) or not self.modes,
                f"--modes takes {' and/or '.join(MODES)}, comma-separated; got {self.modes}",
            ),
        ]
        for bad, message in problems:
            if bad:
                raise ValueError(message)


def device_counts(text: str) -> tuple[int, ...]:
    """--scaling's argument "1,2,4" -> (1, 2, 4); it must hold the one-device base."""
    counts = [int(n) for n in text.split(",") if n.strip().isdigit()]
    if len(counts) != len(text.split(",")) or 1 not in counts or min(counts) < 1:
        raise ValueError(
            f"--scaling {text!r}: give device counts >= 1, comma-separated, including 1 (the base)"
        )
    return tuple(counts)


def layer_shapes(text: str) -> tuple[tuple[int, int, int], ...]:
    """``"56x56x64,28x28x128"`` -> ((56, 56, 64), (28, 28, 128)) for ``--layer-shapes``."""
    try:
        shapes = tuple(tuple(int(side) for side in item.split("x")) for item in text.split(","))
    except ValueError:
        shapes = ()
    if not shapes or any(len(shape) != 3 or min(shape) <= 0 for shape in shapes):
        raise ValueError(
            f"--layer-shapes takes a comma list of positive HxWxD, e.g. 56x56x64,28x28x128; "
            f"got {text!r}"
        )
    return shapes


def _timing(settings: Settings) -> dict:
    return dict(warmup=settings.warmup, windows=settings.windows, steps=settings.steps)


def model_spec(settings: Settings, config: str, **fields) -> dict:
    """A lambdanet model measurement of `config` under `settings` (train mode unless `fields`
    say otherwise)."""
    spec = dict(kind="model", mode="train", config=config, batch_size=settings.batch_size)
    spec |= dict(config_overrides=settings.config_overrides, fold_bn=settings.fold_bn)
    spec |= _timing(settings) | ({"image_size": settings.image_size} if settings.image_size else {})
    spec |= dict(compile_only=True) if settings.compile_only else {}
    return spec | ({"profile_dir": settings.profile_dir} if settings.profile_dir else {}) | fields


def _peer_spec(settings: Settings, model: dict, peer: str, compile_peer: bool) -> dict:
    """The timm peer of lambdanet measurement `model`: its mode, image size and classes."""
    config = spec_config(model)
    num_classes = config.dataset.num_classes or synthetic.NUM_CLASSES
    spec = dict(kind="model", mode=model["mode"], model=peer, batch_size=settings.batch_size)
    spec |= dict(image_size=config.dataset.image_size, num_classes=num_classes)
    return spec | _timing(settings) | dict(compile=compile_peer)


def build_specs(settings: Settings) -> list[dict]:
    """The measurements of `settings`, in the order they run and print."""
    if settings.layer:
        return [
            dict(kind="layer", shape=shape, impl=impl, scope=settings.scope)
            | dict(batch_size=settings.batch_size)
            | _timing(settings)
            for shape in settings.layer_shapes
            for impl in tables.selected(list(LAYER_VARIANTS), settings.only)
        ]
    config = settings.config or DEFAULT_CONFIG
    if settings.input_pipeline:
        spec = dict(kind="input", config=config, config_overrides=settings.config_overrides)
        return [spec | _timing(settings)]
    if settings.table4:
        return [
            model_spec(settings, name, mode="infer")
            for name, *_ in tables.selected(tables.TABLE4_ROWS, settings.only)
        ]
    if settings.scaling:
        return [
            model_spec(settings, config, mode=mode, num_devices=n)
            | dict(batch_size=settings.batch_size * n)
            for mode in settings.modes
            for n in settings.scaling
        ]
    specs = []
    for mode in settings.modes:
        specs.append(model := model_spec(settings, config, mode=mode))
        for peer in settings.peers:
            specs.append(_peer_spec(settings, model, peer, compile_peer=False))
            if settings.peer_compile and mode == "train":
                specs.append(_peer_spec(settings, model, peer, compile_peer=True))
    return specs


def _is_out_of_memory(record: dict) -> bool:
    error = record.get("error", "")
    return "RESOURCE_EXHAUSTED" in error or "out of memory" in error.lower()


def cost_table(settings: Settings, measure) -> list[dict]:
    """Training img/s of every paper config at its resolution (batch halved until it fits, as
    ResNet-RS measured latency) and the GPU-hours of its whole schedule; `measure(spec)`
    measures a spec. With `settings.parallel` = N, N rows run at once, each measured by
    `measure(spec, device=D)` on one of GPUs 0..N-1 (their compiles overlap); the records keep
    the configs' order."""
    names = tables.selected(list(tables.COST_CONFIGS), settings.only)
    if settings.parallel <= 1:
        return [_cost_row(settings, name, measure) for name in names]
    free_devices = queue.SimpleQueue()
    for device in range(settings.parallel):
        free_devices.put(device)

    def row_on_a_free_device(name: str) -> dict:
        device = free_devices.get()
        try:
            return _cost_row(settings, name, functools.partial(measure, device=device))
        finally:
            free_devices.put(device)

    with concurrent.futures.ThreadPoolExecutor(settings.parallel) as pool:
        return list(pool.map(row_on_a_free_device, names))


def _cost_row(settings: Settings, name: str, measure) -> dict:
    """One config's record (printed as it is measured), its batch halved while out of memory."""
    batch_size = settings.batch_size
    while True:
        record = measure(model_spec(settings, name, batch_size=batch_size))
        if not _is_out_of_memory(record) or batch_size <= 8:
            break
        batch_size //= 2
    record = tables.with_gpu_hours(record)
    print(json.dumps(record), flush=True)
    return record


def _estimated_cost_rows(settings: Settings) -> list[dict]:
    """The cost rows of `settings.estimate_from`'s JSON lines, the missing ones estimated."""
    lines = Path(settings.estimate_from).read_text().splitlines()
    measured = [json.loads(line) for line in lines if line.strip()]
    records = tables.estimate_cost_rows(measured, settings.only)
    for record in records:
        print(json.dumps(record), flush=True)
    return records


def run(settings: Settings) -> None:
    """Measures `settings`' specs, printing each record as a JSON line, then their table."""
    measure = run_isolated if settings.isolate else run_measurement
    if settings.cost_table:
        estimated = settings.estimate_from is not None
        records = _estimated_cost_rows(settings) if estimated else cost_table(settings, measure)
        print(tables.cost_markdown(records))
        return
    records = []
    for spec in build_specs(settings):
        records.append(measure(spec))
        print(json.dumps(records[-1]), flush=True)
    if settings.table4:
        print(tables.table4_markdown(records, settings.only))
    if settings.scaling:
        print(tables.scaling_markdown(records))
