"""Input pipelines: `create_dataset(config.dataset, ...)` -> `Dataset`.

Two paths behind one interface:
* in memory (`name='digits'` or `'in_memory'`, `in_memory.py`): TF-free uint8 arrays on the host;
  cropping, flipping and RandAugment run in JAX on the device (`Dataset.device_preprocess`).
* tf.data (`name='image_folder'` or a TFDS name such as `'imagenet2012'`, `input_pipeline.py`):
  decoding and cropping on the host CPU with TensorFlow (imported only there, kept off the GPUs);
  flip, RandAugment and mixup on the device.

Both give endless train batches that are a pure function of (seed, step), so `train_iter(k)`
resumes exactly, and eval batches padded and masked so every eval example counts exactly once for
any batch size and process count.
"""

import dataclasses
from collections.abc import Iterator
from typing import Protocol

import jax
import ml_collections
import numpy as np
from ml_collections import config_dict

from lambdanet.data import augment, in_memory

IN_MEMORY_NAMES = ("digits", "in_memory")


def default_dataset_config() -> ml_collections.ConfigDict:
    """The `config.dataset` fields and defaults (ImageNet, the 90-epoch setup's augmentation).

    name: 'digits' (embedded demo), 'in_memory' (path = .npz array file or image folder),
      'image_folder' (path = folder tree read with TFDS ImageFolder) or a TFDS name.
    data_dir / manual_dir: TFDS data dir; the folder with the ImageNet tars (first run only).
    load_size: side the in-memory path decodes an image folder to; None = image_size /
      eval_crop_fraction (so the eval crop is exactly image_size).
    randaugment: None, or dict(num_layers=2, magnitude=M) (PAPER.md §4.2, 350-epoch setup).
    shuffle_buffer, cache: tf.data path only (per-process shuffle buffer; cache encoded records).
    max_train_examples / max_eval_examples: use only the first N examples (tests, smoke runs).
    num_classes: if set, checked against the dataset.
    """
    return ml_collections.ConfigDict(
        dict(
            name="imagenet2012",
            data_dir=config_dict.placeholder(str),
            manual_dir=config_dict.placeholder(str),
            path=config_dict.placeholder(str),
            train_split="train",
            eval_split="validation",
            image_size=224,
            load_size=config_dict.placeholder(int),
            eval_crop_fraction=0.875,
            train_crop_area=(0.08, 1.0),
            train_crop_aspect_ratio=(3 / 4, 4 / 3),
            horizontal_flip=True,
            randaugment=None,
            mixup_alpha=0.0,
            shuffle_buffer=16_384,
            cache=False,
            max_train_examples=config_dict.placeholder(int),
            max_eval_examples=config_dict.placeholder(int),
            num_classes=config_dict.placeholder(int),
        )
    )


class BatchSource(Protocol):
    """What both pipelines provide (`in_memory.ArraySource`, `input_pipeline.TFDSSource`)."""

    num_train_examples: int
    num_eval_examples: int
    num_eval_batches: int

    def train_iter(self, start_step: int) -> Iterator[dict[str, np.ndarray]]: ...

    def eval_iter(self) -> Iterator[dict[str, np.ndarray]]: ...


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    """A dataset for one process: sizes, batch iterators and the on-device preprocessing.

    Host batches: 'image' uint8 [B, H, W, 3] (B = batch size / process count; H = W = image_size
    on the tf.data path, the stored side on the in-memory path), 'label' int32 [B]; eval batches
    also carry 'mask' bool [B]. `device_preprocess` maps them to float32 [B, S, S, 3],
    S = image_size.
    """

    num_classes: int
    num_train_examples: int
    num_eval_examples: int
    image_size: int
    class_names: tuple[str, ...]
    num_eval_batches: int  # per process; every process yields this many eval batches
    augmentation: augment.Augmentation
    source: BatchSource

    def train_iter(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Endless per-process train batches from global step `start_step` on.

        A pure function of (seed, step): `train_iter(k)` yields exactly what an uninterrupted
        `train_iter(0)` yields from step k on.
        """
        return self.source.train_iter(start_step)

    def eval_iter(self) -> Iterator[dict[str, np.ndarray]]:
        """One pass over this process's eval shard in `num_eval_batches` full batches; the padding
        of the last ones has 'mask' False, so every eval example counts exactly once overall."""
        return self.source.eval_iter()

    def device_preprocess(self, batch: dict, rng: jax.Array, train: bool) -> dict:
        """Pure jnp (call inside jit): augmentation (train) or center crop (eval, in-memory path)
        and ImageNet normalisation -> 'image' float32 [B, S, S, 3]; with mixup also 'soft_label'."""
        return self.augmentation(batch, rng, train)


def _in_memory_splits(config) -> tuple[in_memory.ImageArrays, in_memory.ImageArrays, list[str]]:
    if config.name == "digits":
        from lambdanet.data import digits

        arrays, class_names = digits.load_digits()
    else:
        if not config.path:
            raise ValueError(
                "name='in_memory' needs --config.dataset.path=FILE.npz (written by "
                "scripts/make_arrays.py) or an image folder ROOT/<split>/<class>/."
            )
        load_size = config.load_size or round(config.image_size / config.eval_crop_fraction)
        arrays, class_names = in_memory.load_arrays(
            config.path, [config.train_split, config.eval_split], load_size
        )
    for split in (config.train_split, config.eval_split):
        if split not in arrays:
            raise ValueError(
                f"Split {split!r} is not in dataset {config.name!r}; it has "
                f"{sorted(arrays)}. Set train_split/eval_split to one of those."
            )
    train = arrays[config.train_split].take(config.max_train_examples)
    evaluation = arrays[config.eval_split].take(config.max_eval_examples)
    return train, evaluation, class_names


def _randaugment_fields(randaugment) -> dict:
    if not randaugment:
        return {}
    if set(randaugment) != {"num_layers", "magnitude"}:
        raise ValueError(
            f"randaugment={dict(randaugment)} must be None or "
            "dict(num_layers=N, magnitude=M), e.g. dict(num_layers=2, magnitude=10)."
        )
    return dict(
        randaugment_layers=int(randaugment["num_layers"]),
        randaugment_magnitude=float(randaugment["magnitude"]),
    )


def create_dataset(
    config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    eval_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Dataset:
    """Builds the dataset `config` (the experiment's `config.dataset`) describes for one process.

    global_batch_size / eval_batch_size are summed over processes (each must divide by
    process_count); seed fixes shuffling and host-side crops (the device's randomness comes from
    the rng passed to `device_preprocess`).
    """
    batching = dict(
        global_batch_size=global_batch_size,
        eval_batch_size=eval_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )
    if config.name in IN_MEMORY_NAMES:
        train, evaluation, class_names = _in_memory_splits(config)
        source = in_memory.ArraySource(train, evaluation, **batching)
    else:
        from lambdanet.data import input_pipeline

        source = input_pipeline.TFDSSource(config, **batching)
        class_names = source.class_names
    if config.num_classes is not None and config.num_classes != len(class_names):
        raise ValueError(
            f"Dataset {config.name!r} has {len(class_names)} classes, but "
            f"config.dataset.num_classes={config.num_classes}; fix or unset it."
        )
    augmentation = augment.Augmentation(
        image_size=config.image_size,
        num_classes=len(class_names),
        crop_on_device=config.name in IN_MEMORY_NAMES,
        eval_crop_fraction=config.eval_crop_fraction,
        train_crop_area=tuple(config.train_crop_area),
        train_crop_aspect_ratio=tuple(config.train_crop_aspect_ratio),
        horizontal_flip=config.horizontal_flip,
        mixup_alpha=config.mixup_alpha,
        **_randaugment_fields(config.randaugment),
    )
    return Dataset(
        num_classes=len(class_names),
        num_train_examples=source.num_train_examples,
        num_eval_examples=source.num_eval_examples,
        image_size=config.image_size,
        class_names=tuple(class_names),
        num_eval_batches=source.num_eval_batches,
        augmentation=augmentation,
        source=source,
    )
