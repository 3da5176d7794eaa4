"""Which layer fills the 3x3 slot of each bottleneck: the placement spec (Appendix D.2, E.1).

A placement is resolved against a model's stage sizes into one string of block letters per stage,
e.g. ``("CCC", "CCCC", "CCLCCC", "LLL")`` for LambdaResNet-50. Letters (`BLOCK_TYPES`):
``C`` 3x3 convolution, ``L`` lambda layer, ``G`` global relative self-attention, ``X`` axial
self-attention, ``S`` local 7x7 relative self-attention.

Accepted specs (`parse_placement`):
  * per-stage letters, comma separated, one entry per stage: ``"C,C,L,L"`` (the hybrid table);
    an entry is one letter for the whole stage or one letter per block (``"C,C,CCLCCC,L"``);
    the same as a sequence: ``("C", "C", "L", "L")``;
  * explicit 1-based block indices per stage, which get a lambda layer (other blocks keep the
    3x3 conv): the mapping ``{"c4": [3], "c5": "all"}``, or its string form ``"c4:3,c5:all"``
    (several indices joined by ``+``: ``"c4:6+12+18,c5:all"``); a mapping value may also be
    letters as above;
  * ``"paper"``: the LambdaResNet default for the model's depth (§4.1): lambda layers uniformly
    spaced in c4 (1, 3, 6, 6, 6, 6, 8 of them for depths 50 ... 420) and in every block of c5.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

BLOCK_TYPES = {
    "C": "3x3 convolution",
    "L": "lambda layer",
    "G": "global relative self-attention",
    "X": "axial self-attention",
    "S": "local 7x7 relative self-attention",
}

# Blocks per stage [c2, c3, c4, c5] of the ResNet-RS configurations (Appendix E.1).
STAGE_SIZES = {
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
    270: (4, 29, 53, 4),
    350: (4, 36, 72, 4),
    420: (4, 44, 87, 4),
}
# Lambda layers in c4 of the hybrid LambdaResNets (Appendix E.1, quoted).
PAPER_C4_LAMBDA_COUNTS = {50: 1, 101: 3, 152: 6, 200: 6, 270: 6, 350: 6, 420: 8}


def stage_names(num_stages: int) -> tuple[str, ...]:
    """("c2", "c3", ...): stage c_i has output stride 2^i."""
    return tuple(f"c{i + 2}" for i in range(num_stages))


def paper_c4_indices(depth: int) -> tuple[int, ...]:
    """1-based c4 block indices of the lambda layers of LambdaResNet-``depth``.

    Uniform spacing: every ``round(n_c4 / (count + 1))``-th block, which reproduces the indices of
    the paper's architecture table (e.g. 6, 12, 18 of 23 blocks for LambdaResNet-101).
    """
    if depth not in PAPER_C4_LAMBDA_COUNTS:
        raise ValueError(f"no paper placement for depth {depth}; known: {sorted(STAGE_SIZES)}")
    count = PAPER_C4_LAMBDA_COUNTS[depth]
    spacing = round(STAGE_SIZES[depth][2] / (count + 1))
    return tuple(spacing * (i + 1) for i in range(count))


def paper_placement(stage_sizes: Sequence[int]) -> dict[str, Any]:
    """The LambdaResNet placement for a ResNet-RS configuration: {"c4": indices, "c5": "all"}."""
    depths = {sizes: depth for depth, sizes in STAGE_SIZES.items()}
    depth = depths.get(tuple(stage_sizes))
    if depth is None:
        raise ValueError(
            f"placement='paper' needs a ResNet-RS block configuration, got stage sizes "
            f"{tuple(stage_sizes)}; known: {STAGE_SIZES}. Give the placement explicitly instead."
        )
    return {"c4": list(paper_c4_indices(depth)), "c5": "all"}


def parse_placement(spec: Any, stage_sizes: Sequence[int]) -> tuple[str, ...]:
    """Resolves a placement spec (see the module docstring) to one letter per block per stage."""
    stages = stage_names(len(stage_sizes))
    if isinstance(spec, str):
        spec = spec.replace(" ", "")
        if spec == "paper":
            spec = paper_placement(stage_sizes)
        elif ":" in spec:
            spec = _parse_index_string(spec)
        else:
            spec = spec.split(",")
    if isinstance(spec, Mapping):
        spec = _from_mapping(spec, stages, stage_sizes)
    if isinstance(spec, str) or not isinstance(spec, Sequence) or len(spec) != len(stages):
        raise ValueError(
            f"placement {spec!r} must give one entry per stage {stages} (e.g. 'C,C,L,L'), "
            f"a mapping of block indices such as {{'c4': [3], 'c5': 'all'}}, or 'paper'"
        )
    return tuple(
        _expand(entry, stage, size)
        for entry, stage, size in zip(spec, stages, stage_sizes, strict=True)
    )


def _expand(entry: Any, stage: str, size: int) -> str:
    """One letter for the stage, or one letter per block, to a string of ``size`` letters."""
    if not isinstance(entry, str) or len(entry) not in (1, size):
        raise ValueError(
            f"placement entry {entry!r} for stage {stage} must be one letter or {size} letters "
            f"(one per block)"
        )
    unknown = sorted(set(entry) - set(BLOCK_TYPES))
    if unknown:
        raise ValueError(
            f"unknown block type(s) {unknown} in stage {stage}; valid letters: {BLOCK_TYPES}"
        )
    return entry * size if len(entry) == 1 else entry


def _parse_index_string(spec: str) -> dict[str, Any]:
    """ "c4:3,c5:all" -> {"c4": [3], "c5": "all"}; "c4:6+12+18" -> {"c4": [6, 12, 18]}."""
    mapping = {}
    for item in spec.split(","):
        stage, _, value = item.partition(":")
        if not value:
            raise ValueError(f"placement item {item!r} must read 'stage:indices', e.g. 'c4:3'")
        is_indices = all(part.isdigit() for part in value.split("+"))
        mapping[stage] = [int(part) for part in value.split("+")] if is_indices else value
    return mapping


def _from_mapping(
    spec: Mapping[str, Any], stages: Sequence[str], stage_sizes: Sequence[int]
) -> list[str]:
    unknown = sorted(set(spec) - set(stages))
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown} in placement; stages are {stages}")
    entries = []
    for stage, size in zip(stages, stage_sizes, strict=True):
        value = spec.get(stage, "C")
        if value == "all":
            value = "L"
        elif not isinstance(value, str):
            value = _lambda_at(value, stage, size)
        entries.append(value)
    return entries


def _lambda_at(indices: Sequence[int], stage: str, size: int) -> str:
    """Letters with 'L' at the given 1-based block indices and 'C' elsewhere."""
    bad = [i for i in indices if not isinstance(i, int) or not 1 <= i <= size]
    if bad:
        raise ValueError(f"block indices {bad} of stage {stage} are outside 1..{size} (1-based)")
    return "".join("L" if i + 1 in set(indices) else "C" for i in range(size))
