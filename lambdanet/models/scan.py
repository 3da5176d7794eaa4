"""Runs of identical bottlenecks as one `nn.scan` (`ResNet(scan_blocks=True)`).

`block_runs` splits a stage into runs; `scanned_blocks` makes one run a scanned module whose
variables are stacked along a leading layer axis (`lambdanet.models.scanned` converts them to and
from the unrolled layout).
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any


def block_runs(block_types: str, scan: bool) -> list[tuple[int, int]]:
    """(first, last) 0-based block indices of a stage's runs: each block alone, or with
    ``scan`` the first block alone (it may downsample or project) and then every maximal run of
    consecutive blocks of one type (a run of one stays a plain block)."""
    if not scan:
        return [(i, i) for i in range(len(block_types))]
    runs, first = [(0, 0)], 1
    for i in range(1, len(block_types) + 1):
        if i == len(block_types) or block_types[i] != block_types[first]:
            if first < len(block_types):
                runs.append((first, i - 1))
            first = i
    return runs


class _ScanBody(nn.Module):
    """One bottleneck as an `nn.scan` body: (x, this block's drop-path rate) -> (x, None)."""

    block: ModuleDef
    train: bool

    @nn.compact
    def __call__(self, x: jax.Array, rate: jax.Array | None, embeddings: jax.Array | None):
        return self.block(name="block")(x, self.train, embeddings, rate), None


def scanned_blocks(block: ModuleDef, train: bool, rates: Sequence[float], name: str):
    """``len(rates)`` copies of ``block`` as one scanned module: (x, embeddings) -> x."""
    scan = nn.scan(
        _ScanBody,
        variable_axes={"params": 0, "batch_stats": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(0, nn.broadcast),
        length=len(rates),
    )
    module = scan(block=block, train=train, name=name)
    per_block = jnp.asarray(rates, jnp.float32) if any(rates) else None

    def apply(x: jax.Array, embeddings: jax.Array | None) -> jax.Array:
        return module(x, per_block, embeddings)[0]

    return apply
