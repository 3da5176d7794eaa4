"""Variables of a `ResNet` between its unrolled and scanned layouts (``scan_blocks``).

Unrolled, block j of stage c4 is the module ``c4_block{j}``; scanned, each run of identical
blocks ``first..last`` (`scan.block_runs`) is one module ``c4_scan{first}_{last}/block`` whose
variables carry a leading layer axis of length last - first + 1. The two layouts compute the
same function, so timm weights, converted checkpoints and older runs (all unrolled) load into a
scanned model through `scan_variables`, and a scanned run's variables go back through
`unscan_variables` (as big_vision converts its ViT checkpoints between loop and scan):

    scanned = create_model("lambda_resnet152", scan_blocks=True)
    variables = scan_variables(scanned, unrolled_variables)

`match_layout` does the same from the module names alone (no model needed): checkpoints restored
for fine-tuning and evaluation (`lambdanet.checkpoint.restore_weights`) take the layout of the
model they are restored into.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from lambdanet.models.placement import parse_placement, stage_names
from lambdanet.models.resnet import ResNet
from lambdanet.models.scan import block_runs


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
            _stack(tree, scan_name, blocks)

    return _per_run(model, variables, stack)


def unscan_variables(model: ResNet, variables: Mapping[str, Any]) -> dict[str, Any]:
    """Scanned variables of ``model`` -> the unrolled layout (``scan_blocks=False``)."""

    def unstack(collection: str, tree: dict, scan_name: str, blocks: list[str]) -> None:
        if scan_name in tree:
            _unstack(tree, scan_name, blocks)

    return _per_run(model, variables, unstack)


def _stack(tree: dict, scan_name: str, blocks: list[str]) -> None:
    """Replaces the modules ``blocks`` of ``tree`` by ``scan_name`` stacking them."""
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *(tree.pop(b) for b in blocks))
    tree[scan_name] = {"block": stacked}


def _unstack(tree: dict, scan_name: str, blocks: list[str]) -> None:
    """Replaces the module ``scan_name`` of ``tree`` by its slices ``blocks``."""
    stacked = tree.pop(scan_name)["block"]
    for i, block in enumerate(blocks):
        tree[block] = jax.tree.map(lambda x, i=i: x[i], stacked)


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


_SCAN_NAME = re.compile(r"^(?P<stage>\w+?)_scan(?P<first>\d+)_(?P<last>\d+)$")


def match_layout(variables: Mapping[str, Any], like: Mapping[str, Any]) -> dict[str, Any]:
    """``variables`` ({"params": ..., "batch_stats": ...}) in the layout of ``like`` (a tree of
    the same collections, arrays or shapes): each module ``{stage}_scan{first}_{last}`` of
    ``like`` that ``variables`` lacks is stacked from ``{stage}_block{first..last}``, and each
    such module of ``variables`` that ``like`` lacks is unstacked into those blocks. Works under
    `jax.eval_shape`; what it cannot match is left for the caller's structure check."""
    converted = {}
    for collection, tree in variables.items():
        tree, target = dict(tree), like.get(collection, {})
        for name in [n for n in target if n not in tree]:
            blocks = _stacked_blocks(name)
            if blocks and all(b in tree for b in blocks):
                _stack(tree, name, blocks)
        for name in [n for n in list(tree) if n not in target]:
            blocks = _stacked_blocks(name)
            if blocks and all(b in target for b in blocks):
                _unstack(tree, name, blocks)
        converted[collection] = tree
    return converted


def _stacked_blocks(name: str) -> list[str]:
    """``c4_scan2_6`` -> ["c4_block2", ..., "c4_block6"]; [] for any other module name."""
    match = _SCAN_NAME.match(name)
    if not match:
        return []
    first, last = int(match["first"]), int(match["last"])
    return [f"{match['stage']}_block{i}" for i in range(first, last + 1)]
