"""Training and evaluation of LambdaNetworks: the recipe, top to bottom.

The structure follows flax `examples/imagenet`, with one `jax.jit` train step over a device mesh
instead of pmap (see `lambdanet.sharding`). The recipe is the paper's (Appendix E.2):

* SGD with momentum (or Nesterov); learning rate `config.learning_rate * global_batch / 256`
  (linear scaling rule), linear warm-up from 0, then cosine decay to 0; all functions of the step.
* Weight decay as an L2 gradient term, masked so that 1-D parameters (BatchNorm scale/bias and
  biases) are not decayed; optional gradient-norm clipping; label smoothing.
* An exponential moving average (EMA) of the weights, evaluated instead of the raw weights.
* bf16 compute (`config.half_precision`) with float32 parameters; the loss is float32.

Reproducibility: the initialisation uses `config.seed`, the data order and augmentation
`config.data_seed`. Per-step keys are `fold_in(key, step)`, and the input pipeline is
positioned by the step, so a run resumed from a checkpoint is the same as an uninterrupted one.

A step whose loss or gradients are not finite leaves the state unchanged (like
`optax.apply_if_finite`) and is counted. Training then stops with a message naming the step and
the last good checkpoint, unless `config.skip_nonfinite_steps` is set: then every log line with
new skipped steps warns, and training stops once more than `config.max_nonfinite_fraction` of the
run's steps were skipped.

A workdir holds one run at a time (`lambdanet.workdir_lock`); a run resumes from the newest
checkpoint that passes its checksums, writes config.json once the checkpoint matches the config,
and leaves a finished workdir unchanged.
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from clu import metrics
from flax import linen as nn
from flax.training import train_state
from jax.experimental import multihost_utils

from lambdanet import (
    checkpoint,
    config_checks,
    metric_writers,
    models,
    sharding,
    step_cache,
    workdir_lock,
)
from lambdanet.data import Dataset, create_dataset

FINAL_METRICS_FILE = "final_metrics.json"
EVAL_METRICS_FILE = "eval_metrics.json"
# lambdanet.main's exit status when a signal stopped the run with a checkpoint saved (defined
# here so that tools read it without importing main's flags).
EXIT_STOPPED = 75


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """`config.model_name` from the registry, with `config.model` as constructor overrides (a
    field left None, or a mapping of such, keeps the model's own value). None being "unset",
    `lambda_layer.scope_size=0` stands for the global scope (the layer's scope_size=None)."""
    dtype = jnp.bfloat16 if config.half_precision else jnp.float32
    overrides = {}
    for key, value in config.model.to_dict().items():
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if v is not None} or None
        if value is not None:
            overrides[key] = value
    if overrides.get("lambda_layer", {}).get("scope_size") == 0:
        overrides["lambda_layer"] = {**overrides["lambda_layer"], "scope_size": None}
    return models.create_model(config.model_name, num_classes=num_classes, dtype=dtype, **overrides)


def check_image_size(model: nn.Module, image_size: int) -> None:
    """Raises ValueError unless `image_size` is at least the network's total stride: the stem's
    4 times 2 per later stage (32 for c2..c5), in every `ResNet`."""
    stride = 4 * 2 ** (len(model.stage_sizes) - 1)
    if image_size < stride:
        raise ValueError(
            f"config.dataset.image_size={image_size} is smaller than the network's total stride "
            f"{stride} ({len(model.stage_sizes)} stages); use an image size of at least {stride}."
        )


def create_learning_rate_fn(
    config: ml_collections.ConfigDict, steps_per_epoch: int, num_train_steps: int
) -> optax.Schedule:
    """Linear warm-up from 0 over `config.warmup_epochs`, then cosine decay to 0 at the end."""
    peak = config.learning_rate * config.global_batch_size / 256  # linear scaling rule
    warmup_steps = min(int(config.warmup_epochs * steps_per_epoch), num_train_steps)
    warmup = optax.linear_schedule(0.0, peak, warmup_steps)
    cosine = optax.cosine_decay_schedule(peak, max(num_train_steps - warmup_steps, 1))
    return optax.join_schedules([warmup, cosine], [warmup_steps])


def weight_decay_mask(params: Any) -> Any:
    """True for parameters to decay: kernels and embeddings, not 1-D BatchNorm scale/bias/biases."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(
    config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule
) -> optax.GradientTransformation:
    """[clip by global norm] -> + weight_decay * params (L2 term) -> SGD momentum/Nesterov."""
    mask = weight_decay_mask if config.weight_decay_exclude_bn_and_bias else None
    clip = optax.clip_by_global_norm(config.grad_clip_norm) if config.grad_clip_norm else None
    return optax.chain(
        clip or optax.identity(),
        optax.add_decayed_weights(config.weight_decay, mask),
        optax.sgd(learning_rate_fn, momentum=config.momentum or None, nesterov=config.nesterov),
    )


def cross_entropy_loss(
    logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
    """Per-example softmax cross-entropy in float32.

    logits: [b, classes]; targets: [b, classes] class probabilities (one-hot, or mixup's soft
    labels), smoothed towards uniform by `label_smoothing`. Returns [b].
    """
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def batch_targets(batch: dict[str, jax.Array], num_classes: int) -> jax.Array:
    """The batch's 'soft_label' (mixup) if present, else one-hot 'label': [b, classes]."""
    if "soft_label" in batch:
        return batch["soft_label"]
    return jax.nn.one_hot(batch["label"], num_classes, dtype=jnp.float32)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the label is among the top-k logits. logits: [b, classes], labels: [b] -> [b]."""
    _, top = jax.lax.top_k(logits.astype(jnp.float32), min(k, logits.shape[-1]))
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
    """Sums over the (masked) examples divided by their count: exact for any batch size."""

    loss: metrics.Average.from_output("loss")
    top1: metrics.Average.from_output("top1")
    top5: metrics.Average.from_output("top5")


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    top1: metrics.Average.from_output("top1")
    top5: metrics.Average.from_output("top5")
    learning_rate: metrics.LastValue.from_output("learning_rate")
    grad_norm: metrics.Average.from_output("grad_norm")


def compute_metrics(
    logits: jax.Array, labels: jax.Array, loss: jax.Array, mask: jax.Array | None = None
) -> dict[str, jax.Array]:
    """Per-example loss, top-1 and top-5 correctness [b], plus `mask` when given."""
    outputs = {
        "loss": loss,
        "top1": topk_correct(logits, labels, 1),
        "top5": topk_correct(logits, labels, 5),
    }
    return outputs if mask is None else outputs | {"mask": mask}


class TrainState(train_state.TrainState):
    """step, params, opt_state (+ apply_fn, tx), and:

    batch_stats: BatchNorm moving statistics.
    ema_params: EMA of params (None when `config.ema_decay` is 0).
    nonfinite_steps: number of steps skipped because the loss or gradients were NaN/inf.
    first_nonfinite_step: the first such step, -1 if none.
    """

    batch_stats: Any
    ema_params: Any
    nonfinite_steps: jax.Array
    first_nonfinite_step: jax.Array


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """`min(decay, (1 + step) / (10 + step))`, as tf.train.ExponentialMovingAverage with
    num_updates (the ResNet-RS/EfficientNet TPU code), so that short runs average sensibly."""
    return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def apply_for_training(
    apply_fn: Callable[..., Any],
    variables: dict[str, Any],
    images: jax.Array,
    dropout_rng: jax.Array,
    groups: int = 1,
) -> tuple[jax.Array, Any]:
    """The training forward pass: images [b, S, S, 3] -> (logits [b, classes], new batch_stats).

    groups > 1 splits the batch into [groups, b / groups, S, S, 3] and vmaps the model over the
    groups, so every BatchNorm takes its statistics per group. With one group per device (the
    batch is sharded in that order) each device normalises its own shard and BatchNorm needs no
    all-reduce, as in PyTorch DDP without SyncBatchNorm. The new running statistics are the mean
    of the groups'; each group draws its own dropout and stochastic-depth masks.
    """

    def apply(images, rng):
        logits, state = apply_fn(
            variables, images, train=True, rngs={"dropout": rng}, mutable=["batch_stats"]
        )
        return logits, state["batch_stats"]

    if groups == 1:
        return apply(images, dropout_rng)
    b = images.shape[0]
    if b % groups:
        raise ValueError(f"a batch of {b} does not split into {groups} BatchNorm groups")
    grouped = images.reshape(groups, b // groups, *images.shape[1:])
    logits, batch_stats = jax.vmap(apply)(grouped, jax.random.split(dropout_rng, groups))
    return logits.reshape(b, *logits.shape[2:]), jax.tree.map(lambda s: s.mean(0), batch_stats)


def configured_train_step(
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    learning_rate_fn: optax.Schedule,
    preprocess_fn: Callable[..., dict[str, jax.Array]],
) -> Callable[..., tuple[TrainState, TrainMetrics]]:
    """`train_step` with the config's settings bound: (state, batch, rngs) -> (state, metrics).

    BatchNorm statistics are over the global batch, or without `config.sync_batch_norm` over
    one group per device of `mesh`.
    """
    return functools.partial(
        train_step,
        learning_rate_fn=learning_rate_fn,
        preprocess_fn=preprocess_fn,
        label_smoothing=config.label_smoothing,
        ema_decay=config.ema_decay,
        batch_norm_groups=1 if config.sync_batch_norm else mesh.devices.size,
    )


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rngs: dict[str, jax.Array],
    *,
    learning_rate_fn: optax.Schedule,
    preprocess_fn: Callable[..., dict[str, jax.Array]],
    label_smoothing: float,
    ema_decay: float,
    batch_norm_groups: int = 1,
) -> tuple[TrainState, TrainMetrics]:
    """One SGD step on the global batch (image: [b, S, S, 3], label: [b]).

    rngs: {'augment': key, 'dropout': key}; this step uses `fold_in(key, state.step)`.
    batch_norm_groups: BatchNorm statistics over the whole batch (1) or per group of
      b / groups consecutive examples (`apply_for_training`).
    """
    step_rngs = {name: jax.random.fold_in(key, state.step) for name, key in rngs.items()}
    batch = preprocess_fn(batch, step_rngs["augment"], train=True)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, batch_stats = apply_for_training(
            state.apply_fn, variables, batch["image"], step_rngs["dropout"], batch_norm_groups
        )
        targets = batch_targets(batch, logits.shape[-1])
        loss = cross_entropy_loss(logits, targets, label_smoothing)
        return loss.mean(), (loss, logits, batch_stats)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (mean_loss, (loss, logits, batch_stats)), grads = grad_fn(state.params)
    grad_norm = optax.tree.norm(grads)
    is_finite = jnp.isfinite(mean_loss) & jnp.isfinite(grad_norm)

    updated = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if state.ema_params is not None:
        decay = ema_decay_at(state.step, ema_decay)
        ema = jax.tree.map(
            lambda e, p: decay * e + (1 - decay) * p, state.ema_params, updated.params
        )
        updated = updated.replace(ema_params=ema)
    fields = ("params", "opt_state", "batch_stats", "ema_params")
    kept = jax.tree.map(
        lambda new, old: jnp.where(is_finite, new, old),
        {f: getattr(updated, f) for f in fields},
        {f: getattr(state, f) for f in fields},
    )
    first_bad = jnp.where(
        (state.first_nonfinite_step < 0) & ~is_finite, state.step, state.first_nonfinite_step
    )
    new_state = state.replace(
        step=state.step + 1,
        nonfinite_steps=state.nonfinite_steps + (~is_finite).astype(jnp.int32),
        first_nonfinite_step=first_bad,
        **kept,
    )
    # The optimizer's schedule counts applied updates only (as optax.apply_if_finite).
    learning_rate = learning_rate_fn(state.step - state.nonfinite_steps)
    outputs = compute_metrics(logits, batch["label"], loss)
    step_metrics = TrainMetrics.single_from_model_output(
        **outputs, learning_rate=learning_rate, grad_norm=grad_norm
    )
    return new_state, step_metrics


def eval_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    rngs: dict[str, jax.Array],
    *,
    preprocess_fn: Callable[..., dict[str, jax.Array]],
) -> EvalMetrics:
    """Metrics on a padded eval batch (image, label, mask: [b]); uses the EMA weights if any."""
    batch = preprocess_fn(batch, rngs["augment"], train=False)
    params = state.params if state.ema_params is None else state.ema_params
    logits = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=False
    )
    loss = cross_entropy_loss(logits, batch_targets(batch, logits.shape[-1]))
    return EvalMetrics.single_from_model_output(
        **compute_metrics(logits, batch["label"], loss, batch["mask"])
    )


def create_train_state(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    image_size: int,
    learning_rate_fn: optax.Schedule,
    mesh: jax.sharding.Mesh,
) -> TrainState:
    """Initialises float32 parameters from `config.seed`, replicated over `mesh`."""
    tx = create_optimizer(config, learning_rate_fn)

    def init(key):
        params_key, dropout_key = jax.random.split(key)
        image = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
        variables = model.init({"params": params_key, "dropout": dropout_key}, image, train=False)
        params = variables["params"]
        return TrainState.create(
            apply_fn=model.apply,
            params=params,
            tx=tx,
            batch_stats=variables.get("batch_stats", {}),
            ema_params=params if config.ema_decay else None,
            nonfinite_steps=jnp.zeros((), jnp.int32),
            first_nonfinite_step=jnp.full((), -1, jnp.int32),
        ).replace(step=jnp.zeros((), jnp.int32))

    replicated = sharding.replicated_sharding(mesh)
    host = _host_cpu() if jax.default_backend() != "cpu" else None
    if host is None:
        return jax.jit(init, out_shardings=replicated)(_init_key(config))
    # The initialisers are thousands of small random-number fusions: XLA compiles them for the
    # host CPU several times faster than for a GPU (results/throughput.md), and the values are
    # the same threefry bits. Each process builds the same state and keeps its devices' copies.
    with jax.default_device(host):
        host_state = jax.device_get(jax.jit(init)(_init_key(config)))
    return jax.tree.map(
        lambda x: jax.make_array_from_callback(x.shape, replicated, lambda index: x[index]),
        host_state,
    )


def _host_cpu() -> jax.Device | None:
    """The first CPU device of this process; None when JAX_PLATFORMS leaves the CPU out."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return None


def _init_key(config: ml_collections.ConfigDict) -> jax.Array:
    return jax.random.fold_in(jax.random.key(config.seed), 0)


def create_rngs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """Base keys, replicated: augmentation from `config.data_seed`, dropout and stochastic depth
    from `config.seed` (initialisation uses `fold_in(key(seed), 0)`, these `fold_in(.., 1)`)."""

    def keys():
        return {
            "augment": jax.random.key(config.data_seed),
            "dropout": jax.random.fold_in(jax.random.key(config.seed), 1),
        }

    return jax.jit(keys, out_shardings=sharding.replicated_sharding(mesh))()


def count_params(params: Any) -> int:
    """Number of scalars in a parameter tree."""
    return sum(x.size for x in jax.tree.leaves(params))


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Everything a run needs, built and checked before anything is compiled.

    train_step(state, batch, rngs) -> (state, TrainMetrics) and eval_step(state, batch, rngs) ->
    EvalMetrics are jitted over `mesh` (`step_cache.CachedStep`: a later process with the same
    config loads their traced programs); the train step donates its input state, so `state`
    (the initial one) is consumed by the first step.
    """

    mesh: jax.sharding.Mesh
    dataset: Dataset
    steps_per_epoch: int
    num_train_steps: int
    learning_rate_fn: optax.Schedule
    state: TrainState
    rngs: dict[str, jax.Array]
    train_step: step_cache.CachedStep
    eval_step: step_cache.CachedStep


def create_experiment(
    config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> Experiment:
    """Mesh over `devices` (default all), dataset, model, schedule, initial state, jitted steps."""
    config_checks.check_config(config)
    mesh = sharding.create_mesh(devices)
    sharding.check_batch_size(config.global_batch_size, mesh, "global_batch_size")
    sharding.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    models.model_entry(config.model_name)  # an unknown name fails here, listing the known ones
    ds = create_dataset(
        config.dataset,
        global_batch_size=config.global_batch_size,
        eval_batch_size=config.eval_batch_size,
        seed=config.data_seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    model = create_model(config, ds.num_classes)
    check_image_size(model, ds.image_size)
    steps_per_epoch = ds.num_train_examples // config.global_batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"config.global_batch_size={config.global_batch_size} exceeds the "
            f"{ds.num_train_examples} training examples of dataset '{config.dataset.name}'."
        )
    num_train_steps = config.num_train_steps
    if num_train_steps <= 0:
        num_train_steps = int(config.num_epochs * steps_per_epoch)
    learning_rate_fn = create_learning_rate_fn(config, steps_per_epoch, num_train_steps)
    replicated = sharding.replicated_sharding(mesh)
    train_step_fn = configured_train_step(config, mesh, learning_rate_fn, ds.device_preprocess)
    eval_step_fn = functools.partial(eval_step, preprocess_fn=ds.device_preprocess)
    return Experiment(
        mesh=mesh,
        dataset=ds,
        steps_per_epoch=steps_per_epoch,
        num_train_steps=num_train_steps,
        learning_rate_fn=learning_rate_fn,
        state=create_train_state(config, model, ds.image_size, learning_rate_fn, mesh),
        rngs=create_rngs(config, mesh),
        train_step=step_cache.CachedStep(
            jax.jit(train_step_fn, donate_argnums=0, out_shardings=replicated),
            lambda state, batch, rngs: (state, TrainMetrics.empty()),
            key=dict(step="train", config=checkpoint.config_to_dict(config)),
            donate_argnums=(0,),
        ),
        eval_step=step_cache.CachedStep(
            jax.jit(eval_step_fn, out_shardings=replicated),
            lambda state, batch, rngs: EvalMetrics.empty(),
            key=dict(step="eval", config=checkpoint.config_to_dict(config)),
        ),
    )


def _log_experiment(config: ml_collections.ConfigDict, exp: Experiment) -> None:
    num_devices = exp.mesh.devices.size
    warmup_steps = min(int(config.warmup_epochs * exp.steps_per_epoch), exp.num_train_steps)
    logging.info(
        "Model %s: %d parameters; dataset %s: %d train / %d eval examples at %dx%d.",
        config.model_name,
        count_params(exp.state.params),
        config.dataset.name,
        exp.dataset.num_train_examples,
        exp.dataset.num_eval_examples,
        exp.dataset.image_size,
        exp.dataset.image_size,
    )
    logging.info(
        "Global batch %d = %d per device x %d devices (%d processes); %d steps/epoch, "
        "%d train steps (%.2f epochs); BatchNorm statistics over %s.",
        config.global_batch_size,
        config.global_batch_size // num_devices,
        num_devices,
        jax.process_count(),
        exp.steps_per_epoch,
        exp.num_train_steps,
        exp.num_train_steps / exp.steps_per_epoch,
        "the global batch" if config.sync_batch_norm else "each device's examples",
    )
    logging.info(
        "Learning rate: peak %.4g = %g x %d / 256, linear warm-up over %d steps, cosine decay "
        "to 0 at step %d; weight decay %g, momentum %g%s, label smoothing %g, EMA decay %g.",
        float(exp.learning_rate_fn(warmup_steps)),
        config.learning_rate,
        config.global_batch_size,
        warmup_steps,
        exp.num_train_steps,
        config.weight_decay,
        config.momentum,
        " (Nesterov)" if config.nesterov else "",
        config.label_smoothing,
        config.ema_decay,
    )


def eval_loop(
    exp: Experiment, state: TrainState, stop: threading.Event | None = None
) -> dict[str, float] | None:
    """Exact metrics over the whole eval split: padded examples are masked out.

    Returns None, abandoning the evaluation, as soon as `stop` (a SIGTERM/SIGINT) is set.
    """
    total = None
    for batch in sharding.prefetch_to_device(exp.dataset.eval_iter(), exp.mesh):
        if stop is not None and stop.is_set():
            return None
        batch_metrics = exp.eval_step(state, batch, exp.rngs)
        total = batch_metrics if total is None else total.merge(batch_metrics)
    results = {name: float(value) for name, value in total.compute().items()}
    return results | {"num_examples": int(total.loss.count)}


def _check_finite(
    state: TrainState,
    config: ml_collections.ConfigDict,
    manager: Any,
    num_train_steps: int,
    reported: int,
) -> int:
    """Stops training (FloatingPointError) after a non-finite step unless skipping is enabled;
    with skipping, warns about the steps skipped since `reported` of them were, and stops once
    more than `config.max_nonfinite_fraction` of the run's steps were. Returns the count."""
    count = int(state.nonfinite_steps)
    if count == reported:
        return count
    first = int(state.first_nonfinite_step) + 1
    limit = config.max_nonfinite_fraction * num_train_steps
    if config.skip_nonfinite_steps and count <= limit:
        logging.warning(
            "Skipped %d non-finite step(s) up to step %d: %d of the run's %d so far (the first, "
            "step %d); training stops above %d (config.max_nonfinite_fraction=%g).",
            count - reported,
            int(state.step),
            count,
            num_train_steps,
            first,
            int(limit),
            config.max_nonfinite_fraction,
        )
        return count
    checkpoint.check_saves(manager, wait=True)
    kept = checkpoint.last_good(manager)
    if config.skip_nonfinite_steps:
        raise FloatingPointError(
            f"{count} of the first {int(state.step)} steps had a non-finite loss or gradients "
            f"(the first, step {first}) and were skipped: more than config."
            f"max_nonfinite_fraction={config.max_nonfinite_fraction} of the run's "
            f"{num_train_steps} steps. Training stopped and {kept}. Resume with a lower "
            "--config.learning_rate or with --config.grad_clip_norm (or a larger "
            "--config.max_nonfinite_fraction)."
        )
    raise FloatingPointError(
        f"Non-finite loss or gradients in step {first} (its update was not applied); training "
        f"stopped and {kept}. Resume with a lower --config.learning_rate or with "
        "--config.grad_clip_norm, or pass --config.skip_nonfinite_steps=True to skip such steps."
    )


@contextlib.contextmanager
def stop_requested_by_signal() -> Iterator[threading.Event]:
    """An Event set by SIGTERM or SIGINT (a second SIGINT interrupts at once).

    The training loop checks it after every step (`_should_stop`), during evaluation (which it
    abandons) and after starting a save, saves a checkpoint and returns, so a preempted job
    resumes where it stopped. Only the main thread of a single-process run installs the
    handlers; several processes rely on JAX's preemption service (checked after every step).
    """
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread() or jax.process_count() > 1:
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        logging.warning(
            "Received %s; stopping after the current step.", signal.Signals(signum).name
        )
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, old_handler in previous.items():
            signal.signal(sig, old_handler)


def _should_stop(stop: threading.Event, step: int) -> bool:
    """Whether to stop after `step`: on all processes at the same step when there are several
    (`jax.distributed` turns SIGTERM into a preemption notice), else when `stop` is set."""
    if jax.process_count() > 1:
        return multihost_utils.reached_preemption_sync_point(step)
    return stop.is_set()


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, run_eval: bool = True
) -> dict[str, Any]:
    """Trains (resuming from WORKDIR/checkpoints if present), evaluates, returns final metrics.

    Holds the workdir's lock throughout (process 0); writes TensorBoard events, config.json and
    final_metrics.json to `workdir`; evaluates every `config.eval_every_epochs` and at the end
    when `run_eval`. SIGTERM/SIGINT stop the run after the current step with a checkpoint; the
    returned metrics then have 'stopped_early' (and no final_metrics.json is written). A
    finished workdir (its final step saved, final_metrics.json written) is left unchanged and
    its final metrics returned, with 'already_finished'.
    """
    is_chief = jax.process_index() == 0
    with workdir_lock.hold(workdir) if is_chief else contextlib.nullcontext():
        exp = create_experiment(config)
        _log_experiment(config, exp)
        manager = checkpoint.create_checkpoint_manager(
            os.path.join(workdir, checkpoint.CHECKPOINT_DIR), config.keep_checkpoints
        )
        try:
            state = _initial_state(config, exp, manager)
            final_path = os.path.join(workdir, FINAL_METRICS_FILE)
            if int(state.step) >= exp.num_train_steps and os.path.exists(final_path):
                return _finished(workdir, int(state.step), final_path)
            if is_chief:
                checkpoint.save_config(workdir, config)  # the checkpoints match it
            writer = metric_writers.create_metric_writer(workdir, write_files=is_chief)
            try:
                with stop_requested_by_signal() as stop:
                    final = _train(config, exp, state, manager, writer, run_eval, stop)
                checkpoint.check_saves(manager, wait=True)
            finally:
                writer.close()
        finally:
            manager.close()  # waits for pending asynchronous saves
        if is_chief and not final.get("stopped_early"):
            _warn_nonfinite(final)
            metric_writers.write_json(final_path, final)
    logging.info("Final metrics: %s", final)
    return final


def _initial_state(config: ml_collections.ConfigDict, exp: Experiment, manager: Any) -> TrainState:
    """The newest good checkpoint's state if any (checked against the config), else the
    initial state, with `config.init_from`'s weights if set."""
    step = checkpoint.resume_step(manager)
    if step is not None:
        logging.info("Resuming from step %d in %s.", step, manager.directory)
        return checkpoint.restore(manager, step, exp.state)
    if config.init_from:
        return _init_from(config.init_from, exp.state)
    return exp.state


def _finished(workdir: str, step: int, final_path: str) -> dict[str, Any]:
    logging.warning(
        "The run in %s is finished at step %d (final metrics in %s); nothing was changed. "
        "--mode=eval evaluates it again; a larger --config.num_train_steps (or num_epochs) "
        "trains on from its last checkpoint.",
        workdir,
        step,
        final_path,
    )
    with open(final_path) as f:
        return json.load(f) | {"already_finished": True}


def _warn_nonfinite(final: dict[str, Any]) -> None:
    """Warns about final metrics that are NaN/inf (the averages over skipped steps)."""
    bad = sorted(k for k, v in final.items() if isinstance(v, float) and not math.isfinite(v))
    if bad:
        logging.warning(
            "Final metrics %s are not finite: %d step(s) had a non-finite loss or gradients and "
            "were skipped (the first, step %d), and the train averages include them.",
            bad,
            final.get("nonfinite_steps", 0),
            final.get("first_nonfinite_step", -1) + 1,
        )


def _init_from(path: str, state: TrainState) -> TrainState:
    """Fine-tuning: params and batch_stats from a checkpoint (a workdir, its checkpoints
    directory or one step's directory; e.g. weights converted by scripts/convert_timm.py)."""
    directory, step = checkpoint.resolve_checkpoint(os.curdir, path)
    source = checkpoint.create_checkpoint_manager(directory, read_only=True)
    logging.info("Initialising params and batch_stats from step %d in %s.", step, directory)
    state = checkpoint.restore_weights(source, step, state)
    source.close()
    return state


def _evaluate(
    exp: Experiment,
    state: TrainState,
    stop: threading.Event,
    writer: metric_writers.MetricWriter,
    step: int,
) -> dict[str, float]:
    """`eval_loop`, written as eval_* scalars at `step`; {} when a signal interrupted it."""
    results = eval_loop(exp, state, stop)
    if results is None:
        logging.warning(
            "Evaluation of step %d interrupted; --mode=eval --checkpoint=%d evaluates it.",
            step,
            step,
        )
        return {}
    writer.write_scalars(step, {f"eval_{k}": v for k, v in results.items()})
    return results


def _train(
    config: ml_collections.ConfigDict,
    exp: Experiment,
    state: TrainState,
    manager: Any,
    writer: metric_writers.MetricWriter,
    run_eval: bool,
    stop: threading.Event,
) -> dict[str, Any]:
    """The training loop of `train_and_evaluate`, from `state` on."""
    start_step = int(state.step)
    if start_step == 0:
        writer.write_hparams(checkpoint.config_to_dict(config))
    eval_every = int(config.eval_every_epochs * exp.steps_per_epoch) if run_eval else 0
    train_iter = sharding.prefetch_to_device(exp.dataset.train_iter(start_step), exp.mesh)
    progress = metric_writers.ProgressLogger(
        exp.num_train_steps, config.global_batch_size, start_step
    )
    train_metrics, eval_metrics, summary = None, {}, {}
    nonfinite = int(state.nonfinite_steps)
    start_time = time.perf_counter()
    for step in range(start_step, exp.num_train_steps):
        if step == start_step:
            state, step_metrics = _first_train_step(config, exp, state, next(train_iter))
        else:
            state, step_metrics = exp.train_step(state, next(train_iter), exp.rngs)
        train_metrics = step_metrics if train_metrics is None else train_metrics.merge(step_metrics)
        done, is_last = step + 1, step + 1 == exp.num_train_steps
        stopping = _should_stop(stop, done)
        if done % config.log_every_steps == 0 or is_last or stopping:
            nonfinite = _check_finite(state, config, manager, exp.num_train_steps, nonfinite)
            checkpoint.check_saves(manager)
            summary = {f"train_{k}": float(v) for k, v in train_metrics.compute().items()}
            summary |= progress(done) | {"nonfinite_steps": int(state.nonfinite_steps)}
            writer.write_scalars(done, summary)
            train_metrics = None
        evaluated = run_eval and (is_last or (eval_every > 0 and done % eval_every == 0))
        interrupted = False
        if evaluated:
            eval_metrics = _evaluate(exp, state, stop, writer, done)
            interrupted, evaluated = not eval_metrics, bool(eval_metrics)
        if (
            evaluated
            or interrupted
            or is_last
            or stopping
            or done % config.checkpoint_every_steps == 0
        ):
            nonfinite = _check_finite(state, config, manager, exp.num_train_steps, nonfinite)
            checkpoint.save(manager, state, config, eval_metrics if evaluated else None)
            stopping = stopping or stop.is_set()  # a signal during the save
        if interrupted or (stopping and not is_last):
            logging.warning(
                "Stopped at step %d with a checkpoint in %s; run the same command to resume.",
                done,
                manager.directory,
            )
            return summary | {"step": done, "stopped_early": True}
    if run_eval and not eval_metrics:
        eval_metrics = eval_loop(exp, state)
    return (
        {f"eval_{k}": v for k, v in eval_metrics.items()}
        | summary
        | {
            "step": int(state.step),
            "num_params": count_params(state.params),
            "train_time_sec": time.perf_counter() - start_time,
            "nonfinite_steps": int(state.nonfinite_steps),
            "first_nonfinite_step": int(state.first_nonfinite_step),
        }
    )


def _first_train_step(config, exp: Experiment, state: TrainState, batch) -> tuple:
    """The first step of a run, with a console line before and after: it traces the train step
    (or loads its traced program) and compiles it (or loads it from JAX's persistent compilation
    cache), which can take minutes for deep models."""
    cache_dir = jax.config.jax_compilation_cache_dir
    cached = _cache_entries(cache_dir)
    logging.info(
        "Compiling the train step for %s (or loading it from the compilation cache %s) ...",
        config.model_name,
        cache_dir or "(off)",
    )
    start = time.perf_counter()
    state, step_metrics = exp.train_step(state, batch, exp.rngs)
    jax.block_until_ready(step_metrics)
    how = "compiled"
    if cache_dir:
        how = "compiled and cached" if _cache_entries(cache_dir) > cached else "loaded from cache"
    logging.info(
        "Train step %s (%s); the first step took %.1f s.",
        how,
        exp.train_step.how,
        time.perf_counter() - start,
    )
    return state, step_metrics


def _cache_entries(cache_dir: str | None) -> int:
    """Compiled programs in JAX's cache directory (the traced programs' folder not counted)."""
    if not cache_dir or not os.path.isdir(cache_dir):
        return 0
    return len(set(os.listdir(cache_dir)) - {step_cache.TRACED_DIR})


def evaluate(config: ml_collections.ConfigDict, workdir: str, checkpoint_ref: str = "") -> dict:
    """Eval-only: restores a checkpoint ('' latest in workdir, a step, or a path) and evaluates.

    Writes `eval_metrics.json` (with the checkpoint's step and directory) to `workdir`.
    """
    directory, step = checkpoint.resolve_checkpoint(workdir, checkpoint_ref)
    # Eval-only reads no training data (a folder may hold only val/): the eval split stands in
    # for the training split, with the smallest valid batch.
    config = config.copy_and_resolve_references()
    config.dataset.train_split = config.dataset.eval_split
    config.global_batch_size = jax.device_count()
    exp = create_experiment(config)
    manager = checkpoint.create_checkpoint_manager(directory, read_only=True)
    state = checkpoint.restore(manager, step, exp.state)
    manager.close()
    logging.info("Evaluating checkpoint step %d from %s.", step, directory)
    results = {f"eval_{k}": v for k, v in eval_loop(exp, state).items()}
    results |= {"step": step, "checkpoint_dir": directory}
    if jax.process_index() == 0:
        metric_writers.write_json(os.path.join(workdir, EVAL_METRICS_FILE), results)
    logging.info("Eval metrics: %s", results)
    return results
