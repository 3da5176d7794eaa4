"""Image augmentation in JAX, applied inside the jitted train/eval step on the device.

Images are `[b, H, W, 3]` batches with values in [0, 255] (uint8 or float). Every random function
takes one `jax.Array` key for the whole batch and is deterministic for a fixed key.

* Inception-style random resized crop (Szegedy et al. 2015; the paper's "standard augmentation",
  Appendix E.2) and the eval resize + center crop (crop fraction 0.875, i.e. 224 of 256); their
  windows are `crop.py`'s, which every input path shares.
* RandAugment (Cubuk et al. 2020) with the 16 operations and magnitude rules of the reference
  TF implementation that ResNet-RS (and hence the paper's 350-epoch recipe) uses
  (`tensorflow/tpu` `autoaugment.distort_image_with_randaugment`): each layer picks one operation
  uniformly and applies it with a probability drawn from U(0.2, 0.8). [R] Translate (100 px) and
  cutout (40 px) are defined at 224 px there; here they scale with the image side.
* Mixup (Zhang et al. 2018), off by default.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from lambdanet.data import crop

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255.0
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255.0

_MAX_LEVEL = 10.0  # RandAugment magnitudes are given out of 10 (M=15 extrapolates).
_FILL_VALUE = 128.0  # RandAugment's replace value for pixels moved in from outside the image.
_TRANSLATE_FRACTION = 100.0 / 224.0
_CUTOUT_FRACTION = 40.0 / 224.0


def normalize(images: jax.Array) -> jax.Array:
    """[b, H, W, 3] in [0, 255] -> float32, minus the ImageNet mean, divided by its std."""
    return (images.astype(jnp.float32) - IMAGENET_MEAN) / IMAGENET_STD


def crop_and_resize(image: jax.Array, box: jax.Array, size: int) -> jax.Array:
    """Resamples the window `box` = (top, left, height, width) of `image` [H, W, C] to
    [size, size, C].

    Bilinear with antialiasing when shrinking; the box may have fractional coordinates.
    """
    scale = size / box[2:]
    return jax.image.scale_and_translate(
        image.astype(jnp.float32),
        (size, size, image.shape[-1]),
        spatial_dims=(0, 1),
        scale=scale,
        translation=-box[:2] * scale,
        method="linear",
        antialias=True,
    )


def sample_crop_box(
    rng: jax.Array,
    height: int,
    width: int,
    area_range: tuple[float, float],
    aspect_ratio_range: tuple[float, float],
    max_attempts: int = 10,
) -> jax.Array:
    """An Inception crop window float32 [4] = (top, left, height, width), drawn from `rng`.

    The device twin of `crop.sample_crop_box`: the same arithmetic (`crop.inception_box`) on
    `jax.random` draws, in fractional pixels (`crop.py`'s docstring says why).
    """
    area_key, ratio_key, offset_key = jax.random.split(rng, 3)
    fraction = jax.random.uniform(
        area_key, (max_attempts,), minval=area_range[0], maxval=area_range[1]
    )
    log_ratio = jax.random.uniform(
        ratio_key,
        (max_attempts,),
        minval=math.log(aspect_ratio_range[0]),
        maxval=math.log(aspect_ratio_range[1]),
    )
    offset = jax.random.uniform(offset_key, (2,))
    box = crop.inception_box(fraction, log_ratio, offset, height, width, whole_pixels=False, xp=jnp)
    return jnp.stack(box).astype(jnp.float32)


def random_resized_crop(
    images: jax.Array,
    rng: jax.Array,
    size: int,
    area_range: tuple[float, float] = (0.08, 1.0),
    aspect_ratio_range: tuple[float, float] = (3 / 4, 4 / 3),
) -> jax.Array:
    """[b, H, W, 3] -> float32 [b, size, size, 3]: one Inception crop per image, resized."""
    _, height, width, _ = images.shape
    keys = jax.random.split(rng, images.shape[0])
    boxes = jax.vmap(lambda k: sample_crop_box(k, height, width, area_range, aspect_ratio_range))(
        keys
    )
    return jax.vmap(crop_and_resize, in_axes=(0, 0, None))(images, boxes, size)


def center_crop(images: jax.Array, size: int, crop_fraction: float) -> jax.Array:
    """[b, H, W, 3] -> float32 [b, size, size, 3]: the central `crop_fraction` square, resized."""
    box = crop.center_crop_box(images.shape[1], images.shape[2], crop_fraction, whole_pixels=False)
    box = jnp.array(box, jnp.float32)
    return jax.vmap(crop_and_resize, in_axes=(0, None, None))(images, box, size)


def random_flip(images: jax.Array, rng: jax.Array) -> jax.Array:
    """Flips each image of [b, H, W, C] left-right with probability 1/2."""
    flip = jax.random.bernoulli(rng, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1], images)


def mixup(
    images: jax.Array, labels: jax.Array, rng: jax.Array, alpha: float, num_classes: int
) -> tuple[jax.Array, jax.Array]:
    """Mixes each example with its mirror in the batch, weight lam ~ Beta(alpha, alpha) per batch.

    Returns (images [b, H, W, 3] float32, soft labels [b, num_classes] float32).
    """
    lam = jax.random.beta(rng, alpha, alpha)
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    images = images.astype(jnp.float32)
    return lam * images + (1 - lam) * images[::-1], lam * one_hot + (1 - lam) * one_hot[::-1]


# RandAugment. Geometric operations return the 2x3 matrix mapping output (y, x, 1) to input
# (y, x); pixel operations map an image [H, W, 3] (integer-valued floats in [0, 255]) to another.


def _rotate(level, height, width):
    angle = jnp.deg2rad(level / _MAX_LEVEL * 30.0)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    center = jnp.array([(height - 1) / 2, (width - 1) / 2])
    rotation = jnp.array([[cos, -sin], [sin, cos]])
    return jnp.concatenate([rotation, (center - rotation @ center)[:, None]], axis=1)


def _shear_x(level, height, width):
    return jnp.array([[1.0, 0.0, 0.0], [level / _MAX_LEVEL * 0.3, 1.0, 0.0]])


def _shear_y(level, height, width):
    return jnp.array([[1.0, level / _MAX_LEVEL * 0.3, 0.0], [0.0, 1.0, 0.0]])


def _translate_x(level, height, width):
    shift = level / _MAX_LEVEL * _TRANSLATE_FRACTION * width
    return jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, shift]])


def _translate_y(level, height, width):
    shift = level / _MAX_LEVEL * _TRANSLATE_FRACTION * height
    return jnp.array([[1.0, 0.0, shift], [0.0, 1.0, 0.0]])


def _identity_matrix(level, height, width):
    return jnp.eye(2, 3)


def _warp(image: jax.Array, matrix: jax.Array) -> jax.Array:
    """Bilinear inverse warp of [H, W, 3]: output (y, x) reads input matrix @ (y, x, 1)."""
    height, width, _ = image.shape
    grid = jnp.stack(jnp.meshgrid(jnp.arange(height), jnp.arange(width), indexing="ij"))
    coords = (
        jnp.einsum("ij,jhw->ihw", matrix[:, :2], grid.astype(jnp.float32)) + matrix[:, 2:, None]
    )
    sample = lambda channel: jax.scipy.ndimage.map_coordinates(
        channel, list(coords), order=1, mode="constant", cval=_FILL_VALUE
    )
    return jax.vmap(sample, in_axes=2, out_axes=2)(image)


def _blend(degenerate, image, factor):
    return jnp.clip(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _enhance_factor(level):
    return level / _MAX_LEVEL * 1.8 + 0.1


def _grayscale(image):
    return jnp.round(image @ jnp.array([0.299, 0.587, 0.114]))[..., None]  # ITU-R 601, as PIL


def _auto_contrast(image, level, key):
    low, high = image.min(axis=(0, 1)), image.max(axis=(0, 1))
    scale = 255.0 / jnp.maximum(high - low, 1.0)
    return jnp.where(high > low, jnp.clip((image - low) * scale, 0.0, 255.0), image)


def _equalize_channel(channel):
    values = channel.astype(jnp.int32)
    histogram = jnp.bincount(values.ravel(), length=256)
    step = (values.size - histogram[values.max()]) // 255
    lut = (jnp.cumsum(histogram) + step // 2) // jnp.maximum(step, 1)
    lut = jnp.clip(jnp.concatenate([jnp.zeros(1, lut.dtype), lut[:-1]]), 0, 255)
    return jnp.where(step == 0, channel, lut[values].astype(channel.dtype))


def _equalize(image, level, key):
    return jax.vmap(_equalize_channel, in_axes=2, out_axes=2)(image)


def _invert(image, level, key):
    return 255.0 - image


def _posterize(image, level, key):
    shift = 2.0 ** (8 - jnp.clip(jnp.floor(jnp.abs(level) / _MAX_LEVEL * 4), 0, 8))
    return jnp.floor(image / shift) * shift


def _solarize(image, level, key):
    threshold = jnp.floor(jnp.abs(level) / _MAX_LEVEL * 256)
    return jnp.where(image < threshold, image, 255.0 - image)


def _solarize_add(image, level, key):
    added = jnp.clip(image + jnp.floor(jnp.abs(level) / _MAX_LEVEL * 110), 0.0, 255.0)
    return jnp.where(image < 128, added, image)


def _color(image, level, key):
    return _blend(_grayscale(image), image, _enhance_factor(jnp.abs(level)))


def _contrast(image, level, key):
    # Blends towards the mean grey level, as PIL does (the TF reference uses pixel count / 256).
    return _blend(jnp.mean(_grayscale(image)), image, _enhance_factor(jnp.abs(level)))


def _brightness(image, level, key):
    return _blend(jnp.zeros_like(image), image, _enhance_factor(jnp.abs(level)))


def _sharpness(image, level, key):
    kernel = jnp.array([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    smooth = jax.vmap(
        lambda c: jax.scipy.signal.convolve2d(c, kernel, mode="valid"), in_axes=2, out_axes=2
    )(image)
    degenerate = image.at[1:-1, 1:-1].set(jnp.round(smooth))
    return _blend(degenerate, image, _enhance_factor(jnp.abs(level)))


def _cutout(image, level, key):
    height, width, _ = image.shape
    half = jnp.abs(level) / _MAX_LEVEL * _CUTOUT_FRACTION * min(height, width)
    center = jax.random.uniform(key, (2,)) * jnp.array([height, width])
    rows = jnp.abs(jnp.arange(height) + 0.5 - center[0]) < half
    cols = jnp.abs(jnp.arange(width) + 0.5 - center[1]) < half
    return jnp.where((rows[:, None] & cols[None, :])[..., None], _FILL_VALUE, image)


def _keep(image, level, key):
    return image


# (name, geometric part, pixel part); the order is the reference's `available_ops`.
_RAND_AUGMENT_OPS = (
    ("AutoContrast", _identity_matrix, _auto_contrast),
    ("Equalize", _identity_matrix, _equalize),
    ("Invert", _identity_matrix, _invert),
    ("Rotate", _rotate, _keep),
    ("Posterize", _identity_matrix, _posterize),
    ("Solarize", _identity_matrix, _solarize),
    ("Color", _identity_matrix, _color),
    ("Contrast", _identity_matrix, _contrast),
    ("Brightness", _identity_matrix, _brightness),
    ("Sharpness", _identity_matrix, _sharpness),
    ("ShearX", _shear_x, _keep),
    ("ShearY", _shear_y, _keep),
    ("TranslateX", _translate_x, _keep),
    ("TranslateY", _translate_y, _keep),
    ("Cutout", _identity_matrix, _cutout),
    ("SolarizeAdd", _identity_matrix, _solarize_add),
)
RAND_AUGMENT_OP_NAMES = tuple(name for name, _, _ in _RAND_AUGMENT_OPS)


def apply_rand_augment_op(image: jax.Array, op: jax.Array, level: jax.Array, key: jax.Array):
    """Applies operation number `op` of RAND_AUGMENT_OP_NAMES at signed `level` to [H, W, 3].

    Geometric operations use the sign of `level` as their direction; the others use |level|.
    The result is rounded: images stay integer-valued, as the reference's uint8 images do.
    """
    height, width, _ = image.shape
    matrices = [lambda lv, geo=geo: geo(lv, height, width) for _, geo, _ in _RAND_AUGMENT_OPS]
    warped = _warp(image, jax.lax.switch(op, matrices, level))
    pixel_ops = [pixel for _, _, pixel in _RAND_AUGMENT_OPS]
    return jnp.round(jax.lax.switch(op, pixel_ops, warped, level, key))


def _rand_augment_layer(image, key, magnitude: float):
    op_key, prob_key, apply_key, sign_key, op_rng = jax.random.split(key, 5)
    op = jax.random.randint(op_key, (), 0, len(_RAND_AUGMENT_OPS))
    level = jnp.where(jax.random.bernoulli(sign_key), magnitude, -magnitude)
    apply = jax.random.uniform(apply_key) < jax.random.uniform(prob_key, minval=0.2, maxval=0.8)
    return jnp.where(apply, apply_rand_augment_op(image, op, level, op_rng), image)


def _rand_augment_image(image, rng, num_layers: int, magnitude: float):
    layer = lambda image, key: (_rand_augment_layer(image, key, magnitude), None)
    image = jnp.clip(jnp.round(image), 0.0, 255.0)
    return jax.lax.scan(layer, image, jax.random.split(rng, num_layers))[0]


def rand_augment(images: jax.Array, rng: jax.Array, num_layers: int, magnitude: float) -> jax.Array:
    """RandAugment(N=num_layers, M=magnitude) of [b, H, W, 3] in [0, 255] -> float32, same shape."""
    keys = jax.random.split(rng, images.shape[0])
    augment = lambda image, key: _rand_augment_image(image, key, num_layers, magnitude)
    return jax.vmap(augment)(images.astype(jnp.float32), keys)


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """The on-device part of the input pipeline (`Dataset.device_preprocess`).

    crop_on_device: True for the in-memory path, whose host batches are whole stored images
      [b, H, W, 3]; False for the TF path, whose host batches are already cropped to image_size.
    """

    image_size: int
    num_classes: int
    crop_on_device: bool
    eval_crop_fraction: float = 0.875
    train_crop_area: tuple[float, float] = (0.08, 1.0)
    train_crop_aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    horizontal_flip: bool = True
    randaugment_layers: int = 0
    randaugment_magnitude: float = 10.0
    mixup_alpha: float = 0.0

    def __call__(self, batch: dict, rng: jax.Array, train: bool) -> dict:
        """Returns `batch` with 'image' float32 [b, S, S, 3] normalised (S = image_size).

        With mixup (train, mixup_alpha > 0) it also holds 'soft_label' float32 [b, num_classes].
        """
        batch = dict(batch)
        images = batch["image"]
        if not train:
            if self.crop_on_device:
                images = center_crop(images, self.image_size, self.eval_crop_fraction)
            batch["image"] = normalize(images)
            return batch
        crop_key, flip_key, rand_augment_key, mixup_key = jax.random.split(rng, 4)
        if self.crop_on_device:
            images = random_resized_crop(
                images,
                crop_key,
                self.image_size,
                self.train_crop_area,
                self.train_crop_aspect_ratio,
            )
        if self.horizontal_flip:
            images = random_flip(images, flip_key)
        if self.randaugment_layers:
            images = rand_augment(
                images, rand_augment_key, self.randaugment_layers, self.randaugment_magnitude
            )
        if self.mixup_alpha > 0:
            images, batch["soft_label"] = mixup(
                images, batch["label"], mixup_key, self.mixup_alpha, self.num_classes
            )
        batch["image"] = normalize(images)
        return batch


def from_config(config, num_classes: int, crop_on_device: bool) -> Augmentation:
    """The Augmentation a dataset config (`config.dataset`) asks for."""
    randaugment = config.randaugment
    fields = {}
    if randaugment:
        if set(randaugment) != {"num_layers", "magnitude"}:
            raise ValueError(
                f"randaugment={dict(randaugment)} must be None or "
                "dict(num_layers=N, magnitude=M), e.g. dict(num_layers=2, magnitude=10)."
            )
        fields = dict(
            randaugment_layers=int(randaugment["num_layers"]),
            randaugment_magnitude=float(randaugment["magnitude"]),
        )
    return Augmentation(
        image_size=config.image_size,
        num_classes=num_classes,
        crop_on_device=crop_on_device,
        eval_crop_fraction=config.eval_crop_fraction,
        train_crop_area=tuple(config.train_crop_area),
        train_crop_aspect_ratio=tuple(config.train_crop_aspect_ratio),
        horizontal_flip=config.horizontal_flip,
        mixup_alpha=config.mixup_alpha,
        **fields,
    )
