"""TF-free in-memory datasets: uint8 image arrays on the host, augmentation on the device.

For small datasets (the digits demo, Imagenette) and GPU machines without TensorFlow. Images are
decoded once, at load time, into one uint8 array [N, S, S, 3] per split; a training step's host
work is an index gather, and cropping, flipping and RandAugment run in JAX inside the jitted step
(`augment.Augmentation` with crop_on_device=True).

The array file (`scripts/make_arrays.py` writes it) is an `.npz` holding, per split NAME:
`NAME_labels` int32 [N] and either `NAME_images` uint8 [N, S, S, 3] (raw) or the JPEG bytes of
every image concatenated in `NAME_jpeg` uint8 with `NAME_offsets` int64 [N + 1] (jpeg); and
`class_names` str [num_classes] and `image_size` (S).

`ArraySource` serves them as a `lambdanet.data.Dataset`.
"""

import concurrent.futures
import dataclasses
import io
import itertools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from absl import logging
from PIL import Image

from lambdanet.data import batching, decode

if TYPE_CHECKING:
    from lambdanet.data import augment

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class ImageArrays:
    """One split: images uint8 [N, S, S, 3], labels int32 [N], and how many inputs were skipped."""

    images: np.ndarray
    labels: np.ndarray
    num_skipped: int = 0

    def take(self, max_examples: int | None) -> "ImageArrays":
        if max_examples is None:
            return self
        return dataclasses.replace(
            self, images=self.images[:max_examples], labels=self.labels[:max_examples]
        )


def decode_image(data: bytes, size: int) -> np.ndarray:
    """Image file bytes (any format PIL reads, any mode) -> RGB uint8 [size, size, 3].

    The central square (side = the shorter side) is resized to `size` (bicubic); an image that is
    already size x size is returned pixel for pixel. Raises OSError/ValueError on a bad file.
    """
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (size, size))  # JPEG: decode at a reduced scale that is still >= size.
        image = Image.fromarray(decode.to_rgb(image))  # 16-bit images scaled, not clipped
    width, height = image.size
    if (width, height) != (size, size):
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        image = image.resize((size, size), Image.BICUBIC, box=(left, top, left + side, top + side))
    return np.asarray(image, np.uint8)


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """RGB uint8 [H, W, 3] -> baseline JPEG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def decode_images(
    sources: Sequence[bytes | Path], labels: np.ndarray, size: int, what: str
) -> ImageArrays:
    """Decodes image files (bytes or paths) in threads into ImageArrays at side `size`.

    Files that cannot be read or decoded are skipped and counted, with a warning naming a few;
    a ValueError if none is left.
    """
    images = np.empty((len(sources), size, size, 3), np.uint8)

    def decode_into(index: int) -> bool:
        source = sources[index]
        try:
            data = source if isinstance(source, bytes) else Path(source).read_bytes()
            images[index] = decode_image(data, size)
        except _DECODE_ERRORS:
            return False
        return True

    with concurrent.futures.ThreadPoolExecutor(min(32, os.cpu_count() or 1)) as pool:
        valid = np.fromiter(pool.map(decode_into, range(len(sources))), bool, len(sources))
    num_bad = len(sources) - int(valid.sum())
    if num_bad == len(sources):
        raise ValueError(f"{what}: none of the {len(sources)} images could be decoded.")
    labels = np.asarray(labels, np.int32)
    if not num_bad:
        return ImageArrays(images, labels)
    examples = [
        str(sources[i]) if isinstance(sources[i], Path) else f"#{i}"
        for i in np.flatnonzero(~valid)[:5]
    ]
    logging.warning(
        "%s: skipped %d of %d images that could not be decoded (corrupt, truncated or not an "
        "image), e.g. %s",
        what,
        num_bad,
        len(sources),
        examples,
    )
    return ImageArrays(images[valid], labels[valid], num_bad)


def list_image_folder(
    root: str | Path, split: str, max_per_class: int | None = None
) -> tuple[list[Path], np.ndarray, list[str]]:
    """Files and labels of `root/split/<class>/*`, class indices as TFDS `ImageFolder` gives them.

    Classes are the sorted union of the class folders of every split folder under root, so the
    labels agree with the TF `image_folder` path. With max_per_class, the first files (by name)
    of each class. Returns (paths, labels int32, class_names).
    """
    root = Path(root)
    if not (root / split).is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else None
        raise ValueError(
            f"Image folder split {str(root / split)!r} does not exist (found splits: {found}). "
            f"Expected a tree {root}/<split>/<class>/<image>.jpg, e.g. {root}/train/<class>/ and "
            f"{root}/val/<class>/; set the dataset's path and train_split/eval_split to match."
        )
    class_names = sorted({c.name for s in _subfolders(root) for c in _subfolders(s)})
    paths, labels = [], []
    for label, class_dir in enumerate(root / split / name for name in class_names):
        files = sorted(p for p in class_dir.glob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        files = files[:max_per_class]
        if not files:
            logging.warning("Class folder %s has no images (%s).", class_dir, IMAGE_EXTENSIONS)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise ValueError(
            f"Image folder {root / split} holds no images with the extensions "
            f"{IMAGE_EXTENSIONS} in its class folders."
        )
    return paths, np.asarray(labels, np.int32), class_names


def _subfolders(path: Path) -> list[Path]:
    return [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]


def load_image_folder(
    root: str | Path, splits: Sequence[str], size: int, max_per_class: int | None = None
) -> tuple[dict[str, ImageArrays], list[str]]:
    """Decodes `root/<split>/<class>/*` for each split into ImageArrays at side `size`."""
    arrays, class_names = {}, []
    for split in splits:
        paths, labels, class_names = list_image_folder(root, split, max_per_class)
        arrays[split] = decode_images(paths, labels, size, f"{root}/{split}")
    return arrays, class_names


def save_npz(
    path: str | Path,
    arrays: dict[str, ImageArrays],
    class_names: Sequence[str],
    image_format: str = "jpeg",
    quality: int = 90,
) -> None:
    """Writes splits to an array file (module docstring); image_format is 'jpeg' or 'raw'."""
    if image_format not in ("jpeg", "raw"):
        raise ValueError(f"image_format={image_format!r}: use 'jpeg' or 'raw'.")
    sizes = {data.images.shape[1] for data in arrays.values()}
    if len(sizes) != 1:
        raise ValueError(f"All splits must share one image size, got {sorted(sizes)}.")
    contents = {"class_names": np.asarray(class_names, str), "image_size": np.asarray(sizes.pop())}
    for split, data in arrays.items():
        contents[f"{split}_labels"] = data.labels.astype(np.int32)
        if image_format == "raw":
            contents[f"{split}_images"] = data.images
        else:
            encoded = [encode_jpeg(image, quality) for image in data.images]
            contents[f"{split}_jpeg"] = np.frombuffer(b"".join(encoded), np.uint8)
            contents[f"{split}_offsets"] = np.cumsum(
                [0] + [len(e) for e in encoded], dtype=np.int64
            )
    np.savez(path, **contents)


def load_npz(path: str | Path, splits: Sequence[str]) -> tuple[dict[str, ImageArrays], list[str]]:
    """Reads splits from an array file; JPEG images are decoded once, here, at their stored size.

    Undecodable images and labels outside [0, num_classes) are skipped and counted with a warning.
    """
    with np.load(path) as contents:
        class_names = [str(name) for name in contents["class_names"]]
        arrays = {
            split: _load_npz_split(contents, split, path, len(class_names)) for split in splits
        }
    return arrays, class_names


def _load_npz_split(contents, split: str, path, num_classes: int) -> ImageArrays:
    if f"{split}_labels" not in contents:
        available = sorted(k[: -len("_labels")] for k in contents.files if k.endswith("_labels"))
        raise ValueError(
            f"Split {split!r} is not in {path} (it holds {available}); set the "
            "dataset's train_split/eval_split to one of those."
        )
    labels = contents[f"{split}_labels"]
    if f"{split}_images" in contents:
        data = ImageArrays(contents[f"{split}_images"], labels.astype(np.int32))
    else:
        jpeg, offsets = contents[f"{split}_jpeg"], contents[f"{split}_offsets"]
        encoded = [jpeg[start:stop].tobytes() for start, stop in itertools.pairwise(offsets)]
        data = decode_images(encoded, labels, int(contents["image_size"]), f"{path}:{split}")
    in_range = (data.labels >= 0) & (data.labels < num_classes)
    if in_range.all():
        return data
    logging.warning(
        "%s:%s: skipped %d examples with labels outside [0, %d).",
        path,
        split,
        int((~in_range).sum()),
        num_classes,
    )
    if not in_range.any():
        raise ValueError(f"{path}:{split}: no label lies in [0, {num_classes}).")
    return ImageArrays(
        data.images[in_range], data.labels[in_range], data.num_skipped + int((~in_range).sum())
    )


def load_arrays(
    path: str | Path, splits: Sequence[str], size: int
) -> tuple[dict[str, ImageArrays], list[str]]:
    """An array file (.npz) or an image folder tree (decoded at side `size`) -> (splits, names)."""
    path = Path(path)
    if path.suffix == ".npz" and path.is_file():
        return load_npz(path, splits)
    if path.is_dir():
        return load_image_folder(path, splits, size)
    raise ValueError(
        f"In-memory dataset path {str(path)!r} is neither an .npz array file nor a folder. Write "
        "one with `python scripts/make_arrays.py --folder=ROOT --output=FILE.npz` or point path "
        "at a tree ROOT/<split>/<class>/<image>.jpg."
    )


class ArraySource:
    """In-memory arrays as a `Dataset`: train batches by index gather from the stream of
    `batching.py`, eval batches from contiguous per-process shards; crops on the device."""

    def __init__(
        self,
        train: ImageArrays,
        evaluation: ImageArrays,
        class_names: Sequence[str],
        batch: batching.Batching,
        augmentation: "augment.Augmentation",
    ):
        self.train, self.evaluation, self.batching = train, evaluation, batch
        self.class_names = tuple(class_names)
        self.num_classes = len(self.class_names)
        self.num_train_examples, self.num_eval_examples = len(train.labels), len(evaluation.labels)
        self.num_eval_batches = batch.num_eval_batches(self.num_eval_examples)
        self.image_size = augmentation.image_size
        self.device_preprocess = augmentation

    def train_iter(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        for step in itertools.count(start_step):
            indices = self.batching.train_indices(step, self.num_train_examples)
            yield {"image": self.train.images[indices], "label": self.train.labels[indices]}

    def eval_iter(self) -> Iterator[dict[str, np.ndarray]]:
        start, stop = self.batching.eval_shard(self.num_eval_examples)
        size = self.batching.local_eval_batch_size
        batches = (
            {
                "image": self.evaluation.images[i : min(i + size, stop)],
                "label": self.evaluation.labels[i : min(i + size, stop)],
            }
            for i in range(start, stop, size)
        )
        yield from batching.padded_eval_batches(
            batches, size, self.num_eval_batches, self.evaluation.images.shape[1:]
        )
