"""The embedded demo dataset: scikit-learn's handwritten digits as 32x32 RGB images.

`sklearn.datasets.load_digits` ships with scikit-learn (no download): 1,797 grey 8x8 images with
values 0..16, 10 classes. Here they are scaled to 0..255, upsampled to 32x32 (bilinear), repeated
to 3 channels and split once, stratified and seeded, into 1,497 train and 300 validation images.
"""

import numpy as np
from PIL import Image
from sklearn import datasets, model_selection

from lambdanet.data.in_memory import ImageArrays

IMAGE_SIZE = 32
NUM_VALIDATION = 300
SPLIT_SEED = 0


def _upsample(image: np.ndarray) -> np.ndarray:
    """[8, 8] values 0..16 -> uint8 [IMAGE_SIZE, IMAGE_SIZE, 3]."""
    grey = Image.fromarray(np.round(image * (255 / 16)).astype(np.uint8))
    grey = grey.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return np.repeat(np.asarray(grey)[:, :, None], 3, axis=2)


def load_digits() -> tuple[dict[str, ImageArrays], list[str]]:
    """Returns ({'train': 1,497 images, 'validation': 300 images}, class names '0'..'9')."""
    digits = datasets.load_digits()
    images = np.stack([_upsample(image) for image in digits.images])
    labels = digits.target.astype(np.int32)
    train, validation = model_selection.train_test_split(
        np.arange(len(labels)), test_size=NUM_VALIDATION, stratify=labels, random_state=SPLIT_SEED
    )
    arrays = {
        "train": ImageArrays(images[np.sort(train)], labels[np.sort(train)]),
        "validation": ImageArrays(images[np.sort(validation)], labels[np.sort(validation)]),
    }
    return arrays, [str(name) for name in digits.target_names]
