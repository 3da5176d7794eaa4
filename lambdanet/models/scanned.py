"""Variables of a `ResNet` between its unrolled and scanned layouts (``scan_blocks``).

Unrolled, block j of stage c4 is the module ``c4_block{j}``; scanned, each run of identical
blocks ``first..last`` (`resnet.block_runs`) is one module ``c4_scan{first}_{last}/block`` whose
variables carry a leading layer axis of length last - first + 1. The two layouts compute the
same function, so timm weights, converted checkpoints and older runs (all unrolled) load into a
scanned model through `scan_variables`, and a scanned run's variables go back through
`unscan_variables` (as big_vision converts its ViT checkpoints between loop and scan):

    scanned = create_model("lambda_resnet152", scan_blocks=True)
    variables = scan_variables(scanned, unrolled_variables)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lambdanet.models.placement import parse_placement, stage_names
from lambdanet.models.resnet import ResNet, block_runs


def scanned_runs(model: ResNet) -> dict[str, list[str]]:
    """Scanned module name -> the unrolled block names it stacks, in order."""
    placement = parse_placement(model.placement, model.stage_sizes)
    runs = {}
    for stage, block_types in zip(stage_names(len(placement)), placement, strict=True):
        for first, last in block_runs(block_types, scan=True):
            if last > first:
                names = [f"{stage}_block{i + 1}" for i in range(first, last + 1)]
                runs[f"{stage}_scan{first + 1}_{last + 1}"] = names
    return runs


def scan_variables(model: ResNet, variables: Mapping[str, Any]) -> dict[str, Any]:
    """Unrolled {"params", "batch_stats", ...} -> the layout of ``model`` with scan_blocks."""

    def stack(collection: str, tree: dict, scan_name: str, blocks: list[str]) -> None:
        present = [b for b in blocks if b in tree]
        if present:
            _check_complete(collection, scan_name, blocks, present)
            stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(tree.pop(b) for b in blocks))
            tree[scan_name] = {"block": stacked}

    return _per_run(model, variables, stack)


def unscan_variables(model: ResNet, variables: Mapping[str, Any]) -> dict[str, Any]:
    """Scanned variables of ``model`` -> the unrolled layout (``scan_blocks=False``)."""

    def unstack(collection: str, tree: dict, scan_name: str, blocks: list[str]) -> None:
        if scan_name in tree:
            stacked = tree.pop(scan_name)["block"]
            for i, block in enumerate(blocks):
                tree[block] = jax.tree.map(lambda x, i=i: x[i], stacked)

    return _per_run(model, variables, unstack)


def _per_run(model: ResNet, variables: Mapping[str, Any], convert) -> dict[str, Any]:
    """Each collection's top-level dict, copied, with ``convert`` applied to it once per run."""
    runs = scanned_runs(model)
    converted = {}
    for collection, tree in variables.items():
        converted[collection] = dict(tree)
        for scan_name, blocks in runs.items():
            convert(collection, converted[collection], scan_name, blocks)
    return converted


def _check_complete(collection: str, scan_name: str, blocks: list[str], present: list[str]):
    if len(present) != len(blocks):
        missing = sorted(set(blocks) - set(present))
        raise ValueError(
            f"{collection}: {scan_name} stacks {blocks}, but {missing} are missing; the variables "
            "are not of this model (check its placement and stage sizes)"
        )
