"""Synthetic input (`config.dataset.name = 'synthetic'`): one fixed batch of random images, again
and again, for timing a model's steps without an input pipeline (`lambdanet.tools.benchmark`).

The images are already what a model takes, float32 standard normal values (as normalised
images are), so `device_preprocess` is the identity and a step's program is the model's alone.
The schedule is ImageNet's: `num_train_examples` is its train set's size (or
`max_train_examples`), and the classes are `num_classes` (default ImageNet's 1,000).
"""

import itertools
from collections.abc import Iterator

import ml_collections
import numpy as np

from lambdanet.data import batching

NAME = "synthetic"
NUM_CLASSES = 1000
IMAGENET_TRAIN_EXAMPLES = 1_281_167
IMAGENET_EVAL_EXAMPLES = 50_000


def identity(batch: dict, rng, train: bool) -> dict:
    """`device_preprocess` of images that need none: the batch unchanged."""
    del rng, train
    return batch


class SyntheticSource:
    """A `Dataset` whose every batch is the same: 'image' float32 [B, S, S, 3] standard normal
    (S = config.image_size), 'label' int32 [B] uniform over the classes, both from `seed`."""

    def __init__(self, config: ml_collections.ConfigDict, batch: batching.Batching):
        self.batching = batch
        self.num_classes = config.num_classes or NUM_CLASSES
        self.class_names = tuple(str(i) for i in range(self.num_classes))
        self.num_train_examples = config.max_train_examples or IMAGENET_TRAIN_EXAMPLES
        self.num_eval_examples = config.max_eval_examples or IMAGENET_EVAL_EXAMPLES
        self.num_eval_batches = batch.num_eval_batches(self.num_eval_examples)
        self.image_size = config.image_size
        self.device_preprocess = identity

    def _batch(self, size: int, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        shape = (size, self.image_size, self.image_size, 3)
        return {
            "image": rng.standard_normal(shape, dtype=np.float32),
            "label": rng.integers(0, self.num_classes, size, dtype=np.int32),
        }

    def train_iter(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """The same batch at every step (made on the first `next`)."""
        del start_step
        yield from itertools.repeat(self._batch(self.batching.batch_size, self.batching.seed))

    def eval_iter(self) -> Iterator[dict[str, np.ndarray]]:
        """`num_eval_batches` copies of one batch; 'mask' [B] marks this process's shard."""
        start, stop = self.batching.eval_shard(self.num_eval_examples)
        size = self.batching.local_eval_batch_size
        batch = self._batch(size, self.batching.seed + 1)
        for first in range(start, start + self.num_eval_batches * size, size):
            yield batch | {"mask": np.arange(first, first + size) < stop}
