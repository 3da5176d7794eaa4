"""Data parallelism with one `jax.jit` over a `Mesh` of all devices (no pmap).

The global batch `[b, H, W, 3]` is sharded along the mesh axis `'data'`; parameters, optimizer
state and BatchNorm statistics are replicated. Under `jax.jit`, `jnp.mean` over the sharded batch
axis becomes an all-reduce, so BatchNorm statistics and the loss are computed over the global
batch exactly as on one device.

Each process feeds only its local slice `[b / process_count, ...]`;
`jax.make_array_from_process_local_data` assembles the global array, so the same code runs on one
CPU, 8 fake CPU devices, N GPUs and several hosts.
"""

import collections
import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis `'data'` over `devices` (default: all devices of all processes)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Shards the leading (batch) axis over `'data'`."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Replicates an array on every device of `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(batch_size: int, mesh: Mesh, field: str) -> None:
    """Raises ValueError unless `batch_size` splits evenly over the devices of `mesh`."""
    num_devices = mesh.devices.size
    if batch_size <= 0 or batch_size % num_devices:
        fixed = max(num_devices, round(batch_size / num_devices) * num_devices)
        raise ValueError(
            f"config.{field}={batch_size} is not divisible by the number of devices "
            f"({num_devices}); the batch is split evenly over devices. "
            f"Use a multiple of {num_devices}, e.g. --config.{field}={fixed}."
        )


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Process-local numpy batch `[b_local, ...]` -> global `jax.Array`s `[b, ...]` on 'data'."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def prefetch_to_device(
    batches: Iterable[dict[str, np.ndarray]], mesh: Mesh, size: int = 2
) -> Iterator[dict[str, Any]]:
    """Yields sharded batches, keeping `size` batches in flight to the devices."""
    batches = iter(batches)
    queue = collections.deque()

    def enqueue(n: int) -> None:
        for batch in itertools.islice(batches, n):
            queue.append(shard_batch(batch, mesh))

    enqueue(size)
    while queue:
        yield queue.popleft()
        enqueue(1)
