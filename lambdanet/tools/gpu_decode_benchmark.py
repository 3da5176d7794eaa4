"""Decoding throughput of nvImageCodec's backends on the GPU (`scripts/benchmark_input.py
--mode=gpu_decode`): one record per (backends, batch size, region of interest or whole image),
and the GPU decode path's own decoder (`gpu_decode.GpuDecoder`: region decode into the canvas and
the resize program) at each batch size.

img/s counts images decoded per second of wall time, in batches decoded back to back (the last
one waited for); the windows are Inception crops drawn from each image's header size.
"""

import time
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from lambdanet.data import crop, decode, encoded, gpu_decode

# name -> ((backend kind, load hint), ...) in nvImageCodec's order of preference.
BACKENDS = {
    "hw": (("HW_GPU_ONLY", 1.0),),
    "cuda": (("GPU_ONLY", 1.0),),
    "hybrid": (("HYBRID_CPU_GPU", 1.0),),
    "hw+cuda": (("HW_GPU_ONLY", 1.0), ("GPU_ONLY", 1.0)),
    "hw0.75+cuda": (("HW_GPU_ONLY", 0.75), ("GPU_ONLY", 1.0)),
    "hw0.5+cuda": (("HW_GPU_ONLY", 0.5), ("GPU_ONLY", 1.0)),
    "default": tuple((kind, 1.0) for kind in gpu_decode.DEVICE_BACKENDS),
}


def _backends(name: str) -> list:
    nvimgcodec = gpu_decode.import_nvimgcodec()
    return [
        nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, kind), load_hint=hint)
        for kind, hint in BACKENDS[name]
    ]


def _boxes(images: Sequence[bytes], seed: int = 0) -> list[crop.Box | None]:
    """Each image's Inception crop window (None: not a JPEG the device decodes)."""
    sizes = [encoded.jpeg_size(data) for data in images]
    return [
        None
        if size is None
        else crop.inception_box_fn((seed, 1, k), (0.08, 1.0), (3 / 4, 4 / 3))(*size)
        for k, size in enumerate(sizes)
    ]


def _batches(items: list, batch_size: int) -> Iterator[list]:
    """Endless batches of `batch_size` items, cycling through `items`."""
    start = 0
    while True:
        yield [items[(start + k) % len(items)] for k in range(batch_size)]
        start += batch_size


def _time(run, batches: Iterator, batch_size: int, seconds: float, warmup: int = 2) -> float:
    """img/s of `run(batch, wait)` over `seconds` of batches after `warmup` batches; wait: the
    batch's results are waited for (the last one of the time)."""
    for _ in range(warmup):
        run(next(batches), wait=True)
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        run(next(batches), wait=False)
        count += batch_size
    run(next(batches), wait=True)
    return (count + batch_size) / (time.perf_counter() - start)


def decoder_rates(
    images: Sequence[bytes], backends: str, batch_size: int, region: bool, seconds: float
) -> dict:
    """nvImageCodec alone: `images` decoded in batches (the crop windows only if `region`)."""
    nvimgcodec = gpu_decode.import_nvimgcodec()
    device = jax.local_devices()[0]
    decoder = gpu_decode.create_decoder(device, _backends(backends))
    params = nvimgcodec.DecodeParams(apply_exif_orientation=False)
    streams = []
    for data, box in zip(images, _boxes(images), strict=True):
        if box is not None:
            stream = nvimgcodec.CodeStream(data)
            if region:
                window = nvimgcodec.Region(box[0], box[1], box[0] + box[2], box[1] + box[3])
                stream = stream.get_sub_code_stream(region=window)
            streams.append(stream)
    decoded = [0, 0]

    def run(batch, wait):
        output = decoder.decode(batch, params=params)
        done = [image for image in output if image is not None]
        decoded[0] += len(done)
        decoded[1] += len(output)
        if wait and done:
            np.asarray(done[-1].cpu())  # waits for the device

    rate = _time(run, _batches(streams, batch_size), batch_size, seconds)
    return dict(
        kind="gpu_decoder",
        backends=backends,
        batch_size=batch_size,
        region=region,
        img_per_s=rate * decoded[0] / max(decoded[1], 1),
        decoded_fraction=decoded[0] / max(decoded[1], 1),
        device=str(device.device_kind),
    )


def pipeline_rates(images: Sequence[bytes], batch_size: int, size: int, seconds: float) -> dict:
    """`gpu_decode.GpuDecoder` (default backends): encoded batches of `images` -> uint8
    [B, size, size, 3] on the device, the resize program included."""
    device = jax.local_devices()[0]
    decoder = gpu_decode.GpuDecoder(device, size, decode.Decoder())
    boxes = _boxes(images)
    items = [(data, box) for data, box in zip(images, boxes, strict=True) if box is not None]
    encoded_batches = [_encoded(b, size) for b in _take(_batches(items, batch_size), 8)]

    def run(batch, wait):
        output = decoder(batch)["image"]
        if wait:
            output.block_until_ready()

    def cycle():
        while True:
            yield from encoded_batches

    rate = _time(run, cycle(), batch_size, seconds)
    return dict(
        kind="gpu_decode_pipeline",
        batch_size=batch_size,
        size=size,
        img_per_s=rate,
        counts=decoder.counts,
        device=str(device.device_kind),
    )


def _take(iterator: Iterator, count: int) -> list:
    return [next(iterator) for _ in range(count)]


def _encoded(items: list[tuple[bytes, crop.Box]], size: int) -> dict[str, np.ndarray]:
    """An encoded batch (`encoded.py`) of (JPEG bytes, window) pairs, none decoded on the host."""
    return {
        **encoded.pack([data for data, _ in items]),
        "box": np.array([box for _, box in items], np.int32),
        "host_image": np.zeros((0, size, size, 3), np.uint8),
        "host_index": np.zeros(0, np.int32),
        "label": np.zeros(len(items), np.int32),
    }


def accuracy(images: Sequence[bytes], backends: str, size: int, batch_size: int = 64) -> dict:
    """|difference| (mean, max) of the GPU decode path's images with `backends` against the same
    path on nvImageCodec's CPU backend (the same resize) and against the host decoder's crops of
    the same windows (simplejpeg + OpenCV, as `decode_on='host'` makes them)."""
    items = [(data, box) for data, box in zip(images, _boxes(images), strict=True) if box]
    items = items[:batch_size]
    batch = _encoded(items, size)
    host_decoder = decode.Decoder()
    gpu = gpu_decode.GpuDecoder(jax.local_devices()[0], size, host_decoder, _backends(backends))
    cpu = gpu_decode.GpuDecoder(jax.devices("cpu")[0], size, host_decoder)
    on_gpu = np.asarray(gpu(batch)["image"], np.int32)
    host = [host_decoder.decode_crop(data, lambda h, w, box=box: box, size) for data, box in items]
    record = dict(kind="gpu_decode_accuracy", backends=backends, size=size, images=len(items))
    for name, other in (("cpu_backend", cpu(batch)["image"]), ("host", np.stack(host))):
        difference = np.abs(on_gpu - np.asarray(other, np.int32))
        record |= {
            f"vs_{name}_mean": float(difference.mean()),
            f"vs_{name}_max": int(difference.max()),
        }
    return record | dict(counts=gpu.counts)
