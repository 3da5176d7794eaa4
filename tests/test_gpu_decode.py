"""GPU decoding of the ArrayRecord path (`decode_on='gpu'`), run on nvImageCodec's CPU backend."""

import io
import json
import os
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from lambdanet import data
from lambdanet.data import augment, convert, gpu_decode

nvimgcodec = pytest.importorskip("nvidia.nvimgcodec", reason="needs the gpu-decode extra")

ORIGINALS = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-originals"
needs_originals = pytest.mark.skipif(
    not ORIGINALS.is_dir(), reason="needs ../shared/data/imagenet-originals"
)


def _originals(count: int) -> list[Path]:
    rows = (ORIGINALS / "labels.csv").read_text().splitlines()[1 : count + 1]
    return [ORIGINALS / row.split(",")[0].strip('"') for row in rows]


def _config(path, image_size=64, decode_on="gpu", **fields):
    config = data.default_dataset_config()
    config.update(
        dict(name="array_record", path=str(path), train_split="train", eval_split="val")
        | dict(image_size=image_size, workers=0, decode_on=decode_on)
        | fields
    )
    return config


def _dataset(path, decode_on="gpu", batch_size=16, **fields):
    return data.create_dataset(
        _config(path, decode_on=decode_on, **fields),
        global_batch_size=batch_size,
        eval_batch_size=batch_size,
        seed=3,
    )


def _encode(image: Image.Image, format="JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """40 original-size ImageNet JPEGs (train) and 10 (val) as a shard set."""
    if not ORIGINALS.is_dir():
        pytest.skip("needs ../shared/data/imagenet-originals")
    tree = tmp_path_factory.mktemp("tree")
    for split, files in (("train", _originals(40)), ("val", _originals(50)[40:])):
        for file in files:
            (tree / split / "c").mkdir(parents=True, exist_ok=True)
            os.symlink(file, tree / split / "c" / file.name)
    output = tmp_path_factory.mktemp("shards")
    convert.convert(
        lambda split: convert.folder_examples(str(tree), split),
        {"train": "train", "val": "val"},
        str(output),
        examples_per_shard=20,
        processes=1,
    )
    return output


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory):
    """A shard set of small JPEGs with a CMYK JPEG, a PNG and a corrupt record among them."""
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (6, 8, 3), np.uint8)).resize((80, 60))
        for _ in range(10)
    ]
    encoded = [_encode(image) for image in images]
    encoded[2] = _encode(images[2].convert("CMYK"))
    encoded[5] = _encode(images[5], "PNG")
    encoded[7] = b"\xff\xd8\xff not a jpeg"
    from array_record.python import array_record_module

    from lambdanet.data import array_record

    output = tmp_path_factory.mktemp("odd")
    shards = {}
    for split in ("train", "val"):
        name = array_record.shard_name(split, 0, 1)
        writer = array_record_module.ArrayRecordWriter(str(output / name), "group_size:1")
        for k, data_bytes in enumerate(encoded):
            writer.write(array_record.encode_record(k % 3, f"{k}.jpg", data_bytes))
        writer.close()
        shards[split] = {"num_examples": 10, "shards": [{"file": name, "num_examples": 10}]}
    manifest = dict(format=array_record.FORMAT, class_names=["a", "b", "c"], max_side=None)
    (output / array_record.MANIFEST).write_text(json.dumps(manifest | {"splits": shards}))
    return output


@needs_originals
def test_cpu_backend_region_decode_equals_the_crop_of_the_full_decode():
    decoder = gpu_decode.create_decoder(jax.devices("cpu")[0])
    params = nvimgcodec.DecodeParams(apply_exif_orientation=False)
    rng = np.random.default_rng(0)
    for file in _originals(20):
        stream = nvimgcodec.CodeStream(file.read_bytes())
        full = np.asarray(decoder.decode(stream, params=params).cpu())
        assert full.shape == (stream.height, stream.width, 3)
        top, left = rng.integers(0, (stream.height // 2, stream.width // 2))
        bottom, right = rng.integers(
            (top + 1, left + 1), (stream.height, stream.width), endpoint=True
        )
        region = nvimgcodec.Region(int(top), int(left), int(bottom), int(right))
        window = decoder.decode(stream.get_sub_code_stream(region=region), params=params)
        np.testing.assert_array_equal(np.asarray(window.cpu()), full[top:bottom, left:right])


def test_resize_windows_equals_jax_image_on_each_exact_window():
    rng = np.random.default_rng(1)
    canvas = rng.integers(0, 256, (3 * 128, 128, 3), np.uint8)  # beyond each window: noise
    sizes = np.array([[100, 37], [128, 128], [9, 70]], np.int32)
    empty = np.zeros((0, 24, 24, 3), np.uint8)
    out = gpu_decode.resize_windows(canvas, sizes, empty, np.zeros(0, np.int32), 24)
    for k, (h, w) in enumerate(sizes):
        box = np.array([0, 0, h, w], np.float32)
        expected = augment.crop_and_resize(canvas[k * 128 :][:h, :w], box, 24)
        expected = np.clip(np.round(np.asarray(expected)), 0, 255)
        assert np.abs(np.asarray(out[k], np.int32) - expected).max() <= 1


def _pixel_differences(gpu_batch, host_batch) -> np.ndarray:
    np.testing.assert_array_equal(gpu_batch["label"], host_batch["label"])
    return np.abs(np.asarray(gpu_batch["image"], np.int32) - host_batch["image"].astype(np.int32))


def _reference_crops(batch: dict, slots: np.ndarray, size: int) -> np.ndarray:
    """The windows of `slots` cut from a full-size decode (libjpeg-turbo, accurate IDCT and
    upsampling) and resized by `resize_windows`: uint8 [n, size, size, 3]."""
    import simplejpeg

    boxes = batch["box"][slots]
    side = gpu_decode.canvas_side(boxes)
    canvas = np.zeros((len(slots) * side, side, 3), np.uint8)
    for j, k in enumerate(slots):
        data = batch["jpeg"][batch["offsets"][k] : batch["offsets"][k + 1]].tobytes()
        full = simplejpeg.decode_jpeg(data, "RGB", fastdct=False, fastupsample=False)
        top, left, height, width = boxes[j]
        canvas[j * side :][:height, :width] = full[top : top + height, left : left + width]
    host = np.zeros((0, size, size, 3), np.uint8)
    index = np.zeros(0, np.int32)
    return np.asarray(gpu_decode.resize_windows(canvas, boxes[:, 2:], host, index, size))


@pytest.mark.parametrize("size", [128, pytest.param(224, marks=pytest.mark.slow)])
def test_gpu_decoded_crops_match_the_host_decoders_crops(originals, size):
    """The host path's windows (the same header sizes and draws) decoded by nvImageCodec's CPU
    backend (region of interest) and resized on the device: equal to the windows of a full decode,
    and within the host decoders' resampling differences of the host path's crops (simplejpeg
    with DCT scaling and the fast IDCT, then OpenCV's bilinear or area filter)."""
    gpu, host = (_dataset(originals, d, 20, image_size=size) for d in ("gpu", "host"))
    encoded_batch = gpu.train_batch(0)
    gpu_batch = gpu.decoder(encoded_batch)
    vs_host = _pixel_differences(gpu_batch, next(host.train_iter(0)))
    slots = np.flatnonzero(np.diff(encoded_batch["offsets"]))
    gpu_images = np.asarray(gpu_batch["image"], np.int32)[slots]
    vs_reference = np.abs(gpu_images - _reference_crops(encoded_batch, slots, size))
    print(
        f"{size} px, {len(slots)} of 20 decoded by nvImageCodec: against a full decode "
        f"mean {vs_reference.mean():.4f} max {vs_reference.max()}; against the host path "
        f"mean {vs_host.mean():.2f} max {vs_host.max()}, worst image's mean "
        f"{vs_host.mean(axis=(1, 2, 3)).max():.2f}"
    )
    assert vs_reference.max() <= 1  # 0 measured: the same libjpeg-turbo, a region or not
    assert vs_host.mean() < 6.0 and vs_host.mean(axis=(1, 2, 3)).max() < 20.0
    assert len(slots) >= 17  # the rest: windows over MAX_CROP, decoded by the workers


def test_odd_files_fall_back_to_the_host_decoder_and_corrupt_ones_are_replaced(odd_files, caplog):
    gpu, host = (_dataset(odd_files, d, 10) for d in ("gpu", "host"))
    gpu_batch, host_batch = next(gpu.train_iter(0)), next(host.train_iter(0))
    differences = _pixel_differences(gpu_batch, host_batch)
    assert gpu.decoder.counts == {"device": 7, "workers_host": 3, "here_host": 0}
    fallbacks = [k for k, i in enumerate(gpu.batching.train_indices(0, 10)) if i in (2, 5, 7)]
    assert differences[fallbacks].max() == 0  # the host decoder's own crops
    assert "decoded on the host instead" in caplog.text
    assert "does not decode" in caplog.text  # the corrupt record, replaced as on the host path


def test_gpu_decode_resumes_exactly(odd_files):
    """Batches k..k+n after a restart at k equal those of an uninterrupted run."""
    ds = _dataset(odd_files, batch_size=4)
    uninterrupted = ds.train_iter(0)
    expected = [next(uninterrupted) for _ in range(7)][3:]
    resumed = _dataset(odd_files, batch_size=4).train_iter(3)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(np.asarray(got["image"]), np.asarray(want["image"]))
        np.testing.assert_array_equal(got["label"], want["label"])


def test_eval_batches_are_padded_and_masked_as_on_the_host_path(odd_files):
    gpu, host = (_dataset(odd_files, d, 4) for d in ("gpu", "host"))
    gpu_batches, host_batches = list(gpu.eval_iter()), list(host.eval_iter())
    assert len(gpu_batches) == len(host_batches) == gpu.num_eval_batches == 3
    for gpu_batch, host_batch in zip(gpu_batches, host_batches, strict=True):
        np.testing.assert_array_equal(gpu_batch["mask"], host_batch["mask"])
        masked_out = ~gpu_batch["mask"]
        assert np.asarray(gpu_batch["image"])[masked_out].max(initial=0) == 0
        assert _pixel_differences(gpu_batch, host_batch).mean() < 3.0


def test_grain_workers_send_the_same_encoded_batches(odd_files):
    batches = [next(_dataset(odd_files, workers=w, batch_size=8).train_iter(2)) for w in (0, 1)]
    np.testing.assert_array_equal(*(np.asarray(b["image"]) for b in batches))
    np.testing.assert_array_equal(*(b["label"] for b in batches))


def test_config_errors_name_the_fix(odd_files, monkeypatch):
    with pytest.raises(ValueError, match="decode_on='tpu'"):
        _dataset(odd_files, decode_on="tpu")
    digits = data.default_dataset_config()
    digits.update(name="digits", decode_on="gpu")
    with pytest.raises(ValueError, match="serves name='array_record' only"):
        data.create_dataset(digits, global_batch_size=8, eval_batch_size=8, seed=0)
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)
    with pytest.raises(ImportError, match=r"pip install 'lambdanet\[gpu-decode\]'"):
        _dataset(odd_files)


@pytest.mark.slow  # compiles a train step
def test_training_and_eval_take_gpu_decoded_batches(tiny_config, odd_files, tmp_path):
    from lambdanet import train_loop

    tiny_config.dataset = _config(odd_files, image_size=32, max_eval_examples=None)
    tiny_config.global_batch_size = tiny_config.eval_batch_size = 8
    tiny_config.num_train_steps = 2
    metrics = train_loop.train_and_evaluate(tiny_config, str(tmp_path))
    assert metrics["eval_num_examples"] == 10 and np.isfinite(metrics["train_loss"])
