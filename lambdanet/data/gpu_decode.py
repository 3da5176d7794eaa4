"""The ArrayRecord path with JPEGs decoded on the GPU (`config.dataset.decode_on='gpu'`).

Grain workers read the records and draw each example's crop window from its JPEG header as the
host path does (`encoded.py`); the training process decodes the windows with nvImageCodec
(region-of-interest decoding: only the window) straight into a canvas on its first local device,
uint8 [B C, C, 3] with window k at rows k C..k C + h_k, columns 0..w_k (C: the batch's largest
window side, rounded up to `CANVAS_STEP`), and one compiled program resamples every window to
S x S (`resize_windows`: bilinear, antialiased when shrinking, as `jax.image.scale_and_translate`).
Batches are made ahead of the train step (`sharding.prefetch_to_device`), so a batch decodes
while the previous step runs. Flip, RandAugment and mixup stay in the train step.

nvImageCodec's backends: the GPU's hardware JPEG engines (HW_GPU_ONLY), CUDA (GPU_ONLY), CUDA with
Huffman decoding on the CPU (HYBRID_CPU_GPU), each taking the images the previous does not
decode. On a CPU device (tests, CI) the same code runs on nvImageCodec's CPU backend.

Slots the device does not decode fall back to the host decoder (`decode.Decoder`), counted and
logged once: the workers' (`encoded.py`: not a YCbCr/grey JPEG, a window over `MAX_CROP`, a
corrupt record, replaced as on the host path) and those nvImageCodec returns none for, decoded
here from the same bytes and window (a zero image, with a warning, if that fails too).
"""

import dataclasses
import functools
import importlib
import itertools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from lambdanet.data import array_record, batching, decode, encoded

INSTALL = "pip install 'lambdanet[gpu-decode]'"
DEVICE_BACKENDS = ("HW_GPU_ONLY", "GPU_ONLY", "HYBRID_CPU_GPU")
CANVAS_STEP = 128
MAX_CROP = 1024  # larger windows are decoded by the workers (they would enlarge every canvas)


def import_nvimgcodec():
    """nvImageCodec's module; an ImportError naming the extra that installs it."""
    try:
        nvimgcodec = importlib.import_module("nvidia.nvimgcodec")
    except ImportError as error:
        raise ImportError(
            f"config.dataset.decode_on='gpu' needs nvImageCodec ({error}): install it with "
            f"`{INSTALL}`, or decode on the host (--config.dataset.decode_on=host)."
        ) from None
    return nvimgcodec


def create_decoder(device: jax.Device, backends: Sequence | None = None):
    """An nvImageCodec Decoder on `device`'s GPU with `backends` (nvimgcodec.Backend; default
    `DEVICE_BACKENDS` in that order), or on the CPU backend where `device` is a CPU."""
    nvimgcodec = import_nvimgcodec()
    if device.platform == "cpu":
        return nvimgcodec.Decoder(
            device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY,
            backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)],
        )
    if backends is None:
        backends = [nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, k)) for k in DEVICE_BACKENDS]
    return nvimgcodec.Decoder(device_id=device.local_hardware_id, backends=backends)


def canvas_side(boxes: np.ndarray) -> int:
    """The canvas side C for windows `boxes` int [n, 4]: the longest side rounded up to
    `CANVAS_STEP` (so a few compiled programs serve every batch)."""
    longest = int(boxes[:, 2:].max(initial=1))
    return -(-longest // CANVAS_STEP) * CANVAS_STEP


def _weights(lengths: jax.Array, canvas: int, size: int) -> jax.Array:
    """float32 [B, size, canvas]: for window b of `lengths[b]` pixels along one axis (0: none),
    the weights of canvas pixels 0..canvas-1 for each of `size` output pixels; the triangle kernel
    of `jax.image.scale_and_translate` (method='linear', antialias=True), normalised over the
    window's pixels only, so what lies beyond the window counts for nothing."""
    step = jnp.maximum(lengths, 1)[:, None, None] / size  # input pixels per output pixel
    centre = (jnp.arange(size)[None, :, None] + 0.5) * step - 0.5
    pixel = jnp.arange(canvas)[None, None, :]
    weight = jnp.maximum(0.0, 1.0 - jnp.abs(centre - pixel) / jnp.maximum(step, 1.0))
    weight = jnp.where(pixel < lengths[:, None, None], weight, 0.0)
    return weight / jnp.maximum(weight.sum(-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnums=4)
def resize_windows(
    canvas: jax.Array, sizes: jax.Array, host_image: jax.Array, host_index: jax.Array, size: int
) -> jax.Array:
    """canvas uint8 [B C, C, 3] (window k at [k C : k C + h, :w]), sizes int32 [B, 2] = (h, w)
    (0: no window) -> uint8 [B, size, size, 3]: every window resampled to size x size
    (`_weights`), then host_image uint8 [F, size, size, 3] put at slots host_index int32 [F]
    (index B: dropped)."""
    canvas = canvas.reshape(len(sizes), -1, *canvas.shape[1:])
    rows = _weights(sizes[:, 0], canvas.shape[1], size)
    cols = _weights(sizes[:, 1], canvas.shape[2], size)
    images = jnp.einsum("bsy,byxc->bsxc", rows, canvas.astype(jnp.float32))
    images = jnp.einsum("btx,bsxc->bstc", cols, images)
    images = jnp.clip(jnp.round(images), 0, 255).astype(jnp.uint8)
    return images.at[host_index].set(host_image, mode="drop")


@dataclasses.dataclass(frozen=True)
class _DeviceWindow:
    """Window (height x width) of a canvas row on the GPU, as nvImageCodec takes an output
    buffer: `row_bytes` apart, starting at device address `pointer`."""

    pointer: int
    height: int
    width: int
    row_bytes: int

    @property
    def __cuda_array_interface__(self) -> dict:
        return {
            "shape": (self.height, self.width, 3),
            "typestr": "|u1",
            "data": (self.pointer, False),
            "strides": (self.row_bytes, 3, 1),
            "version": 3,
        }


def _window(canvas: jax.Array, top: int, height: int, width: int) -> _DeviceWindow:
    """Rows top..top+height, columns 0..width of `canvas` uint8 [H, W, 3] on a GPU."""
    row = canvas.shape[1] * 3
    return _DeviceWindow(canvas.unsafe_buffer_pointer() + top * row, int(height), int(width), row)


class GpuDecoder:
    """Encoded batch (`encoded.py`) -> {'image': uint8 [B, S, S, 3] on `device`, 'label'}."""

    def __init__(self, device: jax.Device, size: int, host_decoder: decode.Decoder, backends=None):
        self.nvimgcodec = import_nvimgcodec()
        self.device, self.size, self.host_decoder = device, size, host_decoder
        self.decoder = create_decoder(device, backends)
        self.params = self.nvimgcodec.DecodeParams(
            apply_exif_orientation=False,  # as libjpeg-turbo on the host path: the stored pixels
            color_spec=self.nvimgcodec.ColorSpec.SRGB,
            sample_format=self.nvimgcodec.SampleFormat.I_RGB,
        )
        on_gpu = device.platform != "cpu"
        self.stream = device.get_stream_for_external_ready_events() if on_gpu else 0
        self.counts = {"device": 0, "workers_host": 0, "here_host": 0}
        self._in_use = None  # the last canvas on the GPU, kept until its program has run

    def __call__(self, batch: dict[str, np.ndarray]) -> dict:
        boxes, offsets = batch["box"], batch["offsets"]
        slots = np.flatnonzero(np.diff(offsets))
        side = canvas_side(boxes[slots])
        canvas, windows = self._canvas(len(boxes), side, boxes, slots)
        decoded = self._decode(batch["jpeg"], offsets, boxes, slots, windows)
        failed = [k for k, image in zip(slots, decoded, strict=True) if image is None]
        done = np.setdiff1d(slots, failed)
        sizes = np.zeros((len(boxes), 2), np.int32)
        sizes[done] = boxes[done, 2:]
        host_image, host_index = self._host_images(batch, failed)
        self._count(len(done), len(batch["host_index"]), len(failed))
        canvas = self._on_device(canvas)
        image = resize_windows(canvas, sizes, host_image, host_index, self.size)
        return {"image": image, "label": batch["label"]}

    def _canvas(self, slots: int, side: int, boxes: np.ndarray, decoded: np.ndarray):
        """(canvas uint8 [slots side, side, 3] on the device, or the host for a CPU device, the
        nvImageCodec images of its windows at `decoded`)."""
        shape = (slots * side, side, 3)
        if self.device.platform == "cpu":
            canvas = np.zeros(shape, np.uint8)
            views = [canvas[k * side :][: boxes[k, 2], : boxes[k, 3]] for k in decoded]
            return canvas, [self.nvimgcodec.as_image(view) for view in views]
        # Written by nvImageCodec, read through the view `_on_device` makes.
        canvas = jnp.zeros(shape, jnp.uint8, device=self.device).block_until_ready()
        windows = [_window(canvas, k * side, *boxes[k, 2:]) for k in decoded]
        return canvas, [self.nvimgcodec.as_image(window, self.stream) for window in windows]

    def _on_device(self, canvas) -> jax.Array:
        """The canvas as the resize program reads it: on a GPU a view of its memory imported
        through DLPack, which orders the program after nvImageCodec's writes on `self.stream`
        (a JAX array made before them would not wait for them)."""
        if self.device.platform == "cpu":
            return jax.device_put(canvas, self.device)
        self._in_use = canvas  # the view does not own the memory
        whole = self.nvimgcodec.as_image(_window(canvas, 0, *canvas.shape[:2]), self.stream)
        return jax.dlpack.from_dlpack(whole)

    def _decode(self, jpeg, offsets, boxes, slots, windows) -> list:
        """Decodes the windows of `slots` into `windows`; None where nvImageCodec could not."""
        if not len(slots):
            return []
        region = self.nvimgcodec.Region
        streams = [
            self.nvimgcodec.CodeStream(jpeg[offsets[k] : offsets[k + 1]]).get_sub_code_stream(
                region=region(*boxes[k, :2], *(boxes[k, :2] + boxes[k, 2:]))
            )
            for k in slots
        ]
        return self.decoder.decode(
            streams, images=windows, params=self.params, cuda_stream=self.stream
        )

    def _host_images(self, batch: dict, failed: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The host-decoded images [F', S, S, 3] and their slots [F'] (the workers' and `failed`,
        decoded here), F' padded up to a power of two with slot B (dropped)."""
        here = [self._host_decode(batch, k) for k in failed]
        images = np.concatenate([batch["host_image"], *here])
        index = np.concatenate([batch["host_index"], np.asarray(failed, np.int32)])
        pad = (1 << (len(index) - 1).bit_length() if len(index) else 0) - len(index)
        images = np.concatenate([images, np.zeros((pad, *self._shape), np.uint8)])
        return images, np.concatenate([index, np.full(pad, len(batch["label"]), np.int32)])

    @property
    def _shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, 3)

    def _host_decode(self, batch: dict, k: int) -> np.ndarray:
        """Slot k decoded on the host from its bytes and window: uint8 [1, S, S, 3]."""
        data = batch["jpeg"][batch["offsets"][k] : batch["offsets"][k + 1]].tobytes()
        box = tuple(int(v) for v in batch["box"][k])
        try:
            return self.host_decoder.decode_crop(data, lambda height, width: box, self.size)[None]
        except decode.DecodeError as error:
            logging.warning("Slot %d decodes nowhere (%s); a zero image in its place.", k, error)
            return np.zeros((1, *self._shape), np.uint8)

    def _count(self, device: int, workers_host: int, here_host: int) -> None:
        """Counts where images were decoded; logs the first time any fell back to the host."""
        before = self.counts["workers_host"] + self.counts["here_host"]
        self.counts["device"] += device
        self.counts["workers_host"] += workers_host
        self.counts["here_host"] += here_host
        if not before and workers_host + here_host:
            logging.warning(
                "GPU decoding: %d of a batch's images decoded on the host instead (%d by the "
                "workers: not YCbCr/grey JPEGs, windows over %d px or corrupt records; %d that "
                "nvImageCodec did not decode); the decoder's `counts` keeps the totals.",
                workers_host + here_host,
                workers_host,
                MAX_CROP,
                here_host,
            )


class GpuDecodeSource(array_record.ArrayRecordSource):
    """The ArrayRecord source (`array_record.py`) whose workers send JPEG bytes and crop windows
    (`encoded.py`), decoded by `GpuDecoder` on the first local device: the same batches and eval
    padding, the images decoded by another decoder."""

    def __init__(self, config, batch: batching.Batching, device: jax.Device | None = None):
        import_nvimgcodec()  # before any worker starts
        super().__init__(config, batch)
        images = self.train_batch.images
        self.train_batch = encoded.TrainBatches(
            self.train_batch, encoded.Encoder(self.train, images, MAX_CROP)
        )
        self.eval_batch = encoded.EvalBatches(
            self.eval_batch, encoded.Encoder(self.evaluation, images, MAX_CROP)
        )
        device = device or jax.local_devices()[0]
        self.decoder = GpuDecoder(device, config.image_size, self.train.decoder)

    def train_iter(self, start_step: int = 0) -> Iterator[dict]:
        batches = super().train_iter(start_step)
        try:
            yield from self._decoded(batches)
        finally:
            batches.close()  # stops the Grain workers

    def eval_iter(self) -> Iterator[dict]:
        import grain

        start, stop = self.batching.eval_shard(self.num_eval_examples)
        slots = self.batching.local_eval_batch_size
        num_batches = -(-(stop - start) // slots)
        batches = self._iterate(grain.MapDataset.range(num_batches).map(self.eval_batch))
        empty = self.eval_batch.encode(np.zeros(0, np.int64), [], slots) | {"count": 0}
        padding = itertools.repeat(empty, self.num_eval_batches - num_batches)
        try:
            yield from self._decoded(itertools.chain(batches, padding))
        finally:
            batches.close()

    def _decoded(self, batches: Iterator[dict]) -> Iterator[dict]:
        """Decodes `batches`; eval batches (with 'count') get 'mask' bool [B]."""
        for batch in batches:
            decoded = self.decoder(batch)
            if "count" in batch:
                decoded["mask"] = np.arange(len(batch["label"])) < batch["count"]
            yield decoded
