"""Writes the array file of the TF-free in-memory input path (`name='in_memory'`): `make_arrays`.

The source is an image folder tree ROOT/<split>/<class>/<image> or a TFDS split. Every image is
decoded once (corrupt, truncated or unreadable files are counted and skipped with a warning),
converted to RGB, its central square resized to `size`, and stored as JPEG bytes
(`image_format="jpeg"`, `quality`; the loader decodes them once, into memory) or as raw uint8
pixels (`"raw"`), in the .npz layout `lambdanet.data.in_memory` documents and reads. The command
line is scripts/make_arrays.py.
"""

import os
from collections.abc import Sequence

from absl import logging

from lambdanet.data import in_memory


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
