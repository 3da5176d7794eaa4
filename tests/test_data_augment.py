"""Tests of the on-device augmentation against naive references (PIL, numpy slicing)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from lambdanet.data import augment, crop

RNG = np.random.default_rng(0)
IMAGE = RNG.integers(0, 256, (24, 24, 3)).astype(np.uint8)


@functools.cache
def _apply_op():
    return jax.jit(augment.apply_rand_augment_op)


def _op(name: str, image: np.ndarray, level: float, key=0) -> np.ndarray:
    op = augment.RAND_AUGMENT_OP_NAMES.index(name)
    out = _apply_op()(jnp.asarray(image, jnp.float32), op, jnp.float32(level), jax.random.key(key))
    return np.asarray(out)


def test_center_crop_equals_slicing():
    images = RNG.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    out = jax.jit(augment.center_crop, static_argnums=(1, 2))(images, 16, 0.5)
    np.testing.assert_allclose(out, images[:, 8:24, 8:24], atol=1e-3)


def test_random_resized_crop_of_the_full_area_is_the_identity():
    images = RNG.integers(0, 256, (3, 20, 20, 3)).astype(np.uint8)
    crop = jax.jit(augment.random_resized_crop, static_argnums=(2, 3, 4))
    out = crop(images, jax.random.key(1), 20, (1.0, 1.0), (1.0, 1.0))
    np.testing.assert_allclose(out, images, atol=1e-3)


def test_crop_boxes_respect_area_ratio_and_bounds():
    keys = jax.random.split(jax.random.key(0), 2000)
    sample = lambda k: augment.sample_crop_box(k, 40, 60, (0.08, 1.0), (3 / 4, 4 / 3))
    boxes = np.asarray(jax.jit(jax.vmap(sample))(keys))
    top, left, height, width = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + height <= 40 + 1e-4).all() and (left + width <= 60 + 1e-4).all()
    area = height * width / (40 * 60)
    whole = np.isclose(area, 1.0)
    assert whole.mean() < 0.05  # the whole-image fallback is rare
    sampled = ~whole
    assert (area[sampled] >= 0.08 - 1e-4).all()
    ratio = width[sampled] / height[sampled]
    assert (ratio >= 3 / 4 - 1e-4).all() and (ratio <= 4 / 3 + 1e-4).all()
    assert 0.3 < area[sampled].mean() < 0.7  # roughly uniform in [0.08, 1]


def test_device_boxes_are_the_host_arithmetic_of_the_same_draws():
    """`augment.sample_crop_box` (jax.random draws, under jit) == `crop.inception_box` run by
    numpy on those draws; the host paths differ only in drawing with numpy in whole pixels."""
    area, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    log_ratio = (np.log(ratio[0]), np.log(ratio[1]))

    def device_box_and_draws(key):
        area_key, ratio_key, offset_key = jax.random.split(key, 3)  # the sampler's own draws
        draws = (
            jax.random.uniform(area_key, (10,), minval=area[0], maxval=area[1]),
            jax.random.uniform(ratio_key, (10,), minval=log_ratio[0], maxval=log_ratio[1]),
            jax.random.uniform(offset_key, (2,)),
        )
        return augment.sample_crop_box(key, 40, 60, area, ratio), draws

    keys = jax.random.split(jax.random.key(1), 500)
    boxes, draws = jax.device_get(jax.jit(jax.vmap(device_box_and_draws))(keys))
    for box, fraction, log_ratios, offset in zip(boxes, *draws, strict=True):
        host = crop.inception_box(fraction, log_ratios, offset, 40, 60, whole_pixels=False)
        np.testing.assert_allclose(box, np.asarray(host, np.float32), rtol=1e-5, atol=1e-4)
    fractional = crop.center_crop_box(37, 50, 0.875, whole_pixels=False)  # the device's
    assert fractional == (2.3125, 8.8125, 32.375, 32.375)
    assert crop.center_crop_box(37, 50, 0.875) == (3, 9, 32, 32)  # the host's, in whole pixels


def test_random_flip_flips_whole_images():
    images = jnp.asarray(RNG.integers(0, 256, (64, 4, 5, 3)).astype(np.uint8))
    out = np.asarray(jax.jit(augment.random_flip)(images, jax.random.key(0)))
    flipped = np.array([np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images, strict=True)])
    kept = np.array([np.array_equal(o, i) for o, i in zip(out, images, strict=True)])
    assert (flipped ^ kept).all() and 10 < flipped.sum() < 54


def test_normalize_uses_imagenet_statistics():
    images = jnp.broadcast_to(jnp.asarray(augment.IMAGENET_MEAN), (1, 2, 2, 3))
    np.testing.assert_allclose(augment.normalize(images), 0.0, atol=1e-6)
    np.testing.assert_allclose(augment.normalize(images + augment.IMAGENET_STD), 1.0, atol=1e-6)


def test_mixup_mixes_images_and_labels_with_one_weight():
    images = jnp.asarray(RNG.uniform(0, 255, (4, 2, 2, 3)), jnp.float32)
    labels = jnp.array([0, 1, 2, 3])
    mixed, soft = jax.jit(augment.mixup, static_argnums=(3, 4))(
        images, labels, jax.random.key(0), 0.4, 5
    )
    lam = float(soft[0, 0])
    np.testing.assert_allclose(soft.sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(soft[0, 3], 1 - lam, atol=1e-6)
    np.testing.assert_allclose(mixed, lam * images + (1 - lam) * images[::-1], atol=1e-4)


@pytest.mark.parametrize(
    "name, level, reference",
    [
        ("Invert", 10, lambda im: ImageOps.invert(im)),
        ("Equalize", 10, lambda im: ImageOps.equalize(im)),
        ("Posterize", 10, lambda im: ImageOps.posterize(im, 4)),
        ("Solarize", 5, lambda im: ImageOps.solarize(im, 128)),
        ("Brightness", 3, lambda im: ImageEnhance.Brightness(im).enhance(0.64)),
        ("Color", 7, lambda im: ImageEnhance.Color(im).enhance(1.36)),
        ("Contrast", 7, lambda im: ImageEnhance.Contrast(im).enhance(1.36)),
        ("Sharpness", 7, lambda im: ImageEnhance.Sharpness(im).enhance(1.36)),
        ("AutoContrast", 10, lambda im: ImageOps.autocontrast(im)),
    ],
)
def test_pixel_operations_match_pil(name, level, reference):
    image = (IMAGE // 2 + 40).astype(np.uint8)  # a narrower range, so AutoContrast has work to do
    expected = np.asarray(reference(Image.fromarray(image)), np.float32)
    exact = name in ("Invert", "Equalize", "Posterize", "Solarize")
    np.testing.assert_allclose(_op(name, image, level), expected, atol=0 if exact else 1.01)
    np.testing.assert_allclose(_op(name, image, -level), expected, atol=0 if exact else 1.01)


def test_solarize_add_and_cutout():
    out = _op("SolarizeAdd", IMAGE, 10)
    np.testing.assert_array_equal(out, np.where(IMAGE < 128, np.minimum(IMAGE + 110, 255), IMAGE))
    filled = (_op("Cutout", IMAGE, 5) != IMAGE).any(-1)
    assert 0 < filled.sum() <= (2 * 0.5 * 40 / 224 * 24 + 1) ** 2
    assert (_op("Cutout", IMAGE, 5)[filled] == 128).all()


def test_geometric_operations():
    square = np.asarray(Image.fromarray(IMAGE).resize((56, 56)))
    rotated = {_op("Rotate", square, 30).tobytes(), _op("Rotate", square, -30).tobytes()}
    assert rotated == {
        np.rot90(square, 1).astype(np.float32).tobytes(),
        np.rot90(square, -1).astype(np.float32).tobytes(),
    }
    shifted = _op("TranslateX", square, 10)  # 100 px at 224 px = 25 px at 56 px
    np.testing.assert_array_equal(shifted[:, :31], square[:, 25:])
    assert (shifted[:, 31:] == 128).all()
    shifted = _op("TranslateY", square, -10)
    np.testing.assert_array_equal(shifted[25:], square[:31])
    sheared = _op("ShearX", square, 10 / 3)  # shear 0.1: row y reads x + 0.1 y
    np.testing.assert_array_equal(sheared[20, :50], square[20, 2:52])
    sheared = _op("ShearY", square, 10 / 3)
    np.testing.assert_array_equal(sheared[:50, 30], square[3:53, 30])


def _augmentation(**kwargs):
    defaults = dict(image_size=16, num_classes=10, crop_on_device=True)
    return augment.Augmentation(**{**defaults, **kwargs})


@functools.cache
def _preprocess(train: bool, **kwargs):
    return jax.jit(functools.partial(_augmentation(**kwargs), train=train))


def _batch(size=24):
    images = RNG.integers(0, 256, (4, size, size, 3)).astype(np.uint8)
    return {"image": images, "label": np.arange(4, dtype=np.int32)}


def test_device_preprocess_shapes_dtypes_and_determinism():
    batch = _batch()
    train = _preprocess(True, randaugment_layers=2, randaugment_magnitude=15.0, mixup_alpha=0.2)
    a, b = train(batch, jax.random.key(0)), train(batch, jax.random.key(0))
    c = train(batch, jax.random.key(1))
    assert a["image"].shape == (4, 16, 16, 3) and a["image"].dtype == jnp.float32
    assert a["soft_label"].shape == (4, 10)
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.allclose(a["image"], c["image"])
    evaluation = _preprocess(False)(batch, jax.random.key(5))
    expected = jax.jit(lambda x: augment.normalize(augment.center_crop(x, 16, 0.875)))(
        batch["image"]
    )
    np.testing.assert_allclose(evaluation["image"], expected, atol=1e-5)
    assert evaluation["image"].dtype == jnp.float32


def test_host_cropped_batches_are_only_flipped_and_normalised():
    batch = _batch(size=16)
    out = _preprocess(True, crop_on_device=False)(batch, jax.random.key(0))
    images = np.asarray(jax.jit(augment.normalize)(batch["image"]))
    for o, i in zip(np.asarray(out["image"]), images, strict=True):
        assert np.allclose(o, i, atol=1e-5) or np.allclose(o, i[:, ::-1], atol=1e-5)
