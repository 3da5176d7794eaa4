"""Training and inference throughput, peak memory and compile time, side by side with timm.

Prints one JSON line per measurement (device, versions, all settings). Protocol (the same for
lambdanet and the timm peer; targets and figures in results/throughput.md): synthetic inputs already
on the device, bf16 compute, SGD-Nesterov with weight decay and label smoothing 0.1 (lambdanet's own
`train_step`, EMA off), `--warmup` steps, then the median of `--windows` timed windows of `--steps`
steps, synchronised with `block_until_ready` (torch: `cuda.synchronize`). lambdanet's inference
folds BatchNorm into the convs inside the timed step (`lambdanet.models.fold`; `--no-fold-bn` runs
the BatchNorms as they are, as timm's eager peer does).

Each measurement runs in a fresh subprocess (unless `--no-isolate`), so that its peak memory is
its own: JAX reports `peak_bytes_in_use`, torch `max_memory_allocated`. A failure (e.g. out of
memory) is reported in the record's "error" field, never as a crash. The train step's
`compile_s` is its tracing, lowering and compilation; with JAX_COMPILATION_CACHE_DIR set the step
is built as `lambdanet.main` builds it (`step_cache.CachedStep`: its traced program saved or
loaded, `traced_program`; the compiled one cached): run twice for a second process's time.

Modes (`scripts/benchmark.py` is the command line):
  python scripts/benchmark.py --model resnet50 --peer timm:resnet50
  python scripts/benchmark.py --model lambda_resnet50ts --peer timm:lambda_resnet50ts --peer-compile
  python scripts/benchmark.py --layer        # one lambda layer: each implementation and timm's
  python scripts/benchmark.py --table4       # the paper's Table 4 on this device
  python scripts/benchmark.py --cost-table   # GPU-hours of every paper config's full schedule
  python scripts/benchmark.py --cost-table --parallel 4  # four rows at once, one per GPU
  python scripts/benchmark.py --model resnet50 --modes train --scaling 1,2,4,8
      # data parallel on the first N devices, --batch-size per device; efficiency vs N = 1
      # (--config-overrides '{"sync_batch_norm": false}': BatchNorm statistics per device)
  python scripts/benchmark.py --cost-table --estimate-from results/raw/cost_table.jsonl
      # the same table from measured rows, the missing configs estimated from their FLOPs
  python scripts/benchmark.py --model resnet50 --modes train --profile-dir traces/
      # then: python scripts/profile_summary.py traces/resnet50_train
  python scripts/benchmark.py --input-pipeline --config imagenette:resnet50 \\
      --config-overrides '{"dataset.path": "FILE.npz"}'
      # a training config's own train step fed by its input pipeline vs one batch on the device
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import math
import os
import queue
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lambdanet import config_loading

ROOT = Path(__file__).resolve().parents[1]

# JAX must not grab most of the GPU up front: the peer and peak-memory readings share the card.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

LAYER_SHAPES = ((28, 28, 128), (14, 14, 256), (7, 7, 512))  # lambda_resnet50ts, batch 128
# LambdaLayer settings of each timed variant ("timm" is timm's own LambdaLayer).
LAYER_VARIANTS = {
    "einsum": dict(impl="einsum"),
    "conv": dict(impl="conv"),
    "rows": dict(impl="rows"),
    "timm": None,
}


def _median_rate(run_steps, *, images_per_step, warmup, windows, steps):
    """Images/s: `warmup` steps, then the median over `windows` windows of `steps` steps."""
    run_steps(warmup)
    rates = []
    for _ in range(windows):
        start = time.perf_counter()
        run_steps(steps)
        rates.append(images_per_step * steps / (time.perf_counter() - start))
    return statistics.median(rates), rates


# Table 4: registry model, row, paper memory (GB), paper inference ex/s on 8 TPUv3
# cores, and the layer of the analytic memory model (`analysis.table4_memory_gib`).
TABLE4_ROWS = (
    ("global_sa_resnet50", "Global self-attention", "120", "OOM", "global_sa", {}),
    ("axial_sa_resnet50", "Axial self-attention", "4.8", "960", "axial_sa", {}),
    ("local_sa_resnet50", "Local self-attention (7x7)", "-", "440", "local_sa", {}),
    ("lambda_resnet50_all", "Lambda layer", "1.9", "1160", "lambda", {}),
    ("lambda_resnet50_k8", "Lambda layer (|k|=8)", "0.95", "1640", "lambda", dict(dim_k=8)),
    (
        "lambda_resnet50_shared",
        "Lambda layer (shared embeddings)",
        "0.63",
        "1210",
        "lambda_shared",
        {},
    ),
    ("lambda_conv_resnet50", "Lambda convolution (7x7)", "-", "1100", "lambda_conv", {}),
)
CONFIG_DIR = ROOT / "configs"
# Every training config of the paper, by the name its rows carry (--only, `"config"` of the
# records): configs/NAME.py[:ARG] as NAME[:ARG]. The LambdaResNets are the rows of Table 13 but
# depth 200, which the paper does not report.
COST_CONFIGS = {
    "resnet50": "resnet50",
    "lambda_resnet50_all": "lambda_resnet50_all",
    **{
        f"lambda_resnet{depth}:{size}": f"lambda_resnet:depth={depth},size={size}"
        for depth, size in config_loading.load_module(CONFIG_DIR / "lambda_resnet.py").TABLE_13
        if depth != 200
    },
}
IMAGENET_TRAIN_EXAMPLES = 1_281_167


def _ms_per_call(run_steps, spec: dict) -> dict:
    """{"ms": median milliseconds per call} of `run_steps(n)` under the spec's protocol."""
    rate, _ = _median_rate(
        run_steps,
        images_per_step=1,
        warmup=spec["warmup"],
        windows=spec["windows"],
        steps=spec["steps"],
    )
    return {"ms": 1000.0 / rate}


def _environment(framework: str) -> dict:
    import jax

    env = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    if framework == "jax":
        import flax

        env["flax"] = flax.__version__
    else:
        import timm
        import torch

        env.update(torch=torch.__version__, timm=timm.__version__)
        if torch.cuda.is_available():
            env["device"] = torch.cuda.get_device_name()
    return env


def _jax_peak_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def load_config(name: str):
    """A cost-table config by its name (COST_CONFIGS), or configs/NAME.py as NAME[:ARG] (ARG goes
    to its get_config, e.g. imagenette:resnet50)."""
    file, sep, arg = COST_CONFIGS.get(name, name).partition(":")
    return config_loading.load_config(f"{CONFIG_DIR / file}.py{sep}{arg}")


def measure_jax_model(spec: dict) -> dict:
    """lambdanet's train step (train.train_step) or inference on synthetic device inputs."""
    import jax
    import jax.numpy as jnp

    from lambdanet import checkpoint, sharding, step_cache, train

    config = load_config(spec.get("config", "resnet50"))
    if spec.get("model"):
        config.model_name = spec["model"]
    config.model.update(spec.get("overrides", {}))
    config.half_precision = spec["dtype"] == "bfloat16"
    config.global_batch_size = spec["batch_size"]
    spec.setdefault("image_size", config.dataset.image_size)
    config.ema_decay = 0.0
    config.nesterov, config.label_smoothing = True, 0.1
    apply_config_overrides(config, spec.get("config_overrides", {}))
    devices = jax.devices()
    num_devices = spec.get("num_devices") or len(devices)
    if num_devices > len(devices):
        raise ValueError(
            f"{num_devices} devices asked for but {len(devices)} are visible: "
            f"pass --scaling counts up to {len(devices)}"
        )
    mesh = sharding.create_mesh(devices[:num_devices])
    size = spec["image_size"]
    model = train.create_model(config, spec["num_classes"])
    lr_fn = train.create_learning_rate_fn(config, steps_per_epoch=1000, num_train_steps=100_000)
    start = time.perf_counter()
    state = train.create_train_state(config, model, size, lr_fn, mesh)
    init_s = time.perf_counter() - start
    key = jax.random.key(0)
    batch = {
        "image": jax.random.normal(key, (spec["batch_size"], size, size, 3), jnp.float32),
        "label": jax.random.randint(key, (spec["batch_size"],), 0, spec["num_classes"]),
    }
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    rngs = train.create_rngs(config, mesh)
    result = {"num_params": train.count_params(state.params), "image_size": size, "init_s": init_s}
    result["num_devices"] = num_devices
    result |= {"epochs": config.num_epochs, "model": config.model_name}

    if spec["mode"] == "train":
        step = jax.jit(
            train.configured_train_step(config, mesh, lr_fn, lambda b, rng, train: b),
            donate_argnums=0,
        )
        start = time.perf_counter()
        cached = step_cache.CachedStep(  # as lambdanet.main builds it (no cache dir: plain jit)
            step,
            lambda state, batch, rngs: (state, train.TrainMetrics.empty()),
            key=dict(step="benchmark_train", config=checkpoint.config_to_dict(config)),
            donate_argnums=(0,),
        )
        compiled = cached.compile(state, batch, rngs)
        result["compile_s"] = time.perf_counter() - start
        result["traced_program"] = cached.how.split(" from ")[0].split(" to ")[0]
        if spec.get("compile_only"):
            return result
        holder = [state]

        def run_steps(n):
            for _ in range(n):
                holder[0], metrics = compiled(holder[0], batch, rngs)
            jax.block_until_ready(holder[0].params)

    else:
        from lambdanet.models import fold_batch_norm

        variables = {"params": state.params, "batch_stats": state.batch_stats}
        fold = result["fold_bn"] = spec.get("fold_bn", True)

        @jax.jit
        def infer(variables, images):  # BatchNorm folded inside the timed step
            net, variables = fold_batch_norm(model, variables) if fold else (model, variables)
            return net.apply(variables, images, train=False)

        start = time.perf_counter()
        compiled = infer.lower(variables, batch["image"]).compile()
        result["compile_s"] = time.perf_counter() - start

        def run_steps(n):
            out = None
            for _ in range(n):
                out = compiled(variables, batch["image"])
            jax.block_until_ready(out)

    rate, rates = _median_rate(
        run_steps,
        images_per_step=spec["batch_size"],
        warmup=spec["warmup"],
        windows=spec["windows"],
        steps=spec["steps"],
    )
    peak = _jax_peak_bytes()
    if spec.get("profile_dir"):  # a trace of `steps` more steps (scripts/profile_summary.py)
        trace_dir = os.path.join(spec["profile_dir"], f"{config.model_name}_{spec['mode']}")
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            run_steps(spec["steps"])
        result["trace_dir"] = trace_dir
    result.update(img_per_s=rate, window_img_per_s=rates)
    result["peak_gib"] = None if peak is None else peak / 2**30
    return result


def apply_config_overrides(config, overrides: dict) -> None:
    """Sets dotted config fields in place ({"dataset.path": "FILE.npz"}); an unknown field is a
    ValueError that names it and lists the fields at its level. ``model.X`` may be new: the
    model dict holds create_model overrides, which the registry checks when building."""

    def require(node, part: str, key: str, path: list[str]) -> None:
        if not hasattr(node, "keys") or part not in node.keys():
            known = sorted(node.keys()) if hasattr(node, "keys") else []
            raise ValueError(
                f"--config-overrides: {key!r} is not a config field ({part!r} is not in "
                f"{'.'.join(path) or 'the config'}; its fields: {known}). Use dotted names, "
                "e.g. 'dataset.path'."
            )

    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for depth, part in enumerate(parents):
            require(node, part, key, parents[:depth])
            node = node[part]
        if parents != ["model"]:
            require(node, leaf, key, parents)
        node[leaf] = value


def measure_input_pipeline(spec: dict) -> dict:
    """The training loop's step (`train.create_experiment`, device augmentation included) fed by
    the config's input pipeline, against the same compiled step fed one batch that is already on
    the device ("synthetic"), the pipeline's windows first; `input_ms_per_step` is the host
    time spent producing and sending each batch (it hides behind the asynchronous step unless it
    is the longer of the two)."""
    import jax

    from lambdanet import sharding, train

    config = load_config(spec["config"])
    apply_config_overrides(config, spec.get("config_overrides", {}))
    exp = train.create_experiment(config)
    source = exp.dataset.train_iter(0)
    batches = sharding.prefetch_to_device(source, exp.mesh)
    on_device = next(batches)
    state, input_seconds = [exp.state], [0.0]

    def run_steps(n, real):
        for _ in range(n):
            batch = on_device
            if real:
                start = time.perf_counter()
                batch = next(batches)
                input_seconds[0] += time.perf_counter() - start
            state[0], _ = exp.train_step(state[0], batch, exp.rngs)
        jax.block_until_ready(state[0].params)

    batch_size, n = config.global_batch_size, spec["steps"]
    run_steps(spec["warmup"], real=True)
    # Batches the workers decoded while the step compiled would inflate the first window.
    for _ in range(getattr(exp.dataset, "buffered_batches", 0)):
        next(batches)
    rates = {True: [], False: []}
    input_seconds[0] = 0.0
    # The pipeline's windows run back to back: a pipeline with worker buffers (ArrayRecord) would
    # refill them during an interleaved synthetic window and look faster than it is. Its workers
    # stop before the on-device windows, which would otherwise share the host's CPU with them.
    for real in (True, False):
        if not real and hasattr(source, "close"):
            source.close()
        for _ in range(spec["windows"]):
            start = time.perf_counter()
            run_steps(n, real)
            rates[real].append(batch_size * n / (time.perf_counter() - start))
    real_rate, synthetic_rate = statistics.median(rates[True]), statistics.median(rates[False])
    return {
        "model": config.model_name,
        "image_size": config.dataset.image_size,
        "batch_size": batch_size,
        "real_img_per_s": real_rate,
        "synthetic_img_per_s": synthetic_rate,
        "real_vs_synthetic": real_rate / synthetic_rate,
        "input_ms_per_step": 1000 * input_seconds[0] / (spec["windows"] * n),
        "window_img_per_s": {"real": rates[True], "synthetic": rates[False]},
    }


def measure_timm_model(spec: dict) -> dict:
    """timm model: bf16 autocast, SGD-Nesterov + weight decay, label smoothing, channels_last."""
    import timm
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = spec["model"].split(":", 1)[1]
    size, batch_size = spec["image_size"], spec["batch_size"]
    model = timm.create_model(name, num_classes=spec["num_classes"]).to(device)
    x = torch.randn(batch_size, 3, size, size, device=device)
    y = torch.randint(0, spec["num_classes"], (batch_size,), device=device)
    try:  # timm's lambda layer uses a Conv3d, which rejects channels_last inputs
        model = model.to(memory_format=torch.channels_last)
        xc = x.to(memory_format=torch.channels_last)
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            model.eval()(xc[:2])
        x, channels_last = xc, True
    except RuntimeError:
        model = model.to(memory_format=torch.contiguous_format)
        channels_last = False
    run_model = torch.compile(model) if spec.get("compile") else model
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    opt = torch.optim.SGD(
        model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4
    )
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    if spec["mode"] == "train":
        model.train()

        def one_step():
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = loss_fn(run_model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    else:
        model.eval()

        def one_step():
            with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
                run_model(x)

    start = time.perf_counter()
    one_step()
    sync()
    compile_s = time.perf_counter() - start
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def run_steps(n):
        for _ in range(n):
            one_step()
        sync()

    rate, rates = _median_rate(
        run_steps,
        images_per_step=batch_size,
        warmup=spec["warmup"],
        windows=spec["windows"],
        steps=spec["steps"],
    )
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return {
        "num_params": sum(p.numel() for p in model.parameters()),
        "img_per_s": rate,
        "window_img_per_s": rates,
        "peak_gib": peak,
        "first_step_s": compile_s,
        "channels_last": channels_last,
    }


def measure_jax_layer(spec: dict) -> dict:
    """One LambdaLayer forward+backward (bf16) at [b, H, W, d]; milliseconds per call."""
    import jax
    import jax.numpy as jnp

    from lambdanet.layers import LambdaLayer

    h, w, d = spec["shape"]
    settings = LAYER_VARIANTS[spec["impl"]]
    layer = LambdaLayer(dim_k=16, heads=4, scope_size=spec["scope"], dtype=jnp.bfloat16, **settings)
    x = jax.random.normal(jax.random.key(0), (spec["batch_size"], h, w, d), jnp.bfloat16)
    variables = layer.init(jax.random.key(1), x)

    @jax.jit
    def fwd_bwd(params, x):
        def loss(params, x):
            y, _ = layer.apply(
                {"params": params, "batch_stats": variables["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            return jnp.sum(y.astype(jnp.float32))

        return jax.grad(loss, argnums=(0, 1))(params, x)

    fwd_bwd(variables["params"], x)

    def run_steps(n):
        out = None
        for _ in range(n):
            out = fwd_bwd(variables["params"], x)
        jax.block_until_ready(out)

    return _ms_per_call(run_steps, spec)


def measure_timm_layer(spec: dict) -> dict:
    """timm's LambdaLayer forward+backward under bf16 autocast; milliseconds per call."""
    import torch
    from timm.layers.lambda_layer import LambdaLayer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    h, w, d = spec["shape"]
    layer = LambdaLayer(d, num_heads=4, dim_head=16, r=spec["scope"]).to(device)
    x = torch.randn(spec["batch_size"], d, h, w, device=device, requires_grad=True)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run_steps(n):
        for _ in range(n):
            with torch.autocast(device, dtype=torch.bfloat16):
                y = layer(x)
            y.float().sum().backward()
        sync()

    return _ms_per_call(run_steps, spec)


MEASURES = {
    ("model", "jax"): measure_jax_model,
    ("model", "torch"): measure_timm_model,
    ("layer", "jax"): measure_jax_layer,
    ("layer", "torch"): measure_timm_layer,
    ("input", "jax"): measure_input_pipeline,
}


def run_measurement(spec: dict) -> dict:
    is_peer = (spec.get("model") or "").startswith("timm:") or spec.get("impl") == "timm"
    framework = "torch" if is_peer else "jax"
    record = dict(spec)
    try:
        record |= _environment(framework)
        record |= MEASURES[spec["kind"], framework](spec)
    except Exception as error:  # noqa: BLE001 - e.g. out of memory: report it, keep going
        record["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
    return record


def run_isolated(spec: dict, device: int | None = None) -> dict:
    """`run_measurement` in a fresh Python process (its own peak memory; survives crashes), on
    GPU `device` alone (CUDA_VISIBLE_DEVICES) if given."""
    env = None if device is None else os.environ | {"CUDA_VISIBLE_DEVICES": str(device)}
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env=env,
    )
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return dict(spec) | {"error": f"worker exited {out.returncode}: {out.stderr[-500:]}"}


def _model_spec(args, **fields) -> dict:
    spec = dict(kind="model", mode="train", image_size=args.image_size, dtype=args.dtype)
    spec |= dict(num_classes=args.num_classes, batch_size=args.batch_size, warmup=args.warmup)
    spec |= dict(windows=args.windows, steps=args.steps, fold_bn=not args.no_fold_bn)
    config_overrides = json.loads(args.config_overrides)
    spec |= dict(config_overrides=config_overrides) if config_overrides else {}
    spec |= dict(compile_only=True) if getattr(args, "compile_only", False) else {}
    return spec | (dict(profile_dir=args.profile_dir) if args.profile_dir else {}) | fields


def build_specs(args) -> list[dict]:
    if args.layer:
        return [
            dict(kind="layer", shape=shape, impl=impl, scope=args.scope, batch_size=args.batch_size)
            | dict(warmup=args.warmup, windows=args.windows, steps=args.steps)
            for shape in args.layer_shapes
            for impl in _selected(list(LAYER_VARIANTS), args.only)
        ]
    if args.input_pipeline:
        overrides = json.loads(args.config_overrides)
        spec = dict(kind="input", config=args.config, config_overrides=overrides)
        return [spec | dict(warmup=args.warmup, windows=args.windows, steps=args.steps)]
    if args.table4:
        return [
            _model_spec(args, mode="infer", model=name, overrides={})
            for name, *_ in _selected(TABLE4_ROWS, args.only)
        ]
    specs = []
    overrides = json.loads(args.overrides)
    if args.scaling:
        return [
            _model_spec(args, mode=mode, model=args.model, overrides=overrides)
            | dict(num_devices=n, batch_size=args.batch_size * n)
            for mode in args.modes.split(",")
            for n in args.scaling
        ]
    for mode in args.modes.split(","):
        specs.append(_model_spec(args, mode=mode, model=args.model, overrides=overrides))
        for peer in args.peer or []:
            specs.append(_model_spec(args, mode=mode, model=peer, compile=False))
            if args.peer_compile and mode == "train":
                specs.append(_model_spec(args, mode=mode, model=peer, compile=True))
    return specs


def _device_counts(scaling: str) -> list[int]:
    """--scaling's argument "1,2,4" -> [1, 2, 4]; it must hold the one-device base."""
    counts = [int(n) for n in scaling.split(",") if n.strip().isdigit()]
    if len(counts) != len(scaling.split(",")) or 1 not in counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(
            f"{scaling!r}: give device counts >= 1, comma-separated, including 1 (the base)"
        )
    return counts


def scaling_markdown(records: list[dict]) -> str:
    """Throughput on N devices against N x the one-device throughput of the same model and mode."""
    base = {
        (r["model"], r["mode"]): r["img_per_s"]
        for r in records
        if r.get("num_devices") == 1 and "img_per_s" in r
    }
    rows = []
    for r in records:
        rate, one = r.get("img_per_s"), base.get((r["model"], r["mode"]))
        n = r["num_devices"]
        efficiency = None if rate is None or one is None else rate / (n * one)
        rows.append(
            [r["model"], r["mode"], n, r["batch_size"], _fmt(rate), _fmt(rate and rate / n),
             _fmt(efficiency, 3), _fmt(r.get("peak_gib"), 2), r.get("error", "")[:60]]
        )  # fmt: skip
    header = ["model", "mode", "devices", "global batch", "img/s", "img/s per device",
              "efficiency", "peak GiB (device 0)", "error"]  # fmt: skip
    return _markdown(header, rows)


def _is_out_of_memory(record: dict) -> bool:
    error = record.get("error", "")
    return "RESOURCE_EXHAUSTED" in error or "out of memory" in error.lower()


def cost_table(args, measure) -> list[dict]:
    """Training img/s of every paper config at its resolution (batch halved until it fits, as
    ResNet-RS measured latency) and the GPU-hours of its whole schedule. With ``args.parallel``
    = N, N rows run at once, each in its own process on one of GPUs 0..N-1 (their compiles
    overlap); the records keep the configs' order."""
    names = _selected(COST_CONFIGS, args.only)
    if args.parallel <= 1:
        return [_cost_row(args, name, measure) for name in names]
    free_devices = queue.SimpleQueue()
    for device in range(args.parallel):
        free_devices.put(device)

    def row_on_a_free_device(name: str) -> dict:
        device = free_devices.get()
        try:
            return _cost_row(args, name, functools.partial(run_isolated, device=device))
        finally:
            free_devices.put(device)

    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        return list(pool.map(row_on_a_free_device, names))


def _cost_row(args, name: str, measure) -> dict:
    """One config's record (printed as it is measured), its batch halved while out of memory."""
    batch_size = args.batch_size
    while True:
        spec = _model_spec(args, config=name, model=None, batch_size=batch_size)
        del spec["image_size"]  # the config's
        record = measure(spec)
        if not _is_out_of_memory(record) or batch_size <= 8:
            break
        batch_size //= 2
    record = _with_gpu_hours(record)
    print(json.dumps(record), flush=True)
    return record


def _with_gpu_hours(record: dict) -> dict:
    if "img_per_s" not in record:
        return record
    hours = record["epochs"] * IMAGENET_TRAIN_EXAMPLES / record["img_per_s"] / 3600
    return record | dict(gpu_hours_1gpu=hours, wall_hours_8gpu_linear=hours / 8)


def config_flops(name: str) -> float:
    """FLOPs of one image's inference forward pass at config ``name``'s resolution (XLA)."""
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
    the batch size of that nearest row: img/s = rate / FLOPs. Such rows carry ``estimated_from``;
    nothing runs on a device.
    """
    flops_of = flops_of or config_flops
    done = {r["config"]: r for r in measured if "img_per_s" in r}
    names = _selected(COST_CONFIGS, only)
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
        records.append(_with_gpu_hours(record | dict(fwd_gflops=flops[name] / 1e9)))
    return records


def _family(config_name: str) -> str:
    from lambdanet.models import model_entry

    return model_entry(load_config(config_name).model_name).family


def _markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _fmt(value, digits=0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _layer_shapes(text: str) -> tuple[tuple[int, int, int], ...]:
    """``"56x56x64,28x28x128"`` -> ((56, 56, 64), (28, 28, 128)) for ``--layer-shapes``."""
    try:
        shapes = tuple(tuple(int(side) for side in item.split("x")) for item in text.split(","))
    except ValueError:
        shapes = ()
    if not shapes or any(len(shape) != 3 or min(shape) <= 0 for shape in shapes):
        raise argparse.ArgumentTypeError(
            f"--layer-shapes takes a comma list of positive HxWxD, e.g. 56x56x64,28x28x128; "
            f"got {text!r}"
        )
    return shapes


def _selected(rows, only: str | None):
    """The rows (names, or tuples starting with a name) named in the comma list ``only``."""
    if not only:
        return rows
    names = only.split(",")
    return [row for row in rows if (row if isinstance(row, str) else row[0]) in names]


def table4_markdown(records: list[dict], only: str | None = None) -> str:
    from lambdanet import analysis

    rows = []
    for (name, row, paper_mem, paper_rate, layer, kwargs), record in zip(
        _selected(TABLE4_ROWS, only), records, strict=True
    ):
        analytic = analysis.table4_memory_gib(layer, **kwargs)
        rate = record.get("error", "OOM")[:40] if "img_per_s" not in record else record["img_per_s"]
        rate = _fmt(rate) if isinstance(rate, float) else rate
        rows.append(
            [
                row,
                name,
                paper_mem,
                f"{analytic:.3g}",
                _fmt(record.get("peak_gib"), 2),
                paper_rate,
                rate,
            ]
        )
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50", help="a lambdanet registry name")
    parser.add_argument("--overrides", default="{}", help="JSON dict of create_model overrides")
    parser.add_argument("--peer", action="append", help="timm:MODEL, measured in the same run")
    parser.add_argument("--peer-compile", action="store_true", help="also torch.compile the peer")
    parser.add_argument("--modes", default="train,infer")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument(
        "--layer", action="store_true", help="time one lambda layer (ours and timm's) instead"
    )
    parser.add_argument("--scope", type=int, default=9, help="lambda layer scope r (--layer)")
    parser.add_argument(
        "--layer-shapes",
        type=_layer_shapes,
        default=LAYER_SHAPES,
        help="comma list of HxWxD input shapes (--layer; default: lambda_resnet50ts's "
        "28x28x128,14x14x256,7x7x512)",
    )
    parser.add_argument("--table4", action="store_true", help="the paper's Table 4 (inference)")
    parser.add_argument("--cost-table", action="store_true", help="GPU-hours of paper configs")
    parser.add_argument(
        "--estimate-from",
        help="with --cost-table: measure nothing, take the rows of this JSON-lines file and "
        "estimate the missing configs from their forward FLOPs (runs on CPU)",
    )
    parser.add_argument(
        "--input-pipeline",
        action="store_true",
        help="--config's train step fed by its input pipeline vs by one on-device batch",
    )
    parser.add_argument("--config", default="imagenette", help="configs/NAME[:ARG] (as NAME:ARG)")
    parser.add_argument(
        "--config-overrides",
        default="{}",
        help="JSON dict of config fields, e.g. '{\"sync_batch_norm\": false}' or (with "
        '--input-pipeline) \'{"dataset.path": "FILE.npz"}\'',
    )
    parser.add_argument(
        "--no-fold-bn",
        action="store_true",
        help="inference without folding BatchNorm into the convs (lambdanet.models.fold)",
    )
    parser.add_argument(
        "--scaling",
        type=_device_counts,
        help="comma list of device counts (e.g. 1,2,4,8): data parallel on the first N devices, "
        "--batch-size per device, with a table of scaling efficiency",
    )
    parser.add_argument(
        "--only", help="comma list of Table 4 models, cost-table configs or --layer variants"
    )
    parser.add_argument(
        "--profile-dir", help="also write a JAX profiler trace of --steps steps of our models"
    )
    parser.add_argument("--no-isolate", action="store_true", help="measure in this process")
    parser.add_argument(
        "--compile-only",
        action="store_true",
        help="train mode: time initialisation (init_s) and the step's lowering + compilation only",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=1,
        help="with --cost-table: measure N rows at once, one process per GPU 0..N-1",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.parallel > 1 and not args.cost_table:
        parser.error("--parallel runs rows of --cost-table: add --cost-table or drop --parallel")
    if args.parallel > 1 and args.no_isolate:
        parser.error("--parallel runs each row in its own process: drop --no-isolate")
    if args.parallel < 1:
        parser.error(f"--parallel {args.parallel}: give a number of GPUs, 1 or more")
    if args.scaling and (args.peer or args.layer or args.table4 or args.cost_table):
        parser.error("--scaling times --model alone: drop --peer, --layer, --table4, --cost-table")
    if args.worker:
        print(json.dumps(run_measurement(json.loads(args.worker))), flush=True)
        return
    measure = run_measurement if args.no_isolate else run_isolated
    if args.cost_table and args.estimate_from:
        lines = Path(args.estimate_from).read_text().splitlines()
        measured = [json.loads(line) for line in lines if line.strip()]
        records = estimate_cost_rows(measured, args.only)
        for record in records:
            print(json.dumps(record), flush=True)
        print(cost_markdown(records))
        return
    if args.cost_table:
        print(cost_markdown(cost_table(args, measure)))
        return
    records = []
    for spec in build_specs(args):
        records.append(measure(spec))
        print(json.dumps(records[-1]), flush=True)
    if args.table4:
        print(table4_markdown(records, args.only))
    if args.scaling:
        print(scaling_markdown(records))


if __name__ == "__main__":
    main()
