"""Crop windows, written once for every input path: the Inception crop and the central square.

A box is (top, left, height, width) in pixels of the full image of `height x width`.

* The ArrayRecord path (`decode.py`, in Grain workers) draws with numpy and crops whole pixels:
  `inception_box_fn`, `center_crop_box_fn`.
* The tf.data path (`input_pipeline.py`) draws with TF's stateless random ops inside the
  tf.data graph and applies the same formulas to TF tensors, in whole pixels. (Drawing with numpy
  there, through `tf.numpy_function`, deadlocks: a train iterator dropped while a crop is in
  flight waits, holding the GIL, for a map thread that waits for the GIL.)
* The in-memory path crops inside the jitted step on the device (`augment.random_resized_crop`,
  `augment.center_crop`): it draws with `jax.random` and keeps fractional boxes, which
  `jax.image.scale_and_translate` resamples with sub-pixel offsets, so small stored images
  (32 x 32 digits) are not snapped to a coarse grid.

So the paths differ only in their random source and in `whole_pixels`; the arithmetic is
`inception_box` and `center_crop_box`, written for an array namespace `xp` (numpy, jax.numpy, or
`input_pipeline`'s namespace of TF ops) that provides exp, sqrt, round, floor, minimum, maximum,
where, any and argmax. This module imports numpy only (no JAX, no TF): the Grain workers load it.
"""

import math
from collections.abc import Callable, Sequence

import numpy as np

Box = tuple[int, int, int, int]  # (top, left, height, width) in pixels of the full image
BoxFn = Callable[[int, int], Box]  # (height, width) -> Box


def inception_box(fraction, log_ratio, offset, height, width, whole_pixels: bool, xp=np):
    """The Inception crop window (Szegedy et al. 2015) of an image `height x width`, given draws.

    fraction [n]: candidate areas as fractions of the image, uniform in the area range.
    log_ratio [n]: their log aspect ratios (width / height), uniform in the log ratio range.
    offset [2]: uniform in [0, 1), places the window vertically and horizontally.
    The first of the n candidates that fits is used, the whole image when none fits (as
    `tf.image.sample_distorted_bounding_box` does). whole_pixels: sizes rounded to pixels and the
    window placed uniformly on the pixel grid; else fractional sizes placed in [0, side - size].
    Returns (top, left, h, w), scalars of xp (floats).
    """
    area = height * width * fraction
    ratio = xp.exp(log_ratio)
    crop_h, crop_w = xp.sqrt(area / ratio), xp.sqrt(area * ratio)
    if whole_pixels:
        crop_h, crop_w = xp.round(crop_h), xp.round(crop_w)
    fits = (crop_h > 0) & (crop_w > 0) & (crop_h <= height) & (crop_w <= width)
    first = xp.argmax(fits)
    h = xp.where(xp.any(fits), crop_h[first], height)
    w = xp.where(xp.any(fits), crop_w[first], width)
    if not whole_pixels:
        return offset[0] * (height - h), offset[1] * (width - w), h, w
    top = xp.minimum(xp.floor(offset[0] * (height - h + 1)), height - h)
    left = xp.minimum(xp.floor(offset[1] * (width - w + 1)), width - w)
    return top, left, h, w


def sample_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    area_range: tuple[float, float],
    aspect_ratio_range: tuple[float, float],
    max_attempts: int = 10,
) -> Box:
    """An Inception crop window in whole pixels (`inception_box`), drawn from `rng` on the host.

    Area uniform in `area_range` (fraction of the image), aspect ratio (width / height)
    log-uniform in `aspect_ratio_range`, `max_attempts` candidates.
    """
    fraction = rng.uniform(area_range[0], area_range[1], max_attempts)
    log_ratio = rng.uniform(
        math.log(aspect_ratio_range[0]), math.log(aspect_ratio_range[1]), max_attempts
    )
    offset = rng.uniform(size=2)
    return _whole(inception_box(fraction, log_ratio, offset, height, width, whole_pixels=True))


def inception_box_fn(
    entropy: Sequence[int],
    area_range: tuple[float, float],
    aspect_ratio_range: tuple[float, float],
) -> BoxFn:
    """The BoxFn of one example's Inception crop, drawn from a generator seeded with `entropy`
    (e.g. (seed, 1, stream position)), so the crop is a pure function of them: resume is exact."""
    rng = np.random.default_rng(list(entropy))
    return lambda height, width: sample_crop_box(rng, height, width, area_range, aspect_ratio_range)


def center_crop_box(height, width, crop_fraction: float, whole_pixels: bool = True, xp=np):
    """The centered square of side `crop_fraction * min(height, width)` (the eval crop).

    whole_pixels (host decoders, which slice): the side truncated to whole pixels (at least one)
    and centred on the pixel grid; else fractional (the device resamples it). Returns
    (top, left, side, side), scalars of xp (floats).
    """
    side = crop_fraction * xp.minimum(height, width)
    if not whole_pixels:
        return (height - side) / 2, (width - side) / 2, side, side
    side = xp.maximum(xp.floor(side), 1)
    return (height - side + 1) // 2, (width - side + 1) // 2, side, side


def center_crop_box_fn(crop_fraction: float) -> BoxFn:
    """The BoxFn of the eval crop in whole pixels (`center_crop_box`)."""
    return lambda height, width: _whole(center_crop_box(height, width, crop_fraction))


def _whole(box) -> Box:
    return tuple(int(value) for value in box)
