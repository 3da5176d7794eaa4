r"""Writes an ArrayRecord shard set for `config.dataset.name='array_record'` (no TensorFlow needed).

Sources (one of):
  --imagenet_dir=DIR  ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar and a validation label file
                      (imagenet2012_validation_labels.txt or LOC_val_solution.csv) in DIR; read in
                      place, splits 'train' and 'validation', labels in sorted-wnid order.
  --folder=ROOT       ROOT/<split>/<class>/<image>; --splits names the split folders.
  --tfds=NAME         a prepared TFDS dataset (needs TensorFlow); --splits names its splits.

ImageNet, once (about 1,250 shards; a killed conversion resumes where it stopped):
  python scripts/convert_to_array_record.py --imagenet_dir=DIR --output=SHARDS
  python scripts/convert_to_array_record.py --imagenet_dir=DIR --output=SHARDS_320 --max_side=320
Every image is checked by decoding it; CMYK, PNG and other non-RGB-JPEG files are re-encoded,
corrupt, truncated and empty ones skipped; one summary line per split counts both
(`lambdanet/data/convert.py`). The format is in `lambdanet/data/array_record.py`.
"""

import functools

from absl import app, flags, logging

from lambdanet.data import convert

_IMAGENET_DIR = flags.DEFINE_string("imagenet_dir", None, "Folder with the ImageNet tars.")
_FOLDER = flags.DEFINE_string("folder", None, "Image folder tree ROOT/<split>/<class>/<image>.")
_TFDS = flags.DEFINE_string("tfds", None, "A prepared TFDS dataset's name.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data dir (--tfds).")
_SPLITS = flags.DEFINE_list(
    "splits", None, "Splits to write (default: train,validation for --imagenet_dir, else train,val)"
)
_OUTPUT = flags.DEFINE_string(
    "output", None, "The folder to write the shard set to.", required=True
)
_MAX_SIDE = flags.DEFINE_integer(
    "max_side", None, "Resize images whose shorter side exceeds this (re-encoded at --quality)."
)
_QUALITY = flags.DEFINE_integer("quality", 90, "JPEG quality of re-encoded or resized images.")
_EXAMPLES_PER_SHARD = flags.DEFINE_integer("examples_per_shard", 1024, "Examples per shard file.")
_PROCESSES = flags.DEFINE_integer("processes", None, "Worker processes (default: one per core).")


def main(argv):
    del argv
    sources = [f for f in (_IMAGENET_DIR, _FOLDER, _TFDS) if f.value]
    if len(sources) != 1:
        raise app.UsageError("Give exactly one of --imagenet_dir, --folder and --tfds.")
    if _IMAGENET_DIR.value:
        list_examples = functools.partial(convert.imagenet_tar_examples, _IMAGENET_DIR.value)
        splits = _SPLITS.value or ["train", "validation"]
    elif _FOLDER.value:
        list_examples = functools.partial(convert.folder_examples, _FOLDER.value)
        splits = _SPLITS.value or ["train", "val"]
    else:
        list_examples = functools.partial(
            convert.tfds_examples, _TFDS.value, data_dir=_DATA_DIR.value
        )
        splits = _SPLITS.value or ["train", "validation"]
    manifest = convert.convert(
        list_examples,
        {split: split for split in splits},
        _OUTPUT.value,
        examples_per_shard=_EXAMPLES_PER_SHARD.value,
        max_side=_MAX_SIDE.value,
        quality=_QUALITY.value,
        processes=_PROCESSES.value,
    )
    counts = {split: entry["num_examples"] for split, entry in manifest["splits"].items()}
    num_classes = len(manifest["class_names"])
    logging.info("Wrote %s: %s examples, %d classes.", _OUTPUT.value, counts, num_classes)
    print(f"Train with: --config.dataset.name=array_record --config.dataset.path={_OUTPUT.value}")


if __name__ == "__main__":
    app.run(main)
