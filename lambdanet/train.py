"""The training recipe of LambdaNetworks, top to bottom: model, schedule, optimizer, loss, metrics,
train and eval steps, initial state.

The structure follows flax `examples/imagenet`, with one `jax.jit` train step over a device mesh
instead of pmap (see `lambdanet.sharding`); `lambdanet.experiment` assembles a run from these
parts and `lambdanet.train_loop` runs it. The recipe is the paper's (Appendix E.2):

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
`optax.apply_if_finite`) and is counted (`lambdanet.stopping` decides what follows).
"""

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from clu import metrics
from flax import linen as nn
from flax.training import train_state

from lambdanet import models, sharding


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """`ResNet(**config.model)`, with the arguments the trainer owns: `num_classes` (the
    dataset's) and the compute dtype (bfloat16 under `config.half_precision`)."""
    dtype = jnp.bfloat16 if config.half_precision else jnp.float32
    return models.ResNet(**config.model.to_dict(), num_classes=num_classes, dtype=dtype)


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
