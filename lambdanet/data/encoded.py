"""The Grain workers' half of GPU decoding (`gpu_decode.py`): records -> JPEG bytes + crop boxes.

A worker does the host work that is cheap: it reads a batch's records, parses each JPEG's header
for its size, and draws the crop window exactly as the host path does (`array_record._TrainBatches.
select` / `_EvalBatches.select`: the same BoxFns, called on the same header size), so a batch
stays a pure function of (seed, step). The training process decodes the windows on its device.

An encoded batch of B slots (a slot per example, in order):
* 'jpeg' uint8 [total]: the JPEG bytes of the slots the device decodes, back to back;
* 'offsets' int64 [B + 1]: slot k's bytes are jpeg[offsets[k]:offsets[k + 1]] (empty: not
  decoded on the device);
* 'box' int32 [B, 4]: (top, left, height, width) of slot k's window in full-image pixels;
* 'host_image' uint8 [F, S, S, 3], 'host_index' int32 [F]: the F slots the worker decoded itself
  with the host decoder (`decode.Decoder`, as the host path does), and where they go;
* 'label' int32 [B].
The worker decodes a slot itself when it is no baseline-readable JPEG (not YCbCr or grey: CMYK,
PNG, ...), does not read (a corrupt record, replaced by the next readable one as on the host path),
or when its window is larger than `max_crop` on a side (it would enlarge every image's canvas on
the device). This module imports numpy and the host decoders only (no JAX): the workers load it.
"""

import dataclasses

import numpy as np

from lambdanet.data import array_record, crop

# The colour spaces nvImageCodec decodes to RGB as libjpeg-turbo does (simplejpeg's names).
_DEVICE_COLOURSPACES = ("YCbCr", "Gray")


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a JPEG the device decodes (YCbCr or grey), else None."""
    import simplejpeg

    try:
        height, width, colourspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return (height, width) if colourspace in _DEVICE_COLOURSPACES else None


def _new(shape: tuple[int, ...], shared_memory: bool) -> np.ndarray:
    """An empty uint8 array, in shared memory in a Grain worker (which has none of size 0)."""
    if shared_memory and np.prod(shape):
        from grain.python import SharedMemoryArray

        return SharedMemoryArray(shape, np.uint8)
    return np.empty(shape, np.uint8)


def pack(jpegs: list[bytes], shared_memory: bool = False) -> dict[str, np.ndarray]:
    """'jpeg' uint8 [total] and 'offsets' int64 [n + 1] of the slots' bytes `jpegs` [n]."""
    offsets = np.zeros(len(jpegs) + 1, np.int64)
    np.cumsum([len(data) for data in jpegs], out=offsets[1:])
    buffer = _new((int(offsets[-1]),), shared_memory)
    buffer[:] = np.frombuffer(b"".join(jpegs), np.uint8)
    return {"jpeg": buffer, "offsets": offsets}


@dataclasses.dataclass(frozen=True)
class Encoder:
    """(indices, box_fns) -> the encoded batch of those records (module docstring)."""

    examples: array_record._Examples
    images: array_record._Images
    max_crop: int

    def __call__(self, indices: np.ndarray, box_fns: list[crop.BoxFn], slots: int) -> dict:
        """Encodes records `indices` [n] into `slots` >= n slots (slots past n stay empty)."""
        records = self.examples._read(indices.tolist()) if len(indices) else []
        boxes, labels = np.zeros((slots, 4), np.int32), np.zeros(slots, np.int32)
        jpegs, host = [b""] * slots, []
        for k, (record, box_fn) in enumerate(zip(records, box_fns, strict=True)):
            labels[k], _, image = array_record.decode_record(record)
            size = jpeg_size(image)
            if size is None:  # box_fn not called yet: the host decoder calls it, as today
                host.append((k, record, box_fn))
                continue
            box = box_fn(*size)
            if max(box[2], box[3]) > self.max_crop:
                host.append((k, record, lambda height, width, box=box: box))
                continue
            boxes[k], jpegs[k] = box, image
        return {
            **pack(jpegs, self.images.shared_memory),
            "box": boxes,
            **self._host_decode(host, indices, labels),
            "label": labels,
        }

    def _host_decode(self, host: list, indices: np.ndarray, labels: np.ndarray) -> dict:
        """Decodes the slots `host` [(k, record, box_fn)] on the host; sets their labels."""
        size = self.images.size
        images = _new((len(host), size, size, 3), self.images.shared_memory)
        for j, (k, record, box_fn) in enumerate(host):
            labels[k] = self.examples._decode_one(images, j, record, int(indices[k]), box_fn)
        return {"host_image": images, "host_index": np.array([k for k, *_ in host], np.int32)}


@dataclasses.dataclass(frozen=True)
class TrainBatches:
    """step -> this process's part of global train batch `step`, encoded (B slots)."""

    select: array_record._TrainBatches
    encode: Encoder

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        indices, box_fns = self.select.select(step)
        return self.encode(indices, box_fns, len(indices))


@dataclasses.dataclass(frozen=True)
class EvalBatches:
    """index -> eval batch `index` of this process's shard, encoded in B slots (the last batches
    may fill fewer: 'count' int [] says how many)."""

    select: array_record._EvalBatches
    encode: Encoder

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        indices, box_fns = self.select.select(index)
        slots = self.select.batching.local_eval_batch_size
        return self.encode(indices, box_fns, slots) | {"count": np.asarray(len(indices))}
