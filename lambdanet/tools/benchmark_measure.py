"""The benchmark's measurements: one spec (a JSON dict) in, one record (the spec, the device and
versions, the figures, or an "error") out.

Protocol, the same for lambdanet and the timm peer: synthetic inputs already on the device, bf16
compute, SGD-Nesterov with weight decay and label smoothing 0.1, EMA off (`PROTOCOL`, over which
the spec's `config_overrides` go), `warmup` steps, then the median of `windows` timed windows of
`steps` steps, synchronised with `block_until_ready` (torch: `cuda.synchronize`).

lambdanet's runs are built by `lambdanet.experiment.create_experiment` from the spec's config on
the synthetic source (`lambdanet.data.synthetic`): the train mode times the experiment's own
jitted `train_step` on one device batch; inference folds BatchNorm into the convs inside the
timed step (`lambdanet.models.fold_batch_norm`; `fold_bn` False runs the BatchNorms as they are,
as timm's eager peer does).

`python -m lambdanet.tools.benchmark_measure SPEC_JSON` measures one spec and prints its record:
`run_isolated` runs each measurement so, in a fresh process, so that its peak memory is its own.
"""

import json
import os
import statistics
import subprocess
import sys
import time

import ml_collections

from lambdanet.tools import benchmark_tables

# JAX must not grab most of the GPU up front: the peer and peak-memory readings share the card.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# The benchmark's training recipe, set on every measured config before its overrides.
PROTOCOL = {"ema_decay": 0.0, "nesterov": True, "label_smoothing": 0.1, "dataset.name": "synthetic"}
LAYER_SHAPES = ((28, 28, 128), (14, 14, 256), (7, 7, 512))  # lambda_resnet50ts, batch 128
# LambdaLayer settings of each timed variant ("timm" is timm's own LambdaLayer).
LAYER_VARIANTS = {
    "einsum": dict(impl="einsum"),
    "conv": dict(impl="conv"),
    "rows": dict(impl="rows"),
    "timm": None,
}


def _median_rate(run_steps, spec: dict, images_per_step: int) -> tuple[float, list[float]]:
    """Images/s of `run_steps(n)`: the spec's `warmup` steps, then the median over its `windows`
    windows of `steps` steps (and every window's rate)."""
    run_steps(spec["warmup"])
    rates = []
    for _ in range(spec["windows"]):
        start = time.perf_counter()
        run_steps(spec["steps"])
        rates.append(images_per_step * spec["steps"] / (time.perf_counter() - start))
    return statistics.median(rates), rates


def _ms_per_call(run_steps, spec: dict) -> dict:
    """{"ms": median milliseconds per call} of `run_steps(n)` under the spec's protocol."""
    rate, _ = _median_rate(run_steps, spec, images_per_step=1)
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


def spec_config(spec: dict, protocol: bool = True) -> ml_collections.ConfigDict:
    """The spec's config (a name, `benchmark_tables.load_config`): `PROTOCOL` (if `protocol`),
    then the spec's `config_overrides` ({"model.base_width": 8}), then its `batch_size` as the
    global batch and its `image_size` (if any) as the dataset's."""
    config = benchmark_tables.load_config(spec["config"])
    overrides = spec.get("config_overrides", {})
    config.update_from_flattened_dict((PROTOCOL if protocol else {}) | overrides)
    config.global_batch_size = spec.get("batch_size", config.global_batch_size)
    config.dataset.image_size = spec.get("image_size") or config.dataset.image_size
    return config


def _devices(count: int | None) -> list:
    import jax

    devices = jax.devices()
    if (count or 0) > len(devices):
        raise ValueError(
            f"{count} devices asked for but {len(devices)} are visible: "
            f"pass --scaling counts up to {len(devices)}"
        )
    return devices[: count or len(devices)]


def measure_jax_model(spec: dict) -> dict:
    """The experiment's train step, or inference, on one synthetic batch on the devices."""
    import jax

    from lambdanet import analysis, experiment, sharding

    config = spec_config(spec)
    start = time.perf_counter()
    exp = experiment.create_experiment(config, _devices(spec.get("num_devices")))
    init_s = time.perf_counter() - start
    batch = jax.device_put(next(exp.dataset.train_iter(0)), sharding.batch_sharding(exp.mesh))
    result = dict(model=config.model_name, image_size=exp.dataset.image_size, init_s=init_s)
    result |= dict(num_params=analysis.num_params(exp.state.params), epochs=config.num_epochs)
    result |= dict(num_devices=exp.mesh.devices.size)
    result |= dict(dtype="bfloat16" if config.half_precision else "float32")
    start = time.perf_counter()
    if spec["mode"] == "train":
        run_steps = _train_steps(exp, batch, result)
    else:
        run_steps = _inference_steps(config, exp, batch["image"], spec.get("fold_bn", True))
        result["fold_bn"] = spec.get("fold_bn", True)
    result["compile_s"] = time.perf_counter() - start
    if spec.get("compile_only"):
        return result
    rate, rates = _median_rate(run_steps, spec, images_per_step=config.global_batch_size)
    peak = _jax_peak_bytes()
    if spec.get("profile_dir"):  # a trace of `steps` more steps (lambdanet.tools.profile_summary)
        trace_dir = os.path.join(spec["profile_dir"], f"{config.model_name}_{spec['mode']}")
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            run_steps(spec["steps"])
        result["trace_dir"] = trace_dir
    result.update(img_per_s=rate, window_img_per_s=rates)
    result["peak_gib"] = None if peak is None else peak / 2**30
    return result


def _train_steps(exp, batch: dict, result: dict):
    """`run_steps(n)`: n of the experiment's train steps on `batch`, compiled here (as
    `lambdanet-train` builds it: with JAX_COMPILATION_CACHE_DIR its traced program is saved or
    loaded, `result["traced_program"]`)."""
    import jax

    compiled = exp.train_step.compile(exp.state, batch, exp.rngs)
    result["traced_program"] = exp.train_step.how.split(" from ")[0].split(" to ")[0]
    holder = [exp.state]

    def run_steps(n):
        for _ in range(n):
            holder[0], _ = compiled(holder[0], batch, exp.rngs)
        jax.block_until_ready(holder[0].params)

    return run_steps


def _inference_steps(config, exp, images, fold: bool):
    """`run_steps(n)`: n inference passes over `images` [b, S, S, 3], BatchNorm folded into the
    convs inside the timed step if `fold`, compiled here."""
    import jax

    from lambdanet import train
    from lambdanet.models import fold_batch_norm

    model = train.create_model(config, exp.dataset.num_classes)
    variables = {"params": exp.state.params, "batch_stats": exp.state.batch_stats}

    @jax.jit
    def infer(variables, images):
        net, variables = fold_batch_norm(model, variables) if fold else (model, variables)
        return net.apply(variables, images, train=False)

    compiled = infer.lower(variables, images).compile()

    def run_steps(n):
        out = None
        for _ in range(n):
            out = compiled(variables, images)
        jax.block_until_ready(out)

    return run_steps


def measure_input_pipeline(spec: dict) -> dict:
    """The training loop's step (`create_experiment`, device augmentation included) fed by the
    config's input pipeline, against the same compiled step fed one batch that is already on
    the device ("synthetic"), the pipeline's windows first; `input_ms_per_step` is the host
    time spent producing and sending each batch (it hides behind the asynchronous step unless it
    is the longer of the two)."""
    import jax

    from lambdanet import experiment, sharding

    config = spec_config(spec, protocol=False)
    exp = experiment.create_experiment(config)
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

    rate, rates = _median_rate(run_steps, spec, images_per_step=batch_size)
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
        [sys.executable, "-m", "lambdanet.tools.benchmark_measure", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    for line in reversed(out.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return dict(spec) | {"error": f"worker exited {out.returncode}: {out.stderr[-500:]}"}


if __name__ == "__main__":
    print(json.dumps(run_measurement(json.loads(sys.argv[1]))), flush=True)
