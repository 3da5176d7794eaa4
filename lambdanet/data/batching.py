"""The batching arithmetic every input source shares.

* Training reads one endless stream: the concatenation of epoch permutations of the train set,
  epoch e permuted with seed (seed, e). Global batch k is stream[k G : (k + 1) G] (G = global
  batch size); process p takes its B = G / process_count slice. So a batch is a pure function
  of (seed, step) that does not depend on the number of processes, and a run resumed at step k
  sees exactly what an uninterrupted run sees from step k on.
* Evaluation splits the eval set into contiguous per-process shards whose sizes differ by at most
  one; every process runs the same number of eval batches, padded with masked examples, so every
  eval example counts exactly once for any batch size and process count.
"""

import dataclasses
import functools
import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np


def local_batch_size(batch_size: int, process_count: int, what: str = "batch size") -> int:
    """The per-process share of a global batch; a ValueError unless it divides evenly."""
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(
            f"The global {what} {batch_size} is not a positive multiple of the "
            f"process count {process_count}; pick a multiple of {process_count}."
        )
    return batch_size // process_count


@dataclasses.dataclass(frozen=True)
class Batching:
    """How one process batches: global sizes (summed over processes), seed, its place among them.

    A ValueError at construction unless both batch sizes divide by process_count.
    """

    global_batch_size: int
    eval_batch_size: int
    seed: int
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self):
        local_batch_size(self.global_batch_size, self.process_count)
        local_batch_size(self.eval_batch_size, self.process_count, "eval batch size")

    @property
    def batch_size(self) -> int:
        """This process's train batch size B."""
        return self.global_batch_size // self.process_count

    @property
    def local_eval_batch_size(self) -> int:
        return self.eval_batch_size // self.process_count

    def train_positions(self, step: int) -> np.ndarray:
        """Stream positions of this process's part of global batch `step`: int64 [B]."""
        start = step * self.global_batch_size + self.process_index * self.batch_size
        return np.arange(start, start + self.batch_size, dtype=np.int64)

    def train_indices(self, step: int, num_examples: int) -> np.ndarray:
        """Train-set indices of this process's part of global batch `step`: int64 [B]."""
        return stream_indices(self.train_positions(step), self.seed, num_examples)

    def eval_shard(self, num_examples: int) -> tuple[int, int]:
        """[start, stop) of this process's eval shard."""
        return shard_bounds(num_examples, self.process_index, self.process_count)

    def num_eval_batches(self, num_examples: int) -> int:
        """Eval batches every process runs for an eval set of `num_examples`."""
        largest_shard = math.ceil(num_examples / self.process_count)
        return num_eval_batches([largest_shard], self.local_eval_batch_size)


@functools.lru_cache(maxsize=4)
def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order of the train set in epoch `epoch`: int64 [num_examples]."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def stream_indices(positions: np.ndarray, seed: int, num_examples: int) -> np.ndarray:
    """Train-set indices at the given stream positions (module docstring): int64 like positions."""
    epochs, offsets = np.divmod(positions, num_examples)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
        where = epochs == epoch
        indices[where] = epoch_permutation(seed, int(epoch), num_examples)[offsets[where]]
    return indices


def shard_bounds(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, stop) of the process's contiguous eval shard; shard sizes differ by at most one."""
    return (
        num_examples * process_index // process_count,
        num_examples * (process_index + 1) // process_count,
    )


def num_eval_batches(shard_sizes: Iterable[int], local_batch_size: int) -> int:
    """The eval batches every process yields: enough for the largest shard."""
    return max(1, math.ceil(max(shard_sizes) / local_batch_size))


def padded_eval_batches(
    batches: Iterable[dict[str, np.ndarray]],
    batch_size: int,
    num_batches: int,
    image_shape: Sequence[int],
) -> Iterator[dict[str, np.ndarray]]:
    """Pads each batch to `batch_size` (zeros), adds 'mask' bool [batch_size] (False on padding)
    and appends all-padding batches up to `num_batches`, so all processes run the same steps."""
    count = 0
    for batch in batches:
        yield _pad_batch(batch, batch_size)
        count += 1
    if count > num_batches:
        raise RuntimeError(
            f"The eval shard gave {count} batches, more than the {num_batches} "
            "every process runs; its example count was wrong."
        )
    empty = {"image": np.zeros((0, *image_shape), np.uint8), "label": np.zeros(0, np.int32)}
    for _ in range(num_batches - count):
        yield _pad_batch(empty, batch_size)


def _pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
    size = len(batch["label"])
    pad = lambda a: np.concatenate([a, np.zeros((batch_size - size, *a.shape[1:]), a.dtype)])
    return {**{k: pad(v) for k, v in batch.items()}, "mask": np.arange(batch_size) < size}
