"""One run, assembled and checked before anything is compiled: `create_experiment(config)`.

Every tool builds its run here: the trainer (`lambdanet.train_loop`), eval-only mode
(`lambdanet.evaluate`), the benchmarks, the sweep and the chaos test. An `Experiment` holds the
mesh, the dataset, the schedule, the initial state and the jitted train and eval steps.
"""

import dataclasses
import functools
from collections.abc import Sequence

import jax
import ml_collections
import optax
from absl import logging
from flax import linen as nn

from lambdanet import analysis, config_checks, config_records, sharding, step_cache
from lambdanet.data import Dataset, create_dataset
from lambdanet.train import (
    EvalMetrics,
    TrainMetrics,
    TrainState,
    configured_train_step,
    create_learning_rate_fn,
    create_model,
    create_rngs,
    create_train_state,
    eval_step,
)


def check_image_size(model: nn.Module, image_size: int) -> None:
    """Raises ValueError unless `image_size` is at least the network's total stride: the stem's
    4 times 2 per later stage (32 for c2..c5), in every `ResNet`."""
    stride = 4 * 2 ** (len(model.stage_sizes) - 1)
    if image_size < stride:
        raise ValueError(
            f"config.dataset.image_size={image_size} is smaller than the network's total stride "
            f"{stride} ({len(model.stage_sizes)} stages); use an image size of at least {stride}."
        )


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
            key=dict(step="train", config=config_records.config_to_dict(config)),
            donate_argnums=(0,),
        ),
        eval_step=step_cache.CachedStep(
            jax.jit(eval_step_fn, out_shardings=replicated),
            lambda state, batch, rngs: EvalMetrics.empty(),
            key=dict(step="eval", config=config_records.config_to_dict(config)),
        ),
    )


def log_experiment(config: ml_collections.ConfigDict, exp: Experiment) -> None:
    num_devices = exp.mesh.devices.size
    warmup_steps = min(int(config.warmup_epochs * exp.steps_per_epoch), exp.num_train_steps)
    logging.info(
        "Model %s: %d parameters; dataset %s: %d train / %d eval examples at %dx%d.",
        config.model_name,
        analysis.num_params(exp.state.params),
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
