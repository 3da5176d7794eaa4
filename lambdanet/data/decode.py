"""Host-side image decoding for the ArrayRecord path: decode + crop + resize to uint8 [S, S, 3].

The crop window (a `crop.BoxFn` of the image's size) is chosen from its header before decoding,
so a JPEG whose crop window shrinks by 2x or more is decoded at a reduced size (libjpeg-turbo's
DCT scaling: 1/2, 1/4 or 1/8, always keeping the window at least S x S); most of the IDCT,
colour-conversion and resize work is then skipped. Factors between 1 and 2 (7/8, 3/4, ...) are
not used: they decode slower than full size.

Decoders (`config.dataset.decoder`), all libjpeg-turbo underneath:
* 'simplejpeg': `simplejpeg.decode_jpeg` with min_height/min_width (the fastest measured:
  results/input_pipeline.md), optionally with the fast integer IDCT and chroma upsampling.
* 'opencv': `cv2.imdecode` with IMREAD_REDUCED_COLOR_{2,4,8}.
* 'pillow': `Image.draft`, then Pillow's antialiased bilinear resize.
The crop window is then resized to S x S bilinearly (OpenCV; its area filter where it still
shrinks 2x or more), 'pillow' with Pillow's antialiased bilinear filter as the tf.data path does.

Anything that is not a JPEG libjpeg-turbo decodes to RGB (CMYK JPEGs, PNG, ...) falls back to
Pillow at full size, with high-bit-depth images scaled to 8 bits (`to_rgb`); a file no decoder
reads raises `DecodeError`.
"""

import io
import math

import numpy as np
from PIL import Image

from lambdanet.data.crop import Box, BoxFn

DECODERS = ("simplejpeg", "opencv", "pillow")
_REDUCTIONS = (8, 4, 2)  # libjpeg-turbo's DCT scaling factors of 2x and more


class DecodeError(ValueError):
    """Raised for bytes that no decoder reads (corrupt, truncated, empty or not an image)."""


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any Pillow image -> RGB uint8 [H, W, 3]; 16- and 32-bit modes are scaled, not clipped.

    Pillow's own convert('RGB') clips 16-bit values at 255, which turns a 16-bit PNG nearly white.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        if image.mode == "I" and values.max() > 65535:
            peak = float(2**32 - 1)
        grey = np.clip(np.round(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    if image.mode == "F":
        grey = np.clip(np.round(np.asarray(image, np.float64) * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
    return np.asarray(image.convert("RGB"), np.uint8)


def pillow_decode(data: bytes) -> np.ndarray:
    """Any format Pillow reads -> RGB uint8 [H, W, 3]; DecodeError if it cannot."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return to_rgb(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise DecodeError(f"not a readable image ({error})") from None


def _reduction(box: Box, size: int) -> int:
    """The largest DCT reduction (8, 4, 2 or 1) that keeps the crop window >= size x size."""
    shortest = min(box[2], box[3])
    return next((r for r in _REDUCTIONS if shortest >= r * size), 1)


def _crop_resize(image: np.ndarray, box: Box, scale_y: float, scale_x: float, size: int):
    """Crops `box` (full-image pixels) out of `image` decoded at (scale_y, scale_x), resizes it."""
    import cv2

    top, left = round(box[0] * scale_y), round(box[1] * scale_x)
    bottom = max(top + 1, min(image.shape[0], round((box[0] + box[2]) * scale_y)))
    right = max(left + 1, min(image.shape[1], round((box[1] + box[3]) * scale_x)))
    window = image[top:bottom, left:right]
    if window.shape[:2] == (size, size):
        return window
    # After DCT scaling the window shrinks by less than 2x, where bilinear is close to an
    # antialiased filter at a fraction of the area filter's cost; beyond 2x (a crop too large
    # for 1/8 scaling, or a non-JPEG) the area filter keeps it from aliasing.
    heavy = min(window.shape[0], window.shape[1]) >= 2 * size
    return cv2.resize(
        window, (size, size), interpolation=cv2.INTER_AREA if heavy else cv2.INTER_LINEAR
    )


def _one_thread() -> None:
    """One decoding process per core, no thread pools inside: OpenCV's resize runs one thread per
    core by default in each (spawned) worker process, so n workers would run n x cores threads."""
    import cv2

    cv2.setNumThreads(1)


class Decoder:
    """decode_crop(bytes, box_fn, size) -> RGB uint8 [size, size, 3] with one of `DECODERS`."""

    def __init__(self, name: str = "simplejpeg", fast_dct: bool = True):
        if name not in DECODERS:
            raise ValueError(f"config.dataset.decoder={name!r}: use one of {DECODERS}.")
        self.name, self.fast_dct = name, fast_dct
        _one_thread()

    def __setstate__(self, state: dict) -> None:  # unpickled in a Grain worker process
        self.__dict__.update(state)
        _one_thread()

    def decode_crop(self, data: bytes, box_fn: BoxFn, size: int) -> np.ndarray:
        if not data:
            raise DecodeError("empty record")
        try:
            return getattr(self, f"_{self.name}")(data, box_fn, size)
        except (ValueError, OSError, SyntaxError):  # not a JPEG libjpeg-turbo reads as RGB
            image = pillow_decode(data)
            box = box_fn(*image.shape[:2])
            return _crop_resize(image, box, 1.0, 1.0, size)

    def _simplejpeg(self, data: bytes, box_fn: BoxFn, size: int) -> np.ndarray:
        import simplejpeg

        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("YCbCr", "Gray"):
            raise ValueError(f"JPEG colour space {colorspace}")
        box = box_fn(height, width)
        reduction = _reduction(box, size)
        image = simplejpeg.decode_jpeg(
            data,
            "RGB",
            fastdct=self.fast_dct,
            fastupsample=self.fast_dct,
            min_height=math.ceil(height / reduction),
            min_width=math.ceil(width / reduction),
            min_factor=reduction,
            strict=False,
        )
        return _crop_resize(image, box, image.shape[0] / height, image.shape[1] / width, size)

    def _opencv(self, data: bytes, box_fn: BoxFn, size: int) -> np.ndarray:
        import cv2

        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
            if header.format != "JPEG" or header.mode not in ("RGB", "L"):
                raise ValueError(f"{header.format} {header.mode}")
        box = box_fn(height, width)
        flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2}
        flags |= {4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags[_reduction(box, size)])
        if image is None:
            raise ValueError("OpenCV could not decode it")
        crop = _crop_resize(image, box, image.shape[0] / height, image.shape[1] / width, size)
        return cv2.cvtColor(crop, cv2.COLOR_BGR2RGB)

    def _pillow(self, data: bytes, box_fn: BoxFn, size: int) -> np.ndarray:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            box = box_fn(height, width)
            reduction = _reduction(box, size) if image.format == "JPEG" else 1
            if reduction > 1:
                image.draft("RGB", (math.ceil(width / reduction), math.ceil(height / reduction)))
            scale_x, scale_y = image.size[0] / width, image.size[1] / height
            top, left, h, w = box
            crop_box = (left * scale_x, top * scale_y, (left + w) * scale_x, (top + h) * scale_y)
            if image.mode not in ("RGB", "L"):
                raise ValueError(image.mode)
            image = image.convert("RGB").resize((size, size), Image.BILINEAR, box=crop_box)
            return np.asarray(image, np.uint8)
