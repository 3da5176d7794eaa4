"""ImageNet-size data without TensorFlow: ArrayRecord shards read by Grain worker processes.

A shard set is a folder (`scripts/convert_to_array_record.py` writes it):
* `manifest.json`: {"format": FORMAT, "class_names": [...], "max_side": S or null,
  "splits": {NAME: {"num_examples": N, "shards": [{"file": ..., "num_examples": n}, ...],
  "skipped": k, "reencoded": m}}}; written last, after every shard's count was checked.
* `NAME-SSSSS-of-TTTTT.array_record`: records `encode_record(label, name, image bytes)`, one per
  chunk (`group_size:1`, uncompressed: the images are JPEGs), so any record is one read away.

`ArrayRecordSource` serves a shard set as a `lambdanet.data.Dataset`:
* train: global batch k is the train-set indices at stream positions [k G, (k + 1) G) of
  `batching.py`'s stream (a global shuffle, a fresh permutation each epoch); process p reads only
  its slice. Each example's Inception crop is drawn from (seed, stream position), so a batch is a
  pure function of (seed, step): `train_iter(k)` resumes exactly, whatever the process or worker
  count. Grain (`MapDataset.range(k, ...).map(train_batch).mp_prefetch`) runs whole batches in
  `workers` processes: each decodes and crops B images (`decode.Decoder`) into one array, which
  reaches the training process through shared memory as uint8.
* eval: contiguous per-process shards, resize + central crop (`eval_crop_fraction`), batches
  padded and masked by `batching.padded_eval_batches`.
A record that does not decode (the converter keeps none, but shards may come from elsewhere) is
replaced by the next record that does, with a warning: deterministic, so resume stays exact. A
shard that does not read (a damaged file: its chunk checksums fail) stops the input with a
`ShardReadError` naming it and the command that rewrites it: serving other records in its place
would make a batch depend on which reads failed, not only on (seed, step).
"""

import atexit
import dataclasses
import functools
import itertools
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from absl import logging

from lambdanet.data import batching, crop, decode

FORMAT = "lambdanet-array-record-v1"
# Batches a Grain worker makes ahead of the consumer with the options of `_iterate` (counted
# by a test): the one it is making, the one waiting to enter its queue, the one in its queue
# (per_worker_buffer_size=1) and the one the parent process has read ahead from that queue.
AHEAD_PER_WORKER = 4
MANIFEST = "manifest.json"
CONVERT_COMMAND = (
    "python scripts/convert_to_array_record.py --folder=ROOT --output=DIR "
    "(or --imagenet_dir=DIR_WITH_TARS, or --tfds=NAME)"
)
_HEADER = struct.Struct("<iH")  # label int32, name length uint16
_ENDLESS = 2**62
_MAX_REPLACEMENTS = 64


class ShardReadError(ValueError):
    """A shard of a shard set does not read; the message names it and how to rewrite it."""


def encode_record(label: int, name: str, image: bytes) -> bytes:
    """One example: int32 label, uint16 name length, UTF-8 name, the encoded image."""
    name_bytes = name.encode()[:65535]
    return _HEADER.pack(label, len(name_bytes)) + name_bytes + image


def decode_record(record: bytes) -> tuple[int, str, bytes]:
    """(label, name, image bytes) of a record written by `encode_record`."""
    label, name_length = _HEADER.unpack_from(record)
    start = _HEADER.size + name_length
    return label, record[_HEADER.size : start].decode(errors="replace"), record[start:]


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.array_record"


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of the shard set in folder `path`; ValueError naming the fix if absent."""
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.is_file():
        state = (
            "holds shards but no manifest: the conversion did not finish (run it again; it resumes)"
            if Path(path).is_dir() and any(Path(path).glob("*.array_record*"))
            else "is not an ArrayRecord shard set"
        )
        raise ValueError(
            f"config.dataset.path={str(path)!r} {state}. Write one with `{CONVERT_COMMAND}`."
        )
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(
            f"{manifest_path} has format {manifest.get('format')!r}, not {FORMAT!r}; convert "
            f"again with `{CONVERT_COMMAND}`."
        )
    return manifest


def split_files(path: str | os.PathLike, manifest: dict, split: str) -> tuple[list[str], int]:
    """(shard paths, example count) of `split`, each shard's record count checked."""
    from array_record.python import array_record_module

    splits = manifest["splits"]
    if split not in splits:
        raise ValueError(
            f"Split {split!r} is not in the shard set {path} (it has {sorted(splits)}); set "
            "the dataset's train_split/eval_split to one of those."
        )
    files = []
    for shard in splits[split]["shards"]:
        file = Path(path) / shard["file"]
        if not file.is_file():
            raise ValueError(
                f"Shard {file} is missing from the shard set; convert again with "
                f"`{CONVERT_COMMAND}` (it rewrites only what is missing)."
            )
        reader = array_record_module.ArrayRecordReader(str(file))
        found = reader.num_records()
        reader.close()
        if found != shard["num_examples"]:
            raise ValueError(
                f"Shard {file} holds {found} records, its manifest says {shard['num_examples']}: "
                f"it is half-written or changed. Delete it and convert again (`{CONVERT_COMMAND}`)."
            )
        files.append(str(file))
    return files, int(splits[split]["num_examples"])


class _Examples:
    """Random access to a split's records, opened lazily in each process (picklable)."""

    def __init__(self, files: list[str], num_examples: int, decoder: decode.Decoder):
        self.files, self.num_examples, self.decoder = files, num_examples, decoder

    @functools.cached_property
    def _source(self):
        from array_record.python import array_record_data_source

        return array_record_data_source.ArrayRecordDataSource(self.files)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_source"}

    def _read(self, indices: list[int]) -> list[bytes]:
        """The records at `indices`; ShardReadError naming the shard that does not read."""
        try:
            return self._source.__getitems__(indices)
        except RuntimeError as error:  # array_record's error for a damaged file
            raise self._unreadable(indices, error) from None

    def _unreadable(self, indices: list[int], error: RuntimeError) -> ShardReadError:
        """The ShardReadError for `error`, naming the shard of the first of `indices` that does
        not read, and the command that rewrites it (the converter keeps the good shards)."""
        from array_record.python import array_record_module

        def num_records(file: str) -> int:
            reader = array_record_module.ArrayRecordReader(file)
            count = reader.num_records()
            reader.close()
            return count

        ends = list(itertools.accumulate(num_records(file) for file in self.files))
        index = next((i for i in indices if not self._readable(i)), indices[0])
        file = next(f for f, end in zip(self.files, ends, strict=True) if index < end)
        folder = os.path.dirname(file)
        return ShardReadError(
            f"Shard {file} does not read ({str(error).splitlines()[0]}): the file is damaged. "
            f"Delete it and run the conversion that wrote {folder} again with its source and "
            f"options (`python scripts/convert_to_array_record.py --folder=ROOT --output={folder}"
            "`, or --imagenet_dir/--tfds): it keeps the good shards and rewrites only the "
            "missing one."
        )

    def _readable(self, index: int) -> bool:
        try:
            self._source[index]
        except RuntimeError:
            return False
        return True

    def decode_into(self, out: np.ndarray, indices: np.ndarray, box_fns) -> np.ndarray:
        """Decodes records `indices`, cropped by `box_fns`, into out [n, S, S, 3]; the labels."""
        labels = np.empty(len(indices), np.int32)
        for k, (record, box_fn) in enumerate(
            zip(self._read(indices.tolist()), box_fns, strict=True)
        ):
            labels[k] = self._decode_one(out, k, record, int(indices[k]), box_fn)
        return labels

    def _decode_one(self, out, k: int, record: bytes, index: int, box_fn) -> int:
        for attempt in range(_MAX_REPLACEMENTS):
            label, name, image = decode_record(record)
            try:
                out[k] = self.decoder.decode_crop(image, box_fn, out.shape[1])
                return label
            except decode.DecodeError as error:
                replacement = (index + attempt + 1) % self.num_examples
                logging.warning(
                    "Record %d (%s) does not decode (%s); using record %d in its place.",
                    (index + attempt) % self.num_examples,
                    name,
                    error,
                    replacement,
                )
                (record,) = self._read([replacement])
        raise decode.DecodeError(f"{_MAX_REPLACEMENTS} consecutive records do not decode.")


class ArrayRecordSource:
    """A shard set (module docstring) as a `lambdanet.data.Dataset`."""

    def __init__(self, config, batch: batching.Batching):
        if config.workers is not None and (
            not isinstance(config.workers, int) or config.workers < 0
        ):
            raise ValueError(
                f"config.dataset.workers={config.workers!r}: use a count >= 0 (0 decodes in the "
                "training process) or leave it unset for one per core less one."
            )
        decoder = decode.Decoder(config.decoder, config.fast_dct)  # checks the name first
        manifest = read_manifest(config.path)
        self.config, self.batching = config, batch
        self.class_names = tuple(manifest["class_names"])
        self.num_classes = len(self.class_names)
        self.image_size = config.image_size
        # augment imports JAX: not at module level, which the Grain workers load.
        from lambdanet.data import augment

        self.device_preprocess = augment.from_config(config, self.num_classes, crop_on_device=False)
        train = split_files(config.path, manifest, config.train_split)
        evaluation = split_files(config.path, manifest, config.eval_split)
        self.train = _Examples(train[0], _limit(train[1], config.max_train_examples), decoder)
        self.evaluation = _Examples(
            evaluation[0], _limit(evaluation[1], config.max_eval_examples), decoder
        )
        self.num_train_examples = self.train.num_examples
        self.num_eval_examples = self.evaluation.num_examples
        self.num_eval_batches = batch.num_eval_batches(self.num_eval_examples)
        self.workers = (
            max(1, (os.cpu_count() or 2) - 1) if config.workers is None else config.workers
        )
        # What the Grain workers run (small picklable objects: no config, no JAX).
        images = _Images(config.image_size, shared_memory=self.workers > 0)
        self.train_batch = _TrainBatches(
            self.train,
            batch,
            images,
            tuple(config.train_crop_area),
            tuple(config.train_crop_aspect_ratio),
        )
        self.eval_batch = _EvalBatches(self.evaluation, batch, images, config.eval_crop_fraction)
        # Batches the workers make ahead at most (a benchmark takes them before timing).
        self.buffered_batches = AHEAD_PER_WORKER * self.workers

    def _iterate(self, dataset) -> Iterator[dict[str, np.ndarray]]:
        import grain
        from absl import flags

        if not self.workers:
            yield from dataset
            return
        if not flags.FLAGS.is_parsed():  # Grain reads its absl flags; outside an absl app
            flags.FLAGS.mark_as_parsed()  # (tests, notebooks) their defaults hold
        # Each worker process decodes one batch at a time, AHEAD_PER_WORKER ahead at most:
        # Grain's default ReadOptions (16 threads, 500 elements prefetched per worker) would run
        # 16 x workers decoders on the host's cores and make hundreds of batches ahead.
        read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=0)
        options = grain.MultiprocessingOptions(num_workers=self.workers, per_worker_buffer_size=1)
        iterator = iter(dataset.to_iter_dataset(read).mp_prefetch(options))
        atexit.register(iterator.close)  # stops the workers and frees their shared memory
        try:
            yield from iterator
        finally:
            atexit.unregister(iterator.close)
            iterator.close()

    def train_iter(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        import grain

        return self._iterate(grain.MapDataset.range(start_step, _ENDLESS).map(self.train_batch))

    def eval_iter(self) -> Iterator[dict[str, np.ndarray]]:
        import grain

        start, stop = self.batching.eval_shard(self.num_eval_examples)
        num_batches = -(-(stop - start) // self.batching.local_eval_batch_size)
        batches = self._iterate(grain.MapDataset.range(num_batches).map(self.eval_batch))
        yield from batching.padded_eval_batches(
            batches,
            self.batching.local_eval_batch_size,
            self.num_eval_batches,
            (self.image_size, self.image_size, 3),
        )


@dataclasses.dataclass(frozen=True)
class _Images:
    """new(n) -> an empty uint8 batch [n, size, size, 3] for the decoders to write into.

    In Grain's worker processes the batch is allocated in shared memory, which Grain hands to
    the training process as it is: a batch made in ordinary memory would be copied there, a
    copy (with the page faults of a fresh allocation) that costs a sizeable part of a worker's
    decoding time (results/input_pipeline.md).
    """

    size: int
    shared_memory: bool

    def new(self, n: int) -> np.ndarray:
        shape = (n, self.size, self.size, 3)
        if self.shared_memory:
            from grain.python import SharedMemoryArray

            return SharedMemoryArray(shape, np.uint8)
        return np.empty(shape, np.uint8)


@dataclasses.dataclass(frozen=True)
class _TrainBatches:
    """step -> this process's part of global train batch `step`: uint8 images, int32 labels."""

    examples: _Examples
    batching: batching.Batching
    images: _Images
    area_range: tuple[float, float]
    aspect_ratio_range: tuple[float, float]

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        indices, box_fns = self.select(step)
        images = self.images.new(len(indices))
        labels = self.examples.decode_into(images, indices, box_fns)
        return {"image": images, "label": labels}

    def select(self, step: int) -> tuple[np.ndarray, list[crop.BoxFn]]:
        """The records of batch `step` (train-set indices, int64 [B]) and their crops' BoxFns."""
        positions = self.batching.train_positions(step)
        indices = batching.stream_indices(positions, self.batching.seed, self.examples.num_examples)
        box_fns = [
            crop.inception_box_fn(
                (self.batching.seed, 1, int(position)), self.area_range, self.aspect_ratio_range
            )
            for position in positions
        ]
        return indices, box_fns


@dataclasses.dataclass(frozen=True)
class _EvalBatches:
    """index -> eval batch `index` of this process's shard, unpadded (the last may be short)."""

    examples: _Examples
    batching: batching.Batching
    images: _Images
    crop_fraction: float

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        indices, box_fns = self.select(index)
        images = self.images.new(len(indices))
        labels = self.examples.decode_into(images, indices, box_fns)
        return {"image": images, "label": labels}

    def select(self, index: int) -> tuple[np.ndarray, list[crop.BoxFn]]:
        """The records of eval batch `index` (eval-set indices, int64 [n <= B]) and their
        central crops' BoxFns."""
        start, stop = self.batching.eval_shard(self.examples.num_examples)
        size = self.batching.local_eval_batch_size
        indices = np.arange(start + index * size, min(start + (index + 1) * size, stop))
        return indices, [crop.center_crop_box_fn(self.crop_fraction)] * len(indices)


def _limit(num_examples: int, max_examples: int | None) -> int:
    return num_examples if max_examples is None else min(num_examples, max_examples)
