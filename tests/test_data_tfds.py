"""Tests of the tf.data path: mocked imagenet2012, ImageFolder, sharding, exact eval, errors."""

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data import IMAGENETTE, write_bad_folder

from lambdanet import data
from lambdanet.data import crop, in_memory, input_pipeline

tfds = pytest.importorskip("tensorflow_datasets")

NUM_TRAIN, NUM_EVAL = 24, 1003


def _config(**fields):
    config = data.default_dataset_config()
    config.update(fields)
    return config


@pytest.fixture(scope="module")
def id_folder(tmp_path_factory) -> Path:
    """train/ and val/ of constant-colour 4x4 PNGs whose colour encodes the example id (R*256+G);
    crops of a constant image keep the colour, so batches reveal which examples they hold."""
    root = tmp_path_factory.mktemp("ids")
    for split, num in (("train", NUM_TRAIN), ("val", NUM_EVAL)):
        for i in range(num):
            class_dir = root / split / f"class{i % 3}"
            class_dir.mkdir(parents=True, exist_ok=True)
            colour = (*divmod(i, 256), 7)
            Image.new("RGB", (4, 4), colour).save(class_dir / f"{i:04d}.png")
    return root


def _ids(images: np.ndarray) -> np.ndarray:
    assert (images == images[:, :1, :1]).all()  # constant images stay constant
    return images[:, 0, 0, 0].astype(int) * 256 + images[:, 0, 0, 1]


def _folder_dataset(root, process_index=0, process_count=1, global_batch=8, eval_batch=8, seed=0):
    config = _config(name="image_folder", path=str(root), eval_split="val", image_size=4)
    return data.create_dataset(
        config,
        global_batch_size=global_batch,
        eval_batch_size=eval_batch,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )


@pytest.mark.parametrize("eval_batch, process_count", [(8, 1), (64, 8), (2048, 2), (24, 3)])
def test_eval_counts_1003_examples_exactly_once(id_folder, eval_batch, process_count):
    counts, num_batches = np.zeros(NUM_EVAL, int), set()
    for p in range(process_count):
        ds = _folder_dataset(
            id_folder, p, process_count, global_batch=process_count, eval_batch=eval_batch
        )
        assert ds.num_eval_examples == NUM_EVAL
        batches = list(ds.eval_iter())
        num_batches.add(len(batches))
        for batch in batches:
            assert batch["image"].shape == (eval_batch // process_count, 4, 4, 3)
            np.add.at(counts, _ids(batch["image"][batch["mask"]]), 1)
    assert (counts == 1).all()
    assert num_batches == {ds.num_eval_batches}


def test_processes_read_disjoint_shards_and_resume_exactly(id_folder):
    steps_per_epoch = NUM_TRAIN // 2 // 4  # 2 processes, 4 examples each per step
    first_epoch = []
    for p in range(2):
        ds = _folder_dataset(id_folder, p, 2)
        iterator = ds.train_iter(0)
        batches = [next(iterator) for _ in range(2 * steps_per_epoch)]
        ids = np.concatenate([_ids(b["image"]) for b in batches])
        first_epoch.append(ids[: len(ids) // 2])
        assert sorted(ids[len(ids) // 2 :]) == sorted(first_epoch[-1])  # the same shard...
        assert not np.array_equal(ids[len(ids) // 2 :], first_epoch[-1])  # ...reshuffled
        for start in (1, steps_per_epoch + 1):
            resumed = ds.train_iter(start)
            for batch in batches[start:]:
                np.testing.assert_array_equal(next(resumed)["image"], batch["image"])
    assert sorted(np.concatenate(first_epoch)) == list(range(NUM_TRAIN))


@pytest.fixture(scope="module")
def mock_imagenet(tmp_path_factory):
    manual_dir = tmp_path_factory.mktemp("manual")
    for name in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
        (manual_dir / name).touch()  # the mock never opens them; the manual_dir check sees them
    config = _config(
        name="imagenet2012", manual_dir=str(manual_dir), image_size=32, num_classes=1000
    )
    with tfds.testing.mock_data(num_examples=10):
        yield data.create_dataset(config, global_batch_size=4, eval_batch_size=8, seed=0)


def test_mock_imagenet2012_batches(mock_imagenet):
    ds = mock_imagenet
    assert (ds.num_classes, ds.num_train_examples, ds.num_eval_examples) == (1000, 10, 10)
    iterator = ds.train_iter(0)
    batches = [next(iterator) for _ in range(5)]  # 20 > 10 examples: crosses an epoch
    for batch in batches:
        assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].dtype == np.int32 and (batch["label"] < 1000).all()
    resumed = ds.train_iter(3)
    for batch in batches[3:]:
        np.testing.assert_array_equal(next(resumed)["image"], batch["image"])
    eval_batches = list(ds.eval_iter())
    assert len(eval_batches) == ds.num_eval_batches == 2
    assert [int(b["mask"].sum()) for b in eval_batches] == [8, 2]


def test_missing_manual_dir_tells_the_steps(tmp_path):
    config = _config(name="imagenet2012", data_dir=str(tmp_path / "tfds"))
    with pytest.raises(ValueError, match="manual_dir=None is not a folder") as error:
        data.create_dataset(config, global_batch_size=2, eval_batch_size=2, seed=0)
    assert "ILSVRC2012_img_train.tar" in str(error.value)
    assert "tfds build imagenet2012 --manual_dir=MANUAL_DIR" in str(error.value)
    config.manual_dir = str(tmp_path)
    with pytest.raises(
        ValueError, match=r"lacks \['ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val"
    ):
        data.create_dataset(config, global_batch_size=2, eval_batch_size=2, seed=0)


def test_unknown_dataset_and_missing_folder_errors(tmp_path, id_folder):
    with pytest.raises(ValueError, match="Unknown dataset name 'imagenet2013'"):
        data.create_dataset(
            _config(name="imagenet2013"), global_batch_size=2, eval_batch_size=2, seed=0
        )
    with pytest.raises(ValueError, match=r"path=.*missing.* is not a folder. Expected a tree"):
        data.create_dataset(
            _config(name="image_folder", path=str(tmp_path / "missing")),
            global_batch_size=2,
            eval_batch_size=2,
            seed=0,
        )
    with pytest.raises(ValueError, match=r"Split 'validation' is not in .*\['train', 'val'\]"):
        data.create_dataset(
            _config(name="image_folder", path=str(id_folder)),
            global_batch_size=2,
            eval_batch_size=2,
            seed=0,
        )


def test_bad_files_in_a_folder_are_skipped(tmp_path):
    write_bad_folder(tmp_path)
    config = _config(name="image_folder", path=str(tmp_path), eval_split="train", image_size=8)
    ds = data.create_dataset(config, global_batch_size=2, eval_batch_size=4, seed=0)
    batches = list(ds.eval_iter())
    labels = np.concatenate([b["label"][b["mask"]] for b in batches])
    assert sorted(labels) == [1, 1, 2, 2]  # 2 good JPEGs; the grey PNG and the CMYK JPEG
    train = next(ds.train_iter(0))
    assert train["image"].shape == (2, 8, 8, 3)


@pytest.mark.skipif(not IMAGENETTE.is_dir(), reason="../shared/data/imagenette is absent")
def test_imagenette_through_image_folder():
    config = _config(
        name="image_folder",
        path=str(IMAGENETTE),
        eval_split="val",
        image_size=64,
        max_train_examples=8,
        max_eval_examples=8,
    )
    ds = data.create_dataset(config, global_batch_size=4, eval_batch_size=8, seed=0)
    assert ds.class_names == tuple(in_memory.list_image_folder(IMAGENETTE, "val")[2])
    batch = next(ds.train_iter(0))
    assert batch["image"].shape == (4, 64, 64, 3) and batch["image"].std() > 10
    assert [int(b["mask"].sum()) for b in ds.eval_iter()] == [8]


def test_bad_files_are_counted_once_per_epoch_and_eval_pass(tmp_path, caplog):
    write_bad_folder(tmp_path)  # 6 files in train/: 2 fail to decode
    config = _config(name="image_folder", path=str(tmp_path), eval_split="train", image_size=8)
    ds = data.create_dataset(config, global_batch_size=2, eval_batch_size=4, seed=0)
    with caplog.at_level("WARNING"):
        list(ds.eval_iter())
        iterator = ds.train_iter(0)
        batches = [next(iterator) for _ in range(5)]  # 10 examples: two epochs of 4, and more
    assert all(set(b) == {"image", "label"} for b in batches)
    lines = [r.getMessage() for r in caplog.records if "failed to decode" in r.getMessage()]
    assert len(lines) == 3, lines  # the eval pass, epochs 0 and 1
    assert "eval split 'train': 2 files failed to decode in this pass" in lines[0]
    assert "train split 'train': 2 files failed to decode in epoch 0" in lines[1]
    assert "in epoch 1" in lines[2]


def test_tf_data_crops_are_the_shared_formulas_of_their_draws():
    """The tf.data path's windows are `crop.py`'s whole-pixel boxes (the ArrayRecord path's
    arithmetic), of its own stateless draws."""
    tf = pytest.importorskip("tensorflow")
    image = np.random.default_rng(0).integers(0, 256, (60, 90, 3), np.uint8)
    png = tf.io.encode_png(image)
    area, ratio = (0.08, 1.0), (3 / 4, 4 / 3)

    def expected(box):
        top, left, h, w = box
        return input_pipeline._resize_uint8(image[top : top + h, left : left + w], 16)

    for position in range(4):
        seed = tf.constant([5, position], tf.int64)
        uniform = tf.random.stateless_uniform([22], seed).numpy()  # train_crop's draws, replayed
        fraction = area[0] + (area[1] - area[0]) * uniform[:10]
        log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
        log_ratio = log_low + (log_high - log_low) * uniform[10:20]
        box = crop.inception_box(fraction, log_ratio, uniform[20:], 60.0, 90.0, whole_pixels=True)
        out = input_pipeline.train_crop(png, seed, 16, area, ratio)
        np.testing.assert_array_equal(out, expected([int(v) for v in box]))
    out = input_pipeline.eval_crop(png, 16, 0.875)
    np.testing.assert_array_equal(out, expected(crop.center_crop_box_fn(0.875)(60, 90)))
