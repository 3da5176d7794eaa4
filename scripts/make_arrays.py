r"""Writes a compact array file (.npz) for the TF-free in-memory input path (`name='in_memory'`).

The source is an image folder tree ROOT/<split>/<class>/<image> or a TFDS split. Every image is
decoded once (corrupt, truncated or unreadable files are counted and skipped with a warning),
converted to RGB, its central square resized to --size, and stored as JPEG bytes (--format=jpeg,
--quality; the loader decodes them once, into memory) or as raw uint8 pixels (--format=raw).
The file layout is in `lambdanet/data/in_memory.py`.

Imagenette at 128 px for the GPU (44 MiB: about 5.4 KB an image at quality 85):
  python scripts/make_arrays.py --folder=IMAGENETTE_DIR --splits=train,val \
      --size=128 --quality=85 --output=artifacts/imagenette_128.npz
A TFDS split (TensorFlow is needed for this one only):
  python scripts/make_arrays.py --tfds=imagenette/160px --splits=train,validation \
      --size=128 --output=artifacts/imagenette_tfds_128.npz
"""

import os
from collections.abc import Sequence

from absl import app, flags, logging

from lambdanet.data import in_memory

_FOLDER = flags.DEFINE_string("folder", None, "Image folder tree ROOT/<split>/<class>/<image>.")
_TFDS = flags.DEFINE_string("tfds", None, "TFDS dataset name (instead of --folder).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "TFDS manual dir (imagenet2012 tars).")
_SPLITS = flags.DEFINE_list("splits", ["train", "val"], "Splits to write.")
_SIZE = flags.DEFINE_integer("size", 128, "Side of the stored square images, in pixels.")
_FORMAT = flags.DEFINE_enum("format", "jpeg", ["jpeg", "raw"], "How images are stored.")
_QUALITY = flags.DEFINE_integer("quality", 90, "JPEG quality (--format=jpeg).")
_MAX_PER_CLASS = flags.DEFINE_integer(
    "max_per_class", None, "Keep the first N files per class (--folder only; for small test files)."
)
_MAX_EXAMPLES = flags.DEFINE_integer(
    "max_examples", None, "Keep the first N examples per split (--tfds only)."
)
_OUTPUT = flags.DEFINE_string("output", None, "The .npz file to write.", required=True)


def tfds_arrays(
    name: str,
    splits: Sequence[str],
    size: int,
    *,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    max_examples: int | None = None,
) -> tuple[dict[str, in_memory.ImageArrays], list[str]]:
    """Decodes TFDS splits into ImageArrays at side `size` (through the tf.data input pipeline)."""
    from lambdanet.data import default_dataset_config, input_pipeline

    config = default_dataset_config()
    config.update(dict(name=name, data_dir=data_dir, manual_dir=manual_dir))
    arrays, class_names = {}, []
    for split in splits:
        encoded, labels, class_names = input_pipeline.encoded_examples(config, split, max_examples)
        arrays[split] = in_memory.decode_images(encoded, labels, size, f"{name}:{split}")
    return arrays, class_names


def make_arrays(
    output: str,
    *,
    splits: Sequence[str],
    size: int,
    folder: str | None = None,
    tfds_name: str | None = None,
    image_format: str = "jpeg",
    quality: int = 90,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    max_per_class: int | None = None,
    max_examples: int | None = None,
) -> dict[str, in_memory.ImageArrays]:
    """Reads `folder` or `tfds_name` and writes `output`; returns the splits written."""
    if (folder is None) == (tfds_name is None):
        raise ValueError("Give exactly one source: --folder=ROOT or --tfds=NAME.")
    if not output.endswith(".npz"):
        raise ValueError(f"--output={output!r} must end in .npz.")
    if folder is not None:
        arrays, class_names = in_memory.load_image_folder(folder, splits, size, max_per_class)
    else:
        arrays, class_names = tfds_arrays(
            tfds_name,
            splits,
            size,
            data_dir=data_dir,
            manual_dir=manual_dir,
            max_examples=max_examples,
        )
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    in_memory.save_npz(output, arrays, class_names, image_format, quality)
    for split, data in arrays.items():
        logging.info("%s: %d images, %d skipped", split, len(data.labels), data.num_skipped)
    logging.info(
        "Wrote %s (%.1f MiB, %d classes, %s, %d px).",
        output,
        os.path.getsize(output) / 2**20,
        len(class_names),
        image_format,
        size,
    )
    return arrays


def main(argv: Sequence[str]) -> None:
    del argv
    make_arrays(
        _OUTPUT.value,
        splits=_SPLITS.value,
        size=_SIZE.value,
        folder=_FOLDER.value,
        tfds_name=_TFDS.value,
        image_format=_FORMAT.value,
        quality=_QUALITY.value,
        data_dir=_DATA_DIR.value,
        manual_dir=_MANUAL_DIR.value,
        max_per_class=_MAX_PER_CLASS.value,
        max_examples=_MAX_EXAMPLES.value,
    )


if __name__ == "__main__":
    app.run(main)
