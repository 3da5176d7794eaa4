"""Tests of the TF-free data path: in-memory batches, exact eval, digits, make_arrays, bad files."""

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lambdanet import data
from lambdanet.data import arrays_writer as make_arrays
from lambdanet.data import augment, batching, in_memory

REPO = Path(__file__).resolve().parents[1]
IMAGENETTE = REPO.parent / "shared" / "data" / "imagenette"


def _id_arrays(num: int) -> in_memory.ImageArrays:
    """Images [num, 2, 2, 3] whose first pixel encodes the example index (R * 256 + G)."""
    images = np.zeros((num, 2, 2, 3), np.uint8)
    images[:, 0, 0, 0], images[:, 0, 0, 1] = np.divmod(np.arange(num), 256)
    return in_memory.ImageArrays(images, (np.arange(num) % 10).astype(np.int32))


def _ids(images: np.ndarray) -> np.ndarray:
    return images[:, 0, 0, 0].astype(int) * 256 + images[:, 0, 0, 1]


def _source(
    num_train=10, num_eval=7, global_batch=6, eval_batch=6, process_index=0, process_count=1, seed=0
):
    batch = batching.Batching(global_batch, eval_batch, seed, process_index, process_count)
    augmentation = augment.Augmentation(image_size=2, num_classes=10, crop_on_device=True)
    return in_memory.ArraySource(
        _id_arrays(num_train),
        _id_arrays(num_eval),
        [str(i) for i in range(10)],
        batch,
        augmentation,
    )


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_resume_gives_the_same_batches_as_an_uninterrupted_run():
    source = _source(num_train=10, global_batch=4, eval_batch=4)
    uninterrupted = _take(source.train_iter(0), 9)
    for start in (1, 2, 5):
        resumed = _take(source.train_iter(start), 9 - start)
        for a, b in zip(uninterrupted[start:], resumed, strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])


def test_each_epoch_is_a_fresh_permutation_of_the_train_set():
    ids = np.concatenate(
        [_ids(b["image"]) for b in _take(_source(num_train=12, global_batch=4).train_iter(), 6)]
    )
    first, second = ids[:12], ids[12:]
    assert sorted(first) == sorted(second) == list(range(12))
    assert not np.array_equal(first, second)
    other_seed = np.concatenate(
        [
            _ids(b["image"])
            for b in _take(_source(num_train=12, global_batch=4, seed=1).train_iter(), 3)
        ]
    )
    assert not np.array_equal(first, other_seed)


def test_processes_split_the_global_batch():
    single = _take(_source(num_train=10, global_batch=6).train_iter(), 4)
    shards = [
        _take(
            _source(num_train=10, global_batch=6, process_index=p, process_count=3).train_iter(), 4
        )
        for p in range(3)
    ]
    for step, batch in enumerate(single):
        together = np.concatenate([shard[step]["image"] for shard in shards])
        np.testing.assert_array_equal(together, batch["image"])


@pytest.mark.parametrize(
    "eval_batch, process_count", [(1, 1), (8, 1), (64, 8), (1000, 4), (2048, 2), (24, 3), (9, 9)]
)
def test_eval_counts_1003_examples_exactly_once(eval_batch, process_count):
    counts, num_batches = np.zeros(1003, int), set()
    for p in range(process_count):
        source = _source(
            num_eval=1003,
            eval_batch=eval_batch,
            process_index=p,
            process_count=process_count,
            global_batch=process_count,
        )
        batches = list(source.eval_iter())
        num_batches.add(len(batches))
        for batch in batches:
            assert batch["image"].shape[0] == batch["label"].shape[0] == eval_batch // process_count
            assert batch["mask"].dtype == bool
            np.add.at(counts, _ids(batch["image"][batch["mask"]]), 1)
            assert not batch["image"][~batch["mask"]].any()
    assert (counts == 1).all()
    assert len(num_batches) == 1  # every process runs the same number of eval steps


def test_batch_size_must_divide_by_process_count():
    with pytest.raises(ValueError, match="multiple of the process count 3"):
        _source(global_batch=8, eval_batch=3, process_count=3)


def test_digits_shapes_classes_and_split():
    config = data.default_dataset_config()
    config.update(dict(name="digits", image_size=32, num_classes=10))
    ds = data.create_dataset(config, global_batch_size=32, eval_batch_size=64, seed=0)
    assert (ds.num_classes, ds.num_train_examples, ds.num_eval_examples) == (10, 1497, 300)
    assert ds.class_names == tuple(str(i) for i in range(10))
    batch = next(ds.train_iter(0))
    assert batch["image"].shape == (32, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].dtype == np.int32
    eval_labels = np.concatenate([b["label"][b["mask"]] for b in ds.eval_iter()])
    assert len(eval_labels) == 300
    assert np.bincount(eval_labels).min() >= 29  # stratified: 30 +- 1 of each digit
    config.num_classes = 1000
    with pytest.raises(ValueError, match="num_classes=1000"):
        data.create_dataset(config, global_batch_size=32, eval_batch_size=64, seed=0)


def _smooth_image(seed: int, size: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)
    base = rng.uniform(40, 200, 3)
    return np.clip(base + 50 * ramp[:, None, None] - 30 * ramp[None, :, None], 0, 255).astype(
        np.uint8
    )


def _write_folder(root: Path, images_per_class: int, random_pixels: bool) -> dict:
    """root/{train,val}/{cat,dog}/*.png; returns {split: [(array, label), ...]} in file order."""
    written = {}
    for split_index, split in enumerate(("train", "val")):
        written[split] = []
        for label, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(images_per_class):
                seed = 100 * split_index + 10 * label + i
                image = (
                    np.random.default_rng(seed).integers(0, 256, (16, 16, 3), np.uint8)
                    if random_pixels
                    else _smooth_image(seed)
                )
                Image.fromarray(image).save(root / split / name / f"{i:03d}.png")
                written[split].append((image, label))
    return written


def test_make_arrays_raw_round_trips_images_and_labels_exactly(tmp_path):
    written = _write_folder(tmp_path / "folder", 3, random_pixels=True)
    output = str(tmp_path / "arrays.npz")
    make_arrays.make_arrays(
        output,
        folder=str(tmp_path / "folder"),
        splits=["train", "val"],
        size=16,
        image_format="raw",
    )
    arrays, class_names = in_memory.load_npz(output, ["train", "val"])
    assert class_names == ["cat", "dog"]
    for split, expected in written.items():
        np.testing.assert_array_equal(arrays[split].images, np.stack([i for i, _ in expected]))
        np.testing.assert_array_equal(arrays[split].labels, [label for _, label in expected])


def test_make_arrays_jpeg_keeps_labels_and_decodable_images(tmp_path):
    written = _write_folder(tmp_path / "folder", 3, random_pixels=False)
    output = str(tmp_path / "arrays.npz")
    make_arrays.make_arrays(
        output,
        folder=str(tmp_path / "folder"),
        splits=["train", "val"],
        size=16,
        image_format="jpeg",
        quality=95,
    )
    arrays, _ = in_memory.load_npz(output, ["train", "val"])
    for split, expected in written.items():
        np.testing.assert_array_equal(arrays[split].labels, [label for _, label in expected])
        original = np.stack([i for i, _ in expected]).astype(float)
        assert arrays[split].images.shape == original.shape
        assert np.abs(arrays[split].images - original).mean() < 3


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_bad_folder(root: Path) -> dict[str, np.ndarray]:
    """train/{good,odd,empty}: 2 good JPEGs, a corrupt and a truncated JPEG; a grey PNG named .jpg
    and a CMYK JPEG; an empty class folder. Returns the expected RGB pixels of the odd files."""
    for name in ("good", "odd", "empty"):
        (root / "train" / name).mkdir(parents=True)
    for i in range(2):
        Image.fromarray(_smooth_image(i)).save(root / "train" / "good" / f"{i}.jpg", quality=95)
    jpeg = _encode(Image.fromarray(_smooth_image(5)), "JPEG")
    (root / "train" / "good" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "train" / "good" / "corrupt.jpg").write_bytes(b"\xff\xd8 not a jpeg" * 10)
    grey = Image.fromarray(_smooth_image(6)[:, :, 0])
    (root / "train" / "odd" / "grey_png.jpg").write_bytes(_encode(grey, "PNG"))
    cmyk = Image.fromarray(_smooth_image(7)).convert("CMYK")
    cmyk.save(root / "train" / "odd" / "cmyk.jpg", quality=95)
    return {"grey": np.asarray(grey.convert("RGB")), "cmyk": np.asarray(cmyk.convert("RGB"))}


def test_bad_files_are_skipped_counted_and_converted_to_rgb(tmp_path, caplog):
    expected = write_bad_folder(tmp_path)
    arrays, class_names = in_memory.load_image_folder(tmp_path, ["train"], size=16)
    train = arrays["train"]
    assert class_names == ["empty", "good", "odd"]
    assert train.num_skipped == 2
    assert train.images.shape == (4, 16, 16, 3)
    np.testing.assert_array_equal(train.labels, [1, 1, 2, 2])
    # odd/ in name order: cmyk.jpg, grey_png.jpg
    assert np.abs(train.images[2].astype(int) - expected["cmyk"]).mean() < 4
    np.testing.assert_array_equal(train.images[3], expected["grey"])
    assert "skipped 2 of 6 images" in caplog.text
    assert "has no images" in caplog.text


def test_a_folder_with_no_valid_image_is_an_error(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "bad.jpg").write_bytes(b"junk")
    with pytest.raises(ValueError, match="none of the 1 images could be decoded"):
        in_memory.load_image_folder(tmp_path, ["train"], size=8)


def test_npz_labels_outside_the_class_range_are_skipped(tmp_path, caplog):
    arrays = {
        "train": in_memory.ImageArrays(
            np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, 2, -1], np.int32)
        )
    }
    in_memory.save_npz(tmp_path / "a.npz", arrays, ["x", "y"], image_format="raw")
    loaded, _ = in_memory.load_npz(tmp_path / "a.npz", ["train"])
    np.testing.assert_array_equal(loaded["train"].labels, [0, 1])
    assert loaded["train"].num_skipped == 2
    assert "labels outside [0, 2)" in caplog.text


def test_missing_paths_and_splits_give_clear_errors(tmp_path):
    config = data.default_dataset_config()
    config.update(dict(name="in_memory", path=str(tmp_path / "missing.npz")))
    with pytest.raises(ValueError, match="make_arrays.py"):
        data.create_dataset(config, global_batch_size=2, eval_batch_size=2, seed=0)
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match=r"found splits: \['train'\]"):
        in_memory.load_image_folder(tmp_path, ["val"], size=8)
    in_memory.save_npz(tmp_path / "a.npz", {"train": _id_arrays(3)}, ["a"], image_format="raw")
    with pytest.raises(ValueError, match=r"Split 'validation' is not in .* \['train'\]"):
        in_memory.load_npz(tmp_path / "a.npz", ["validation"])


@pytest.mark.parametrize(
    "name, names",
    [
        ("in_memory", "make_arrays.py"),
        ("array_record", "convert_to_array_record.py"),
        ("image_folder", "ROOT/<split>/<class>/<image>.jpg"),
    ],
)
def test_an_unset_path_names_what_it_must_be(name, names):
    config = data.default_dataset_config()
    config.name = name
    with pytest.raises(ValueError, match=rf"name='{name}' needs --config.dataset.path=") as error:
        data.create_dataset(config, global_batch_size=2, eval_batch_size=2, seed=0)
    assert names in str(error.value)


def test_the_tf_data_path_without_tensorflow_names_the_extra(tmp_path, monkeypatch):
    from lambdanet.data import input_pipeline

    for module in ("tensorflow", "tensorflow_datasets"):
        monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    input_pipeline._import_tf.cache_clear()
    config = data.default_dataset_config()
    config.update(dict(name="image_folder", path=str(tmp_path)))
    try:
        with pytest.raises(ImportError, match=r"pip install 'lambdanet\[tfds\]'") as error:
            data.create_dataset(config, global_batch_size=2, eval_batch_size=2, seed=0)
    finally:
        input_pipeline._import_tf.cache_clear()  # later tests import the real modules again
    assert "pip install -e '.[tfds]'" in str(error.value)


def test_in_memory_path_never_imports_tensorflow(tmp_path):
    in_memory.save_npz(
        tmp_path / "a.npz",
        {"train": _id_arrays(6), "validation": _id_arrays(3)},
        ["a"] * 10,
        image_format="jpeg",
    )
    code = (
        "import sys\n"
        "from lambdanet import data\n"
        "c = data.default_dataset_config()\n"
        f"c.update(dict(name='in_memory', path={str(tmp_path / 'a.npz')!r}, image_size=2))\n"
        "ds = data.create_dataset(c, global_batch_size=2, eval_batch_size=2, seed=0)\n"
        "next(ds.train_iter(0)), next(ds.eval_iter())\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.skipif(not IMAGENETTE.is_dir(), reason="../shared/data/imagenette is absent")
def test_make_arrays_on_an_imagenette_subset(tmp_path):
    output = str(tmp_path / "imagenette.npz")
    make_arrays.make_arrays(
        output, folder=str(IMAGENETTE), splits=["train", "val"], size=64, max_per_class=2
    )
    config = data.default_dataset_config()
    config.update(dict(name="in_memory", path=output, eval_split="val", image_size=56))
    ds = data.create_dataset(config, global_batch_size=8, eval_batch_size=8, seed=0)
    assert (ds.num_classes, ds.num_train_examples, ds.num_eval_examples) == (10, 20, 20)
    assert ds.class_names[0] == "n01440764"
    batch = next(ds.train_iter(0))
    assert batch["image"].shape == (8, 64, 64, 3)
    assert batch["image"].std() > 10  # real photographs, not blank
