"""The TF-free ArrayRecord path: converter (bad files, resume, tars), decoders, Grain loader."""

import dataclasses
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from lambdanet import data, evaluate, experiment, sharding, train_loop
from lambdanet.data import array_record, convert, crop, decode

REPO = Path(__file__).resolve().parents[1]
ORIGINALS = REPO.parent / "shared" / "data" / "imagenet-originals"
CONVERT = [sys.executable, str(REPO / "scripts" / "convert_to_array_record.py")]


def _jpeg(rng, height, width, mode="RGB", quality=90) -> bytes:
    """A smooth random image (so that crops and resizes are comparable), encoded."""
    small = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BILINEAR)
    buffer = io.BytesIO()
    image.convert(mode).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _png16(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 50), value, np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def _folder(root: Path, per_class=6, classes=("cat", "dog", "eel"), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("val", 2)):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                size = rng.integers(40, 120, 2)
                (folder / f"{name}_{i}.jpg").write_bytes(_jpeg(rng, *size))
    return root


def _convert(root, output, **kwargs):
    return convert.convert(
        lambda split: convert.folder_examples(str(root), split),
        {"train": "train", "val": "val"},
        str(output),
        **kwargs,
    )


def _config(path, image_size=32, workers=0, **fields):
    config = data.default_dataset_config()
    config.update(
        dict(
            name="array_record",
            path=str(path),
            train_split="train",
            eval_split="val",
            image_size=image_size,
            workers=workers,
        )
        | fields
    )
    return config


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = _folder(tmp_path_factory.mktemp("folder"))
    output = tmp_path_factory.mktemp("shards")
    _convert(root, output, examples_per_shard=5, processes=1)
    return output


def test_bad_files_are_counted_skipped_or_reencoded(tmp_path, caplog):
    root = _folder(tmp_path / "folder", per_class=2)
    rng = np.random.default_rng(1)
    bad = root / "train" / "cat"
    good = _jpeg(rng, 64, 64)
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (bad / "noise.jpg").write_bytes(rng.integers(0, 256, 3000, np.uint8).tobytes())
    (bad / "cmyk.jpg").write_bytes(_jpeg(rng, 48, 48, mode="CMYK"))
    (bad / "grey.jpg").write_bytes(_jpeg(rng, 48, 48, mode="L"))
    (bad / "deep.png").write_bytes(_png16(30000))
    with caplog.at_level("INFO"):
        manifest = _convert(root, tmp_path / "shards", processes=1)
    train_split = manifest["splits"]["train"]
    assert train_split["num_examples"] == 6 + 3  # 6 good, cmyk + png re-encoded, grey kept
    assert train_split["skipped"] == 3
    counts = train_split["counts"]
    assert counts["skipped empty file"] == 1
    assert counts["skipped corrupt or truncated file"] == 2
    assert counts["re-encoded CMYK JPEG"] == 1 and counts["re-encoded PNG I;16"] == 1
    assert counts["kept"] == 7
    assert "train/cat/truncated.jpg" in train_split["names"]["skipped corrupt or truncated file"]
    summary = [r.getMessage() for r in caplog.records if "examples in" in r.getMessage()]
    assert "train: 9 examples in 1 shards, 3 skipped" in summary[0]
    assert "train/cat/empty.jpg" in summary[0]
    # The 16-bit PNG keeps its grey level (30000 / 65535 * 255 = 117), not clipped to white.
    source = _config(tmp_path / "shards", image_size=16)
    ds = data.create_dataset(source, global_batch_size=9, eval_batch_size=6, seed=0)
    records = ds.train._source
    stored = {array_record.decode_record(records[i])[1]: i for i in range(len(records))}
    _, _, png_as_jpeg = array_record.decode_record(records[stored["train/cat/deep.png"]])
    assert abs(float(decode.pillow_decode(png_as_jpeg).mean()) - 117) < 2


def test_16_bit_images_scale_to_8_bits_on_every_decode_path():
    image = Image.open(io.BytesIO(_png16(65535 // 2)))
    assert abs(float(decode.to_rgb(image).mean()) - 127.5) < 1
    from lambdanet.data import in_memory

    assert abs(float(in_memory.decode_image(_png16(65535 // 2), 8).mean()) - 127.5) < 1
    decoder = decode.Decoder("simplejpeg")
    crop = decoder.decode_crop(_png16(65535 // 4), lambda h, w: (0, 0, h, w), 8)
    assert abs(float(crop.mean()) - 63.75) < 1


@pytest.mark.parametrize("name", decode.DECODERS)
def test_decoders_match_a_full_size_reference_crop(name):
    rng = np.random.default_rng(2)
    data_ = _jpeg(rng, 480, 640, quality=95)
    full = decode.pillow_decode(data_)
    decoder = decode.Decoder(name, fast_dct=False)
    for box, size in [((0, 0, 480, 640), 224), ((100, 200, 300, 240), 64), ((10, 20, 50, 60), 96)]:
        out = decoder.decode_crop(data_, lambda h, w, box=box: box, size)
        assert out.shape == (size, size, 3) and out.dtype == np.uint8
        top, left, h, w = box
        reference = Image.fromarray(full[top : top + h, left : left + w])
        reference = np.asarray(reference.resize((size, size), Image.BILINEAR), np.float32)
        error = np.abs(out.astype(np.float32) - reference).mean()
        assert error < 4.0, (name, box, error)  # DCT-scaled decoding stays close (0-255 scale)


def test_reduced_size_decoding_only_when_the_crop_shrinks_2x_or_more():
    assert decode._reduction((0, 0, 480, 640), 224) == 2
    assert decode._reduction((0, 0, 447, 640), 224) == 1
    assert decode._reduction((0, 0, 480, 640), 60) == 8
    assert decode._reduction((0, 0, 300, 300), 128) == 2


def test_inception_crop_boxes_lie_inside_and_follow_the_ranges():
    rng = np.random.default_rng(3)
    boxes = np.array(
        [crop.sample_crop_box(rng, 300, 400, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(2000)]
    )
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 300).all()
    assert (left + w <= 400).all()
    area = h * w / (300 * 400)
    cropped = area < 0.999
    assert area[cropped].min() > 0.075 and 0.3 < np.median(area) < 0.7
    ratio = w[cropped] / h[cropped]
    assert ratio.min() > 0.72 and ratio.max() < 1.39
    assert abs(np.mean(top[cropped] + h[cropped] / 2) - 150) < 10  # offsets are uniform
    # No candidate fits a 1 x 400 image at 50% area: the whole image is used.
    assert crop.sample_crop_box(rng, 1, 400, (0.5, 0.5), (1.0, 1.0)) == (0, 0, 1, 400)


def test_train_crop_boxes_of_a_seed_and_position_stay_pinned():
    """A resumed run crops each stream position as the run it resumes did: these boxes (of
    (seed, 1, position), drawn before the crop arithmetic moved to crop.py) must not change."""
    boxes = [
        crop.inception_box_fn((0, 1, position), (0.08, 1.0), (3 / 4, 4 / 3))(300, 400)
        for position in range(4)
    ]
    assert boxes == [(0, 114, 298, 238), (75, 158, 173, 218), (77, 81, 194, 214), (4, 23, 292, 370)]
    box_fn = crop.inception_box_fn((7, 1, 10**9), (0.08, 1.0), (3 / 4, 4 / 3))
    assert box_fn(481, 640) == (1, 305, 244, 240)


def test_train_batches_are_a_function_of_seed_and_step(shards):
    config = _config(shards)
    ds = data.create_dataset(config, global_batch_size=6, eval_batch_size=4, seed=0)
    assert ds.class_names == ("cat", "dog", "eel") and ds.num_train_examples == 18
    stream = [next(it) for it in [ds.train_iter(0)] for _ in range(5)]
    for batch in stream:
        assert batch["image"].shape == (6, 32, 32, 3) and batch["image"].dtype == np.uint8
    epoch = np.concatenate([b["label"] for b in stream[:3]])
    assert sorted(epoch.tolist()) == [0] * 6 + [1] * 6 + [2] * 6  # an epoch is a permutation
    resumed = ds.train_iter(3)
    for expected in stream[3:]:
        chex.assert_trees_all_equal(expected, next(resumed))
    # Two processes read halves of the same global batches.
    halves = [
        data.create_dataset(
            config,
            global_batch_size=6,
            eval_batch_size=4,
            seed=0,
            process_index=p,
            process_count=2,
        ).train_iter(0)
        for p in range(2)
    ]
    for expected in stream[:2]:
        joined = [next(half) for half in halves]
        np.testing.assert_array_equal(
            np.concatenate([b["image"] for b in joined]), expected["image"]
        )
    other_seed = next(
        data.create_dataset(config, global_batch_size=6, eval_batch_size=4, seed=1).train_iter(0)
    )
    assert not np.array_equal(other_seed["image"], stream[0]["image"])


def test_grain_worker_processes_give_the_same_batches(shards):
    inline = data.create_dataset(_config(shards), global_batch_size=6, eval_batch_size=4, seed=0)
    pooled = data.create_dataset(
        _config(shards, workers=2), global_batch_size=6, eval_batch_size=4, seed=0
    )
    expected = [next(it) for it in [inline.train_iter(2)] for _ in range(4)]
    iterator = pooled.train_iter(2)
    for batch in expected:
        chex.assert_trees_all_equal(batch, dict(next(iterator)))
    iterator.close()
    chex.assert_trees_all_equal(list(inline.eval_iter()), [dict(b) for b in pooled.eval_iter()])


@pytest.mark.parametrize("process_count", [1, 4])
def test_eval_counts_every_example_once(shards, process_count):
    config = _config(shards, eval_crop_fraction=1.0)
    labels, count = [], 0
    for p in range(process_count):
        ds = data.create_dataset(
            config,
            global_batch_size=4,
            eval_batch_size=4,
            seed=0,
            process_index=p,
            process_count=process_count,
        )
        batches = list(ds.eval_iter())
        assert len(batches) == ds.num_eval_batches
        for batch in batches:
            labels += batch["label"][batch["mask"]].tolist()
            count += int(batch["mask"].sum())
    assert count == 6 and sorted(labels) == [0, 0, 1, 1, 2, 2]


def test_corrupt_records_are_replaced_and_the_loader_goes_on(tmp_path, caplog):
    from array_record.python import array_record_module

    rng = np.random.default_rng(4)
    tmp_path.joinpath("shards").mkdir()
    writer = array_record_module.ArrayRecordWriter(
        str(tmp_path / "shards" / "train-00000-of-00001.array_record"), "group_size:1"
    )
    for i in range(6):
        image = b"\xff\xd8broken" if i in (1, 2) else _jpeg(rng, 40, 40)
        writer.write(array_record.encode_record(i % 2, f"image{i}", image))
    writer.close()
    shard = dict(file="train-00000-of-00001.array_record", num_examples=6)
    split = dict(num_examples=6, shards=[shard], skipped=0)
    manifest = dict(
        format=array_record.FORMAT,
        class_names=["a", "b"],
        max_side=None,
        splits=dict(train=split, val=split),
    )
    (tmp_path / "shards" / "manifest.json").write_text(json.dumps(manifest))
    config = _config(tmp_path / "shards", image_size=16)
    ds = data.create_dataset(config, global_batch_size=6, eval_batch_size=6, seed=0)
    with caplog.at_level("WARNING"):
        (batch,) = [b for b, _ in zip(ds.eval_iter(), range(1), strict=False)]
    assert batch["mask"].all() and batch["label"].tolist() == [0, 1, 1, 1, 0, 1]
    np.testing.assert_array_equal(batch["image"][1], batch["image"][3])  # 1 and 2 -> record 3
    assert sum("does not decode" in r.getMessage() for r in caplog.records) == 3


def test_missing_or_half_written_shard_sets_name_the_command(shards, tmp_path):
    with pytest.raises(
        ValueError, match="is not an ArrayRecord shard set.*convert_to_array_record"
    ):
        data.create_dataset(_config(tmp_path), global_batch_size=2, eval_batch_size=2, seed=0)
    half = tmp_path / "half"
    half.mkdir()
    (half / "train-00000-of-00004.array_record.tmp").write_bytes(b"")
    with pytest.raises(ValueError, match="no manifest: the conversion did not finish"):
        data.create_dataset(_config(half), global_batch_size=2, eval_batch_size=2, seed=0)
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in shards.iterdir():
        (copy / file.name).write_bytes(file.read_bytes())
    (copy / "train-00001-of-00004.array_record").unlink()
    with pytest.raises(ValueError, match="train-00001-of-00004.array_record is missing"):
        data.create_dataset(_config(copy), global_batch_size=2, eval_batch_size=2, seed=0)
    (copy / "train-00001-of-00004.array_record").write_bytes(
        (shards / "train-00000-of-00004.array_record").read_bytes()[:-300]
    )
    with pytest.raises((ValueError, RuntimeError)):
        data.create_dataset(_config(copy), global_batch_size=2, eval_batch_size=2, seed=0)
    with pytest.raises(ValueError, match="config.dataset.decoder='turbo': use one of"):
        data.create_dataset(
            _config(shards, decoder="turbo"), global_batch_size=2, eval_batch_size=2, seed=0
        )
    with pytest.raises(ValueError, match="config.dataset.workers=-1: use a count >= 0"):
        data.create_dataset(
            _config(shards, workers=-1), global_batch_size=2, eval_batch_size=2, seed=0
        )
    with pytest.raises(ValueError, match="Split 'test' is not in the shard set"):
        data.create_dataset(
            _config(shards, eval_split="test"), global_batch_size=2, eval_batch_size=2, seed=0
        )


def test_killed_conversion_resumes_and_equals_an_uninterrupted_one(tmp_path):
    root = _folder(tmp_path / "folder", per_class=60)  # 90 train shards: the kill lands early
    args = ["--folder", str(root), "--examples_per_shard=2", "--processes=1"]
    whole = tmp_path / "whole"
    subprocess.run([*CONVERT, *args, f"--output={whole}"], check=True, timeout=300)
    killed = tmp_path / "killed"
    process = subprocess.Popen([*CONVERT, *args, f"--output={killed}"], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list(killed.glob("train-*.array_record"))) < 5 and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = {p.name: p.stat().st_mtime_ns for p in killed.glob("train-*.array_record")}
    assert 5 <= len(written) < 90 and not (killed / "manifest.json").exists()
    subprocess.run([*CONVERT, *args, f"--output={killed}"], check=True, timeout=300)
    for name, mtime in written.items():
        assert (killed / name).stat().st_mtime_ns == mtime  # finished shards were kept
    assert json.loads((killed / "manifest.json").read_text()) == json.loads(
        (whole / "manifest.json").read_text()
    )
    for file in whole.glob("*.array_record"):
        assert (killed / file.name).read_bytes() == file.read_bytes()


def _tar_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def test_imagenet_tars_convert_in_place_with_sorted_wnid_labels(tmp_path):
    rng = np.random.default_rng(5)
    wnids = ["n02000000", "n01000000", "n03000000"]  # deliberately unsorted in the tar
    class_tars = {
        f"{wnid}.tar": _tar_of({f"{wnid}_{i}.JPEG": _jpeg(rng, 50, 60) for i in range(3)})
        for wnid in wnids
    }
    (tmp_path / convert.TRAIN_TAR).write_bytes(_tar_of(class_tars))
    val_names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in (3, 1, 2, 4)]
    (tmp_path / convert.VAL_TAR).write_bytes(
        _tar_of({name: _jpeg(rng, 50, 60) for name in val_names})
    )
    # TFDS's label file: one wnid per line, for the files in sorted order (1, 2, 3, 4).
    (tmp_path / convert.VAL_LABEL_FILES[0]).write_text(
        "n03000000\nn01000000\nn01000000\nn02000000\n"
    )
    manifest = convert.convert(
        lambda split: convert.imagenet_tar_examples(str(tmp_path), split),
        {"train": "train", "validation": "validation"},
        str(tmp_path / "shards"),
        processes=1,
    )
    assert manifest["class_names"] == sorted(wnids)
    config = _config(tmp_path / "shards", eval_split="validation")
    ds = data.create_dataset(config, global_batch_size=9, eval_batch_size=4, seed=0)
    records = [array_record.decode_record(r) for r in ds.train._source.__getitems__(range(9))]
    assert {(name.split("/")[0], label) for label, name, _ in records} == {
        ("n01000000", 0),
        ("n02000000", 1),
        ("n03000000", 2),
    }
    original = class_tars["n01000000.tar"]
    with tarfile.open(fileobj=io.BytesIO(original)) as tar:
        first = tar.extractfile("n01000000_0.JPEG").read()
    assert any(image == first for _, _, image in records)  # stored byte for byte
    val = [array_record.decode_record(r) for r in ds.evaluation._source.__getitems__(range(4))]
    assert [(name, label) for label, name, _ in val] == [
        ("ILSVRC2012_val_00000001.JPEG", 2),
        ("ILSVRC2012_val_00000002.JPEG", 0),
        ("ILSVRC2012_val_00000003.JPEG", 0),
        ("ILSVRC2012_val_00000004.JPEG", 1),
    ]


@pytest.mark.skipif(not ORIGINALS.is_dir(), reason="needs ../shared/data/imagenet-originals")
def test_imagenet_originals_convert_resize_and_decode(tmp_path):
    rows = (ORIGINALS / "labels.csv").read_text().splitlines()[1:41]
    for row in rows:
        file, wnid = row.split(",")[0].strip('"'), row.split(",")[1]
        for split in ("train", "val"):
            (tmp_path / "tree" / split / wnid).mkdir(parents=True, exist_ok=True)
            os.symlink(ORIGINALS / file, tmp_path / "tree" / split / wnid / file)
    manifest = _convert(tmp_path / "tree", tmp_path / "full", processes=2)
    resized = _convert(tmp_path / "tree", tmp_path / "small", max_side=160, processes=2)
    assert manifest["splits"]["train"]["num_examples"] == 40
    assert resized["splits"]["train"]["counts"]["resized"] >= 35
    sizes = [os.path.getsize(p) for p in (tmp_path / "full").glob("train-*.array_record")]
    small = [os.path.getsize(p) for p in (tmp_path / "small").glob("train-*.array_record")]
    assert sum(small) < 0.5 * sum(sizes)
    for path in (tmp_path / "full", tmp_path / "small"):
        ds = data.create_dataset(
            _config(path, image_size=128), global_batch_size=20, eval_batch_size=20, seed=0
        )
        batch = next(ds.train_iter(0))
        assert batch["image"].shape == (20, 128, 128, 3) and batch["image"].std() > 20


def _train_config(tiny_config, shards, workers=0):
    tiny_config.dataset = _config(shards, workers=workers)
    tiny_config.dataset.max_eval_examples = None
    tiny_config.global_batch_size = 8
    tiny_config.eval_batch_size = 8
    return tiny_config


def test_training_from_shards_resumes_exactly(tiny_config, shards, tmp_path, monkeypatch):
    config = _train_config(tiny_config, shards)  # workers=0: equal batches, tested above
    config.num_train_steps = 6
    config.checkpoint_every_steps = 100  # only the stop and the end save
    full = train_loop.train_and_evaluate(config, str(tmp_path / "full"))
    assert full["eval_num_examples"] == 6

    def stop_after_step_3(*args, **kwargs):  # SIGTERM as the loop prefetches batch 3
        ds = data.create_dataset(*args, **kwargs)
        batches = ds.train_iter

        def train_iter(start_step=0):
            for step, batch in enumerate(batches(start_step), start_step):
                if step == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
                yield batch

        ds.train_iter = train_iter
        return ds

    monkeypatch.setattr(experiment, "create_dataset", stop_after_step_3)
    stopped = train_loop.train_and_evaluate(config, str(tmp_path / "resumed"), run_eval=False)
    assert stopped["stopped_early"] and stopped["step"] == 3
    monkeypatch.setattr(experiment, "create_dataset", data.create_dataset)
    train_loop.train_and_evaluate(config, str(tmp_path / "resumed"), run_eval=False)
    restore = lambda run: ocp.StandardCheckpointer().restore(tmp_path / run / "checkpoints/6/state")
    chex.assert_trees_all_equal(restore("full"), restore("resumed"))


def test_eval_from_shards_is_exact_on_1_and_8_devices(tiny_config, shards):
    config = _train_config(tiny_config, shards)
    exp8 = experiment.create_experiment(config)
    exp1 = experiment.create_experiment(config, devices=jax.devices()[:1])
    assert exp8.mesh.devices.size == 8
    eval8 = evaluate.eval_loop(exp8, exp8.state)
    state1 = jax.device_put(exp8.state, sharding.replicated_sharding(exp1.mesh))
    eval1 = evaluate.eval_loop(exp1, state1)
    assert eval8["num_examples"] == eval1["num_examples"] == 6
    assert eval8["loss"] == pytest.approx(eval1["loss"], rel=1e-5)


def test_a_tfds_dataset_converts_where_tensorflow_is_installed(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        manifest = convert.convert(
            lambda split: convert.tfds_examples("cifar10", split),
            {"train": "train", "val": "test"},
            str(tmp_path),
            processes=1,
        )
    assert len(manifest["class_names"]) == 10
    assert manifest["splits"]["train"]["counts"] == {"re-encoded PNG RGB": 6}  # cifar10: PNGs
    ds = data.create_dataset(_config(tmp_path), global_batch_size=6, eval_batch_size=6, seed=0)
    assert next(ds.train_iter(0))["image"].shape == (6, 32, 32, 3)


def test_input_benchmark_prints_one_json_line_per_measurement(shards):
    command = [sys.executable, str(REPO / "scripts" / "benchmark_input.py")]
    command += ["--sizes=32", "--seconds=0.5", "--batch-size=6"]
    source = {  # the decoders read a shard set; the loader is a config's dataset
        "decoders": [f"--shards={shards}"],
        "loader": ["--config=default", f"--config.dataset.path={shards}"],
    }
    for mode, processes in (("decoders", 1), ("loader", 0)):  # loader: decoding in-process
        out = subprocess.run(
            [*command, *source[mode], f"--mode={mode}", f"--processes={processes}"],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        ).stdout
        (record,) = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        assert record["kind"] == mode and record["size"] == 32 and record["img_per_s"] > 0


def test_input_benchmark_times_the_torchvision_peer(tmp_path):
    # Not imported here: torchvision imported beside jax crashed the pytest-xdist worker.
    if importlib.util.find_spec("torchvision") is None:
        pytest.skip("torchvision is not installed")
    root = _folder(tmp_path / "folder", per_class=2)
    command = [sys.executable, str(REPO / "scripts" / "benchmark_input.py"), f"--folder={root}"]
    command += ["--mode=torch", "--split=train", "--processes=0,1", "--sizes=32"]
    command += ["--seconds=0.5", "--batch-size=4"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True).stdout
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["kind"], r["workers"]) for r in records] == [
        ("torch_dataloader", 0),
        ("torch_dataloader", 1),
    ]
    assert all(r["img_per_s"] > 0 and r["size"] == 32 for r in records)


@dataclasses.dataclass(frozen=True)
class _MarkedBatches:
    """A train batch function that leaves a file STEP.PID.OPENCV_THREADS per batch it makes, in
    whichever worker process makes it."""

    batches: object
    folder: str

    def __call__(self, step: int):
        import cv2

        Path(self.folder, f"{step}.{os.getpid()}.{cv2.getNumThreads()}").touch()
        return self.batches(step)


def test_grain_workers_buffer_a_few_batches_not_hundreds(shards, tmp_path):
    source = data.create_dataset(
        _config(shards, workers=2), global_batch_size=2, eval_batch_size=2, seed=0
    )
    source.train_batch = _MarkedBatches(source.train_batch, str(tmp_path))
    iterator = source.train_iter()
    next(iterator)
    time.sleep(3)  # the workers fill whatever their buffers hold
    made = len(os.listdir(tmp_path))
    iterator.close()
    # The benchmarks take `buffered_batches` before timing: all the workers made ahead. Grain's
    # default ReadOptions (16 threads, 500 elements prefetched a worker) make 1,000 here.
    assert made - 1 <= source.buffered_batches == 2 * array_record.AHEAD_PER_WORKER, made


def test_grain_workers_decode_on_one_thread_each(shards, tmp_path):
    source = data.create_dataset(
        _config(shards, workers=2), global_batch_size=2, eval_batch_size=2, seed=0
    )
    source.train_batch = _MarkedBatches(source.train_batch, str(tmp_path))
    iterator = source.train_iter()
    next(iterator), next(iterator)
    iterator.close()
    # a spawned worker starts with OpenCV's default, one thread per core
    assert {name.split(".")[2] for name in os.listdir(tmp_path)} == {"1"}
