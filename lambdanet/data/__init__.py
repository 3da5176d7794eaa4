"""Input pipelines: `create_dataset(config.dataset, ...)` -> a `Dataset` (the protocol below).

Three sources, chosen by `config.dataset.name`:
* in memory (`'digits'`, `'in_memory'`; `in_memory.py`): TF-free uint8 arrays on the host;
  cropping, flipping and RandAugment run in JAX on the device (`device_preprocess`). For small
  datasets (the demo, Imagenette).
* ArrayRecord shards (`'array_record'`; `array_record.py`): TF-free streaming for ImageNet-size
  data. Grain worker processes decode and crop JPEGs (libjpeg-turbo, reduced-size decoding);
  flip, RandAugment and mixup run on the device. `scripts/convert_to_array_record.py` writes the
  shards once from the ImageNet tars, an image folder tree or a TFDS dataset. With
  `decode_on='gpu'` (`gpu_decode.py`) the workers only draw the crops and the training process
  decodes them on its GPU (nvImageCodec).
* tf.data (`'image_folder'` or a TFDS name such as `'imagenet2012'`; `input_pipeline.py`):
  decoding and cropping on the host CPU with TensorFlow; flip, RandAugment and mixup on the device.

All give endless train batches that are a pure function of (seed, step), so `train_iter(k)`
resumes exactly, and eval batches padded and masked so every eval example counts exactly once for
any batch size and process count (`batching.py` holds that shared arithmetic).
"""

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import ml_collections
import numpy as np
from ml_collections import config_dict

from lambdanet.data import array_record, batching, in_memory, synthetic

if TYPE_CHECKING:  # augment imports JAX, which the ArrayRecord path's workers do without
    from lambdanet.data import augment

IN_MEMORY_NAMES = ("digits", "in_memory")
ARRAY_RECORD_NAME = "array_record"
DECODE_ON = ("host", "gpu")
# What config.dataset.path names, for the sources that read one.
_PATH_NEEDED = {
    "in_memory": "FILE.npz (written by scripts/make_arrays.py) or an image folder "
    "ROOT/<split>/<class>/<image>.jpg",
    ARRAY_RECORD_NAME: f"DIR, a shard set written by `{array_record.CONVERT_COMMAND}`",
    "image_folder": "ROOT, a folder tree ROOT/<split>/<class>/<image>.jpg",
}


def default_dataset_config() -> ml_collections.ConfigDict:
    """The `config.dataset` fields and defaults (ImageNet, the 90-epoch setup's augmentation).

    name: 'array_record' (default: path = folder of shards written by
      scripts/convert_to_array_record.py; TensorFlow-free), 'digits' (embedded demo),
      'in_memory' (path = .npz array file or image folder),
      'image_folder' (path = folder tree read with TFDS ImageFolder), a TFDS name, or
      'synthetic' (one fixed batch of random images: benchmarks, `synthetic.py`).
    decoder: ArrayRecord path: 'simplejpeg' (libjpeg-turbo with reduced-size decoding when the
      crop shrinks 2x or more), 'opencv' or 'pillow' (the same with their reduced-size modes).
    fast_dct: ArrayRecord path: libjpeg-turbo's fast integer IDCT and fast chroma upsampling.
    decode_on: ArrayRecord path: 'host' (the workers decode with `decoder`) or 'gpu' (the workers
      draw the crops, the training process decodes them with nvImageCodec on its GPU, the
      `gpu-decode` extra: `gpu_decode.py`; its CPU backend on a CPU).
    workers: ArrayRecord path: Grain decoding processes (None: one per CPU core, less one);
      0 decodes in the training process (tests, debugging).
    data_dir / manual_dir: TFDS data dir; the folder with the ImageNet tars (first run only).
    load_size: side the in-memory path decodes an image folder to; None = image_size /
      eval_crop_fraction (so the eval crop is exactly image_size).
    randaugment: None, or dict(num_layers=2, magnitude=M) (Appendix E.2, 350-epoch setup).
    shuffle_buffer, cache: tf.data path only (per-process shuffle buffer; cache encoded records).
    max_train_examples / max_eval_examples: use only the first N examples (tests, smoke runs).
    num_classes: if set, checked against the dataset.
    """
    return ml_collections.ConfigDict(
        dict(
            name=ARRAY_RECORD_NAME,
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
            decoder="simplejpeg",
            fast_dct=True,
            decode_on="host",
            workers=config_dict.placeholder(int),
            max_train_examples=config_dict.placeholder(int),
            max_eval_examples=config_dict.placeholder(int),
            num_classes=config_dict.placeholder(int),
        )
    )


class Dataset(Protocol):
    """What every input source provides for one process (`in_memory.ArraySource`,
    `input_pipeline.TFDSSource`, `array_record.ArrayRecordSource`).

    Host batches: 'image' uint8 [B, H, W, 3] (B = batch size / process count; H = W = image_size
    on the tf.data and ArrayRecord paths, the stored side on the in-memory path), 'label' int32
    [B]; eval batches also carry 'mask' bool [B]. `device_preprocess(batch, rng, train)` is pure
    jnp (called inside jit): augmentation (train) or center crop (eval, in-memory path) and
    ImageNet normalisation -> 'image' float32 [B, S, S, 3], S = image_size; with mixup also
    'soft_label'.
    """

    num_classes: int
    num_train_examples: int
    num_eval_examples: int
    image_size: int
    class_names: tuple[str, ...]
    num_eval_batches: int  # per process; every process yields this many eval batches
    device_preprocess: "augment.Augmentation"

    def train_iter(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Endless per-process train batches from global step `start_step` on.

        A pure function of (seed, step): `train_iter(k)` yields exactly what an uninterrupted
        `train_iter(0)` yields from step k on.
        """
        ...

    def eval_iter(self) -> Iterator[dict[str, np.ndarray]]:
        """One pass over this process's eval shard in `num_eval_batches` full batches; the padding
        of the last ones has 'mask' False, so every eval example counts exactly once overall."""
        ...


def _check_path(config) -> None:
    """A ValueError saying what --config.dataset.path must name, where the source reads one
    (`_PATH_NEEDED`) and it is unset; whether it exists, each source checks as it reads it."""
    if config.name in _PATH_NEEDED and not config.path:
        raise ValueError(
            f"name={config.name!r} needs --config.dataset.path={_PATH_NEEDED[config.name]}."
        )


def _check_decode_on(config) -> None:
    """A ValueError unless decode_on is 'host', or 'gpu' on the ArrayRecord path."""
    if config.decode_on not in DECODE_ON:
        raise ValueError(f"config.dataset.decode_on={config.decode_on!r}: use one of {DECODE_ON}.")
    if config.decode_on == "gpu" and config.name != ARRAY_RECORD_NAME:
        raise ValueError(
            f"config.dataset.decode_on='gpu' serves name={ARRAY_RECORD_NAME!r} only, not "
            f"{config.name!r}; convert it (`{array_record.CONVERT_COMMAND}`) or decode on the host."
        )


def _in_memory_splits(config) -> tuple[in_memory.ImageArrays, in_memory.ImageArrays, list[str]]:
    if config.name == "digits":
        from lambdanet.data import digits

        arrays, class_names = digits.load_digits()
    else:
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


def create_dataset(
    config: ml_collections.ConfigDict,
    *,
    global_batch_size: int,
    eval_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Dataset:
    """Builds the source `config` (the experiment's `config.dataset`) names, for one process.

    global_batch_size / eval_batch_size are summed over processes (each must divide by
    process_count); seed fixes shuffling and host-side crops (the device's randomness comes from
    the rng passed to `device_preprocess`).
    """
    _check_path(config)
    _check_decode_on(config)
    batch = batching.Batching(
        global_batch_size=global_batch_size,
        eval_batch_size=eval_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )
    if config.name in IN_MEMORY_NAMES:
        train, evaluation, class_names = _in_memory_splits(config)
        from lambdanet.data import augment

        augmentation = augment.from_config(config, len(class_names), crop_on_device=True)
        dataset = in_memory.ArraySource(train, evaluation, class_names, batch, augmentation)
    elif config.name == ARRAY_RECORD_NAME and config.decode_on == "gpu":
        from lambdanet.data import gpu_decode

        dataset = gpu_decode.GpuDecodeSource(config, batch)
    elif config.name == ARRAY_RECORD_NAME:
        dataset = array_record.ArrayRecordSource(config, batch)
    elif config.name == synthetic.NAME:
        dataset = synthetic.SyntheticSource(config, batch)
    else:
        from lambdanet.data import input_pipeline

        dataset = input_pipeline.TFDSSource(config, batch)
    if config.num_classes is not None and config.num_classes != dataset.num_classes:
        raise ValueError(
            f"Dataset {config.name!r} has {dataset.num_classes} classes, but "
            f"config.dataset.num_classes={config.num_classes}; fix or unset it."
        )
    return dataset
