"""tf.data pipelines for TFDS datasets (ImageNet from a manual_dir, any TFDS image classification
dataset by name) and local image folders (TFDS `ImageFolder`).

The only module of lambdanet that imports TensorFlow and TFDS (the `tfds` extra), lazily
(`_import_tf`: an ImportError naming the extra where they are missing), with TF kept off the
GPUs. Host batches are uint8 [B, S, S, 3] crops at the model's image size; flipping, RandAugment,
mixup and normalisation run on the device (`augment.Augmentation` with crop_on_device=False).

Determinism and resume: each process reads an even, contiguous slice of the split
(`tfds.even_splits`; `ImageFolder`, which has no sub-splits, is sharded with `Dataset.shard`). Its
training stream is the concatenation of epochs of that slice, epoch e shuffled (buffer
`shuffle_buffer`) with a seed from (seed, process, e); example j of the stream is cropped with the
stateless seed (seed, process, j), by `crop.py`'s formulas, which every input path shares.
`train_iter(k)` starts at element k B of that stream: it skips the first k B mod n records of the
epoch it starts in (reading them, not decoding them). Files that fail to decode are skipped
(`ignore_errors`) and counted in one warning per epoch (train) or per pass (eval); after such a
skip a resumed run starts at a slightly different batch boundary, so resume is exact only while
no file fails to decode. `scripts/convert_to_array_record.py` writes a clean, checked shard set
instead.
"""

import functools
import math
import re
import types

import numpy as np
from absl import logging

from lambdanet.data import augment, batching, crop

_MANUAL_FILES = {"imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")}
_ENDLESS = 2**62
INSTALL_TFDS = (
    "The tf.data input path (TFDS datasets, name='image_folder') needs TensorFlow and TensorFlow "
    "Datasets, which are not installed: pip install 'lambdanet[tfds]' (in a checkout: "
    "pip install -e '.[tfds]'), or use a TF-free path: name='array_record' or 'in_memory'."
)


@functools.cache
def _import_tf():
    """Imports TensorFlow and TFDS and hides the GPUs from TensorFlow (JAX owns them).

    An ImportError naming the `tfds` extra where either is not installed.
    """
    try:
        import tensorflow as tf
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError(f"{INSTALL_TFDS} ({error})", name=error.name) from error

    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # TF was initialised by someone else before us.
        logging.warning("TensorFlow was initialised before lambdanet could hide the GPUs from it.")
    return tf, tfds


def _manual_dir_error(builder, data_dir: str | None, problem: str) -> ValueError:
    files = _MANUAL_FILES.get(builder.name)
    where = (
        f"Download {' and '.join(files)} (https://image-net.org/download-images, registration "
        "required) into one folder MANUAL_DIR."
        if files
        else "Put the source files into one folder MANUAL_DIR: "
        + builder.MANUAL_DOWNLOAD_INSTRUCTIONS
    )
    return ValueError(
        f"TFDS dataset {builder.name!r} is not prepared in data_dir="
        f"{data_dir or '~/tensorflow_datasets'} and {problem}. To fix:\n"
        f"  1. {where}\n"
        f"  2. Either prepare it once: `tfds build {builder.name} --manual_dir=MANUAL_DIR "
        "--data_dir=DATA_DIR` (hours; about 150 GB in DATA_DIR for imagenet2012),\n"
        "     or pass --config.dataset.manual_dir=MANUAL_DIR --config.dataset.data_dir=DATA_DIR "
        "and the first run prepares it.\n"
        "  Later runs only need --config.dataset.data_dir=DATA_DIR."
    )


def _prepare(builder, data_dir: str | None, manual_dir: str | None) -> None:
    """Downloads and prepares a TFDS dataset, checking a manual_dir first where one is needed."""
    tf, tfds = _import_tf()
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
        if not manual_dir or not tf.io.gfile.isdir(manual_dir):
            raise _manual_dir_error(builder, data_dir, f"manual_dir={manual_dir!r} is not a folder")
        required = _MANUAL_FILES.get(builder.name, ())
        missing = [f for f in required if not tf.io.gfile.exists(f"{manual_dir}/{f}")]
        if missing or not tf.io.gfile.listdir(manual_dir):
            problem = f"manual_dir={manual_dir!r} lacks {missing or 'the source files'}"
            raise _manual_dir_error(builder, data_dir, problem)
    logging.info("Preparing TFDS dataset %s in %s (done once).", builder.name, builder.data_dir)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )


def get_builder(config):
    """The TFDS builder named by the dataset config, prepared; clear errors for bad names/paths."""
    tf, tfds = _import_tf()
    if config.name == "image_folder":
        if not tf.io.gfile.isdir(config.path):
            raise ValueError(
                f"image_folder path={config.path!r} is not a folder. Expected a tree "
                "PATH/<split>/<class>/<image>.jpg (e.g. PATH/train/<class>/, PATH/val/<class>/); "
                "set --config.dataset.path=PATH."
            )
        return tfds.folder_dataset.ImageFolder(config.path)
    try:
        builder = tfds.builder(config.name, data_dir=config.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"Unknown dataset name {config.name!r}: use 'digits', 'in_memory', 'image_folder' or a "
            "TFDS image classification dataset (e.g. 'imagenet2012', 'imagenette', 'cifar10'; "
            "`tfds.list_builders()` lists them)."
        ) from None
    if not builder.is_prepared():
        _prepare(builder, config.data_dir, config.manual_dir)
    _supervised_keys(builder)
    return builder


def _supervised_keys(builder) -> tuple[str, str]:
    """(image key, label key) of an image classification builder; ValueError for other datasets."""
    _, tfds = _import_tf()
    keys = builder.info.supervised_keys
    features = builder.info.features
    if (
        not keys
        or len(keys) != 2
        or not isinstance(features[keys[0]], tfds.features.Image)
        or not isinstance(features[keys[1]], tfds.features.ClassLabel)
    ):
        raise ValueError(
            f"TFDS dataset {builder.name!r} is not an image classification dataset "
            f"(supervised keys {keys}); it needs an Image and a ClassLabel feature."
        )
    return keys


def _check_split(builder, split: str) -> None:
    available = list(builder.info.splits.keys())
    names = [re.sub(r"\[.*\]$", "", part) for part in split.split("+")]
    if available and not set(names) <= set(available):
        raise ValueError(
            f"Split {split!r} is not in {builder.name!r}; it has {available}. Set the "
            "dataset's train_split/eval_split to one of those."
        )


def read_split(
    builder, split: str, max_examples: int | None, process_index: int, process_count: int
):
    """This process's slice of a split: tf.data.Dataset of (encoded image bytes, int32 label)."""
    tf, tfds = _import_tf()
    _check_split(builder, split)
    image_key, label_key = _supervised_keys(builder)
    decoders = {image_key: tfds.decode.SkipDecoding()}
    if isinstance(builder, tfds.folder_dataset.ImageFolder):
        ds = builder.as_dataset(split=split, decoders=decoders)
        ds = ds.take(max_examples or -1).shard(process_count, process_index)
    else:
        split = f"{split}[:{max_examples}]" if max_examples else split
        shard = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
        ds = builder.as_dataset(split=shard, decoders=decoders, shuffle_files=False)
    return ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32)))


def count(ds) -> int:
    """The number of elements of a finite tf.data.Dataset."""
    cardinality = int(ds.cardinality())
    return cardinality if cardinality >= 0 else int(ds.reduce(0, lambda n, _: n + 1))


@functools.cache
def _tf_numpy():
    """The array functions `crop.py`'s formulas use (its `xp`), as TF ops on float tensors."""
    tf, _ = _import_tf()
    return types.SimpleNamespace(
        exp=tf.exp,
        sqrt=tf.sqrt,
        round=tf.round,  # half to even, as numpy's
        floor=tf.floor,
        minimum=tf.minimum,
        maximum=tf.maximum,
        where=tf.where,
        any=tf.reduce_any,
        argmax=lambda x: tf.argmax(tf.cast(x, tf.int32)),
    )


def _window(box_fn, shape):
    """int32 [4] window = box_fn(height, width) of an image of `shape` [3], computed in float32."""
    tf, _ = _import_tf()
    height, width = tf.unstack(tf.cast(shape[:2], tf.float32))
    return tf.cast(tf.stack(box_fn(height, width)), tf.int32)


def _decode_window(image_bytes, window_fn):
    """Decodes the window [top, left, height, width] = window_fn(image shape) of a JPEG (only the
    window's blocks) or of any other format TF reads (PNG, GIF, BMP, WebP) -> uint8 [h, w, 3]."""
    tf, _ = _import_tf()

    def jpeg():
        window = window_fn(tf.io.extract_jpeg_shape(image_bytes))
        return tf.image.decode_and_crop_jpeg(image_bytes, window, channels=3)

    def other():
        image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
        window = window_fn(tf.shape(image))
        return tf.slice(image, [window[0], window[1], 0], [window[2], window[3], 3])

    return tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)


def _resize_uint8(image, size: int):
    tf, _ = _import_tf()
    image = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def train_crop(image_bytes, seed, size: int, area_range, aspect_ratio_range, max_attempts=10):
    """The Inception crop (`crop.inception_box` in whole pixels, as the ArrayRecord path's) drawn
    statelessly from `seed` int64 [2], decoded and resized -> uint8 [size, size, 3]."""
    tf, _ = _import_tf()
    # One draw for all (cheaper in a tf.data map than one per quantity), scaled to the ranges.
    uniform = tf.random.stateless_uniform([2 * max_attempts + 2], seed)
    log_low, log_high = math.log(aspect_ratio_range[0]), math.log(aspect_ratio_range[1])
    fraction = area_range[0] + (area_range[1] - area_range[0]) * uniform[:max_attempts]
    log_ratio = log_low + (log_high - log_low) * uniform[max_attempts:-2]
    offset = uniform[-2:]

    def box_fn(height, width):
        return crop.inception_box(
            fraction, log_ratio, offset, height, width, whole_pixels=True, xp=_tf_numpy()
        )

    window_fn = functools.partial(_window, box_fn)
    return _resize_uint8(_decode_window(image_bytes, window_fn), size)


def eval_crop(image_bytes, size: int, crop_fraction: float):
    """Central square of side crop_fraction * shorter side (`crop.center_crop_box` in whole
    pixels, as the ArrayRecord path's), resized -> uint8 [size, size, 3]."""

    def box_fn(height, width):
        return crop.center_crop_box(height, width, crop_fraction, xp=_tf_numpy())

    window_fn = functools.partial(_window, box_fn)
    return _resize_uint8(_decode_window(image_bytes, window_fn), size)


def _seed_int(*entropy: int) -> int:
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


class TFDSSource:
    """A TFDS dataset or image folder as a `lambdanet.data.Dataset` (see the module docstring)."""

    def __init__(self, config, batch: batching.Batching):
        self.config = config
        self.batch_size = batch.batch_size
        self.eval_batch_size = batch.local_eval_batch_size
        process_index, process_count = batch.process_index, batch.process_count
        builder = get_builder(config)
        _, label_key = _supervised_keys(builder)
        self.class_names = tuple(builder.info.features[label_key].names)
        self.num_classes = len(self.class_names)
        self.image_size = config.image_size
        self.device_preprocess = augment.from_config(config, self.num_classes, crop_on_device=False)
        read = functools.partial(read_split, builder)
        self.train = read(
            config.train_split, config.max_train_examples, process_index, process_count
        )
        self.num_local_train_examples = count(self.train)
        if not self.num_local_train_examples:
            raise ValueError(
                f"Process {process_index} of {process_count} got no train examples of "
                f"{config.name!r} split {config.train_split!r}; use more data or fewer processes."
            )
        self.num_train_examples = count(read(config.train_split, config.max_train_examples, 0, 1))
        eval_shards = [
            read(config.eval_split, config.max_eval_examples, p, process_count)
            for p in range(process_count)
        ]
        self.evaluation = eval_shards[process_index]
        self.num_local_eval_examples = count(self.evaluation)
        self.num_eval_examples = sum(count(ds) for ds in eval_shards)
        self.num_eval_batches = batching.num_eval_batches(
            map(count, eval_shards), self.eval_batch_size
        )
        self.shuffle_seed = _seed_int(batch.seed, process_index, 0)
        self.crop_seed = _seed_int(batch.seed, process_index, 1)

    def train_dataset(self, start_step: int = 0):
        """tf.data.Dataset of this process's train batches from `start_step` on (endless)."""
        tf, _ = _import_tf()
        config = self.config
        records = self.train.cache() if config.cache else self.train
        first = start_step * self.batch_size
        start_epoch, offset = divmod(first, self.num_local_train_examples)
        buffer = min(config.shuffle_buffer, self.num_local_train_examples)
        ds = tf.data.Dataset.range(start_epoch, _ENDLESS).flat_map(
            lambda epoch: records.shuffle(buffer, seed=self.shuffle_seed + epoch)
        )
        ds = tf.data.Dataset.zip(tf.data.Dataset.range(first, _ENDLESS), ds.skip(offset))

        def crop(index, example):
            image_bytes, label = example
            seed = tf.stack([tf.constant(self.crop_seed, tf.int64), index])
            image = train_crop(
                image_bytes,
                seed,
                config.image_size,
                tuple(config.train_crop_area),
                tuple(config.train_crop_aspect_ratio),
            )
            return {"image": image, "label": label, "position": index}

        # Undecodable files are dropped here and counted by `train_iter` from the gaps they leave.
        ds = ds.map(crop, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors(log_warning=False)
        return ds.batch(self.batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)

    def eval_dataset(self):
        """tf.data.Dataset of this process's eval examples in batches (the last one partial)."""
        tf, _ = _import_tf()
        config = self.config
        records = self.evaluation.cache() if config.cache else self.evaluation
        ds = records.map(
            lambda image_bytes, label: {
                "image": eval_crop(image_bytes, config.image_size, config.eval_crop_fraction),
                "label": label,
            },
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        ds = ds.ignore_errors(log_warning=False)  # counted by `eval_iter`
        return ds.batch(self.eval_batch_size).prefetch(tf.data.AUTOTUNE)

    def train_iter(self, start_step: int = 0):
        """Train batches; one warning per epoch counts the files that failed to decode."""
        n, expected, skipped = self.num_local_train_examples, start_step * self.batch_size, 0
        epoch = expected // n
        for batch in self.train_dataset(start_step).as_numpy_iterator():
            for position in batch.pop("position").tolist():
                if position // n != epoch:  # the first example of a new epoch: report the last
                    skipped += (epoch + 1) * n - expected
                    self._report_skipped(skipped, "train", f"epoch {epoch}")
                    epoch, expected, skipped = position // n, (position // n) * n, 0
                skipped += position - expected
                expected = position + 1
            yield batch

    def eval_iter(self):
        image_shape = (self.config.image_size, self.config.image_size, 3)
        counted = []

        def counting(batches):
            for batch in batches:
                counted.append(len(batch["label"]))
                yield batch
            self._report_skipped(self.num_local_eval_examples - sum(counted), "eval", "this pass")

        return batching.padded_eval_batches(
            counting(self.eval_dataset().as_numpy_iterator()),
            self.eval_batch_size,
            self.num_eval_batches,
            image_shape,
        )

    def _report_skipped(self, count: int, split: str, when: str) -> None:
        if count > 0:
            logging.warning(
                "%s split %r: %d files failed to decode in %s and were skipped (%s); "
                "scripts/convert_to_array_record.py or scripts/make_arrays.py writes a clean copy.",
                split,
                self.config.train_split if split == "train" else self.config.eval_split,
                count,
                when,
                self.config.path or self.config.name,
            )


def encoded_examples(config, split: str, max_examples: int | None = None):
    """All (encoded image bytes, label) of a split, for `scripts/make_arrays.py`.

    Returns (list of bytes, labels int32 [N], class names).
    """
    builder = get_builder(config)
    _, label_key = _supervised_keys(builder)
    images, labels = [], []
    for image_bytes, label in read_split(builder, split, max_examples, 0, 1).as_numpy_iterator():
        images.append(image_bytes)
        labels.append(label)
    return images, np.asarray(labels, np.int32), list(builder.info.features[label_key].names)
