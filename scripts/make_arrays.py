r"""Writes a compact array file (.npz) for the TF-free in-memory input path (`name='in_memory'`).

The source is an image folder tree ROOT/<split>/<class>/<image> (--folder) or a TFDS split
(--tfds); every image is decoded once, its central square resized to --size and stored as JPEG
(--quality) or raw pixels (`lambdanet.data.arrays_writer`; the layout is in
`lambdanet/data/in_memory.py`).

Imagenette at 128 px for the GPU (44 MiB: about 5.4 KB an image at quality 85):
  python scripts/make_arrays.py --folder=IMAGENETTE_DIR --splits=train,val \
      --size=128 --quality=85 --output=artifacts/imagenette_128.npz
A TFDS split (TensorFlow is needed for this one only):
  python scripts/make_arrays.py --tfds=imagenette/160px --splits=train,validation \
      --size=128 --output=artifacts/imagenette_tfds_128.npz
"""

from collections.abc import Sequence

from absl import app, flags

from lambdanet.data import arrays_writer

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


def main(argv: Sequence[str]) -> None:
    del argv
    arrays_writer.make_arrays(
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
