"""Writes ArrayRecord shard sets (`array_record.py`) from image folders, the ImageNet tars or TFDS.

Sources, each giving (name, label, bytes) examples per split and the class names:
* `folder_examples(ROOT, split)`: `ROOT/<split>/<class>/*`; classes are the sorted class folders
  of all splits (for ImageNet folders named by wnid, the standard sorted-wnid order).
* `imagenet_tar_examples(DIR, split)`: `ILSVRC2012_img_train.tar` (one tar per wnid inside) and
  `ILSVRC2012_img_val.tar` with a validation label file (`VAL_LABEL_FILES`): labels are the
  positions of the wnids in sorted order, as TFDS `imagenet2012` and timm number them. The tars
  are read in place (each example is a byte range of the outer tar), never extracted.
* `tfds_examples(NAME, split)`: a prepared TFDS dataset, where TensorFlow is installed.

Every image is checked by decoding it (`prepare_image`): an RGB or greyscale JPEG is stored byte
for byte; a CMYK JPEG, a PNG or any other format Pillow reads (16-bit images scaled, not clipped)
is re-encoded as an RGB JPEG (quality `quality`); an empty, truncated or corrupt file is skipped.
Both are counted per reason, with the first few file names, in the manifest and one summary line
per split. With `max_side=S`, images whose shorter side exceeds S are resized to shorter side S
(antialiased) and re-encoded, which makes decoding cheaper (results/input_pipeline.md).

Resumable: shard i of a split holds examples [i n / T, (i + 1) n / T) in the source's order. It is
written to a temporary file, its statistics to `<shard>.json`, then renamed; a rerun keeps every
shard whose record count matches its statistics and writes the rest. The manifest is written
last, once every split's record count equals its examples less the skipped ones.
"""

import collections
import concurrent.futures
import dataclasses
import io
import json
import os
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from absl import logging
from PIL import Image

from lambdanet.data import array_record, decode, in_memory

TRAIN_TAR, VAL_TAR = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"
# TFDS's validation label list (one wnid per line, in file-name order), Kaggle's CSV.
VAL_LABEL_FILES = ("imagenet2012_validation_labels.txt", "LOC_val_solution.csv")
_EXAMPLE_NAMES_KEPT = 5


@dataclasses.dataclass(frozen=True)
class Example:
    """Where one example's bytes are: a file (offset None) or `size` bytes at `offset` in it."""

    name: str
    label: int
    path: str
    offset: int | None = None
    size: int | None = None

    def read(self) -> bytes:
        if self.offset is None:
            return Path(self.path).read_bytes()
        with open(self.path, "rb") as file:
            file.seek(self.offset)
            return file.read(self.size)


def folder_examples(root: str, split: str) -> tuple[list[Example], list[str]]:
    paths, labels, class_names = in_memory.list_image_folder(root, split)
    examples = [
        Example(str(p.relative_to(root)), int(label), str(p))
        for p, label in zip(paths, labels, strict=True)
    ]
    return examples, class_names


def _members(path: str | None, fileobj=None) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of the regular files of an uncompressed tar."""
    with tarfile.open(path, "r:", fileobj=fileobj) as tar:
        return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]


def _read_val_labels(directory: Path, names: Sequence[str]) -> list[str]:
    """The wnid of each validation file name, from the first label file of VAL_LABEL_FILES found."""
    for label_file in VAL_LABEL_FILES:
        path = directory / label_file
        if not path.is_file():
            continue
        if label_file.endswith(".txt"):  # one wnid per line, files in sorted order
            wnids = path.read_text().split()
            if len(wnids) != len(names):
                raise ValueError(f"{path} has {len(wnids)} labels for {len(names)} images.")
            return [wnids[i] for i in np.argsort(np.argsort(names))]
        by_id = {}
        for line in path.read_text().splitlines()[1:]:  # ImageId,PredictionString
            image_id, prediction = line.split(",", 1)
            by_id[image_id] = prediction.split()[0]
        return [by_id[Path(name).stem] for name in names]
    raise ValueError(
        f"No validation label file in {directory}: put one of {VAL_LABEL_FILES} there "
        "(TFDS's imagenet2012_validation_labels.txt lists one wnid per line in file-name order; "
        "Kaggle's LOC_val_solution.csv maps ImageId to wnids)."
    )


def imagenet_tar_examples(directory: str, split: str) -> tuple[list[Example], list[str]]:
    """Examples of split 'train' or 'validation' from the ImageNet tars in `directory`."""
    directory = Path(directory)
    train_tar = directory / TRAIN_TAR
    if not train_tar.is_file():
        raise ValueError(
            f"{train_tar} is missing: put {TRAIN_TAR} and {VAL_TAR} (https://image-net.org, "
            f"registration required) and a validation label file ({VAL_LABEL_FILES[0]}) in "
            f"{directory}."
        )
    class_tars = sorted(_members(str(train_tar)))  # n01440764.tar, ...
    class_names = [Path(name).stem for name, _, _ in class_tars]
    label_of = {wnid: i for i, wnid in enumerate(class_names)}
    if split == "train":
        examples = []
        for (_, offset, size), wnid in zip(class_tars, class_names, strict=True):
            with _Window(train_tar, offset, size) as window:
                members = _members(None, window)
            examples += [
                Example(f"{wnid}/{name}", label_of[wnid], str(train_tar), offset + start, n)
                for name, start, n in sorted(members)
            ]
        return examples, class_names
    if split in ("validation", "val"):
        val_tar = directory / VAL_TAR
        if not val_tar.is_file():
            raise ValueError(f"{val_tar} is missing; put {VAL_TAR} in {directory}.")
        members = sorted(_members(str(val_tar)))
        wnids = _read_val_labels(directory, [name for name, _, _ in members])
        unknown = sorted(set(wnids) - set(label_of))
        if unknown:
            raise ValueError(f"Validation labels name wnids not in {TRAIN_TAR}: {unknown[:5]}")
        examples = [
            Example(name, label_of[wnid], str(val_tar), offset, size)
            for (name, offset, size), wnid in zip(members, wnids, strict=True)
        ]
        return examples, class_names
    raise ValueError(f"The ImageNet tars hold splits 'train' and 'validation', not {split!r}.")


class _Window(io.RawIOBase):
    """A read-only, seekable view of `size` bytes at `offset` of a file (a tar inside a tar)."""

    def __init__(self, path, offset: int, size: int):
        self._file, self._offset, self._size, self._pos = open(path, "rb"), offset, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=0):
        self._pos = {0: pos, 1: self._pos + pos, 2: self._size + pos}[whence]
        return self._pos

    def tell(self):
        return self._pos

    def readinto(self, buffer):
        n = max(0, min(len(buffer), self._size - self._pos))
        self._file.seek(self._offset + self._pos)
        data = self._file.read(n)
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self):
        self._file.close()
        super().close()


def tfds_examples(name: str, split: str, data_dir: str | None = None):
    """(examples, class names) of a prepared TFDS image classification dataset (needs TF).

    The examples are read in the shard-writing processes, a shard's range at a time."""
    from lambdanet.data import input_pipeline

    builder = input_pipeline.get_builder(_TfdsConfig(name, data_dir))
    _, label_key = input_pipeline._supervised_keys(builder)
    input_pipeline._check_split(builder, split)
    try:
        num_examples = builder.info.splits[split].num_examples
    except KeyError:  # no split metadata (TFDS's mock data): count the records
        num_examples = input_pipeline.count(input_pipeline.read_split(builder, split, None, 0, 1))
    examples = _TfdsRange(name, data_dir, split, 0, num_examples)
    return examples, list(builder.info.features[label_key].names)


@dataclasses.dataclass(frozen=True)
class _TfdsConfig:
    name: str
    data_dir: str | None
    manual_dir: str | None = None
    path: str | None = None


@dataclasses.dataclass(frozen=True)
class _InMemoryExample:
    name: str
    label: int
    data: bytes

    def read(self) -> bytes:
        return self.data


@dataclasses.dataclass(frozen=True)
class _TfdsRange:
    """Examples [start, stop) of a TFDS split; slicing gives a sub-range, iterating reads it."""

    name: str
    data_dir: str | None
    split: str
    start: int
    stop: int

    def __len__(self):
        return self.stop - self.start

    def __getitem__(self, part: slice) -> "_TfdsRange":
        start, stop, _ = part.indices(len(self))
        return dataclasses.replace(self, start=self.start + start, stop=self.start + stop)

    def __iter__(self):
        from lambdanet.data import input_pipeline

        builder = input_pipeline.get_builder(_TfdsConfig(self.name, self.data_dir))
        subsplit = f"{self.split}[{self.start}:{self.stop}]"
        records = input_pipeline.read_split(builder, subsplit, None, 0, 1).as_numpy_iterator()
        for i, (data, label) in enumerate(records, self.start):
            yield _InMemoryExample(f"{self.split}/{i}", int(label), data)


def prepare_image(data: bytes, max_side: int | None, quality: int) -> tuple[bytes | None, str]:
    """(bytes to store or None, what was done): 'kept', 'resized', 're-encoded <kind>' or
    'skipped <reason>' (empty, corrupt or truncated)."""
    import simplejpeg

    if not data:
        return None, "skipped empty file"
    rgb, done = None, None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace in ("YCbCr", "Gray"):
            rgb = simplejpeg.decode_jpeg(data, "RGB", strict=True)  # the whole file decodes
            if max_side is None or min(height, width) <= max_side:
                return data, "kept"
            done = "resized"
        else:
            done = f"re-encoded {colorspace} JPEG"
    except ValueError:
        pass
    if rgb is None:  # not a JPEG libjpeg-turbo decodes cleanly to RGB: Pillow's turn
        try:
            rgb = decode.pillow_decode(data)
        except decode.DecodeError:
            return None, "skipped corrupt or truncated file"
    if done is None:
        with Image.open(io.BytesIO(data)) as header:
            done = f"re-encoded {header.format} {header.mode}"
    image = Image.fromarray(rgb)
    if max_side is not None and min(image.size) > max_side:
        scale = max_side / min(image.size)
        image = image.resize(
            (max(1, round(image.width * scale)), max(1, round(image.height * scale))),
            Image.LANCZOS,
            reducing_gap=3.0,
        )
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue(), done


def _write_shard(task: dict) -> dict:
    """Writes one shard (a worker process's task) and returns its statistics."""
    from array_record.python import array_record_module

    final = Path(task["path"])
    temporary = final.with_name(final.name + ".tmp")
    writer = array_record_module.ArrayRecordWriter(str(temporary), "group_size:1,uncompressed")
    counts, names = collections.Counter(), collections.defaultdict(list)
    for example in task["examples"]:
        try:
            data = example.read()
        except OSError as error:
            data, what = None, f"skipped unreadable file ({error.strerror})"
        else:
            data, what = prepare_image(data, task["max_side"], task["quality"])
        counts[what] += 1
        if what != "kept" and len(names[what]) < _EXAMPLE_NAMES_KEPT:
            names[what].append(example.name)
        if data is not None:
            writer.write(array_record.encode_record(example.label, example.name, data))
    writer.close()
    written = sum(n for what, n in counts.items() if not what.startswith("skipped"))
    stats = dict(
        file=final.name,
        num_examples=written,
        num_sources=len(task["examples"]),
        settings=task["settings"],
        counts=dict(counts),
        names=dict(names),
    )
    final.with_name(final.name + ".json").write_text(json.dumps(stats))
    os.replace(temporary, final)
    return stats


def _finished_shard(path: Path, num_sources: int, settings: dict) -> dict | None:
    """A shard's statistics if it was completely written with these settings, else None."""
    from array_record.python import array_record_module

    stats_path = path.with_name(path.name + ".json")
    if not (path.is_file() and stats_path.is_file()):
        return None
    stats = json.loads(stats_path.read_text())
    if stats["settings"] != settings or stats["num_sources"] != num_sources:
        raise ValueError(
            f"{path} was written from other sources or settings ({stats['settings']}, "
            f"{stats['num_sources']} sources) than this conversion ({settings}, {num_sources}); "
            "use a new output folder or delete the old one."
        )
    reader = array_record_module.ArrayRecordReader(str(path))
    complete = reader.num_records() == stats["num_examples"]
    reader.close()
    return stats if complete else None


def write_split(
    examples: Sequence,
    output: str,
    split: str,
    num_shards: int,
    max_side: int | None = None,
    quality: int = 90,
    processes: int | None = None,
) -> dict:
    """Writes (or completes) the shards of one split; its manifest entry."""
    if not examples:
        raise ValueError(f"Split {split!r} has no examples.")
    num_shards = max(1, min(num_shards, len(examples)))
    settings = dict(max_side=max_side, quality=quality)
    tasks, done = [], []
    for i in range(num_shards):
        part = examples[i * len(examples) // num_shards : (i + 1) * len(examples) // num_shards]
        path = Path(output) / array_record.shard_name(split, i, num_shards)
        stats = _finished_shard(path, len(part), settings)
        if stats is not None:
            done.append(stats)
        else:
            tasks.append(dict(path=str(path), examples=part, settings=settings) | settings)
    if done:
        logging.info("%s: %d of %d shards already written; resuming.", split, len(done), num_shards)
    processes = processes or os.cpu_count() or 1
    if tasks and processes > 1:
        with concurrent.futures.ProcessPoolExecutor(min(processes, len(tasks))) as pool:
            done += list(pool.map(_write_shard, tasks))
    else:
        done += [_write_shard(task) for task in tasks]
    done.sort(key=lambda stats: stats["file"])
    return _split_entry(split, done, len(examples))


def _split_entry(split: str, shards: list[dict], num_sources: int) -> dict:
    counts, names = collections.Counter(), collections.defaultdict(list)
    for stats in shards:
        counts.update(stats["counts"])
        for what, kept in stats["names"].items():
            names[what] += kept[: _EXAMPLE_NAMES_KEPT - len(names[what])]
    num_examples = sum(stats["num_examples"] for stats in shards)
    skipped = sum(n for what, n in counts.items() if what.startswith("skipped"))
    if num_examples + skipped != num_sources:
        raise RuntimeError(
            f"{split}: {num_examples} written + {skipped} skipped != {num_sources} sources."
        )
    details = "; ".join(f"{what}: {counts[what]} (e.g. {', '.join(names[what])})" for what in names)
    logging.info(
        "%s: %d examples in %d shards, %d skipped, %d re-encoded or resized%s",
        split,
        num_examples,
        len(shards),
        skipped,
        sum(n for what, n in counts.items() if what == "resized" or what.startswith("re-encoded")),
        f" ({details})" if details else "",
    )
    return dict(
        num_examples=num_examples,
        shards=[dict(file=s["file"], num_examples=s["num_examples"]) for s in shards],
        skipped=skipped,
        counts=dict(counts),
        names=dict(names),
    )


def convert(
    list_examples: Callable[[str], tuple[Sequence, list[str]]],
    splits: dict[str, str],
    output: str,
    examples_per_shard: int = 1024,
    max_side: int | None = None,
    quality: int = 90,
    processes: int | None = None,
) -> dict:
    """Writes a shard set: `splits` maps each output split name to the source's split name.

    Returns the manifest (also written to OUTPUT/manifest.json, last).
    """
    Path(output).mkdir(parents=True, exist_ok=True)
    manifest_path = Path(output) / array_record.MANIFEST
    manifest_path.unlink(missing_ok=True)
    entries, class_names = {}, None
    for split, source_split in splits.items():
        examples, names = list_examples(source_split)
        if class_names is not None and list(names) != list(class_names):
            raise ValueError(f"Split {split!r} has other classes than the splits before it.")
        class_names = list(names)
        num_shards = -(-len(examples) // examples_per_shard)
        entries[split] = write_split(
            examples, output, split, num_shards, max_side, quality, processes
        )
    manifest = dict(
        format=array_record.FORMAT, class_names=class_names, max_side=max_side, splits=entries
    )
    temporary = manifest_path.with_name(manifest_path.name + ".tmp")
    temporary.write_text(json.dumps(manifest, indent=1))
    os.replace(temporary, manifest_path)
    return manifest
