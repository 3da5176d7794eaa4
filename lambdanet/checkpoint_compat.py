"""Whether a checkpoint's variables fit a model: the entries whose name or shape differ.

`mismatch` compares two trees of arrays (or of their metadata, anything with a `shape`) by
path and shape, and says what differs in the words of the error `lambdanet.checkpoint` raises
before a restore would fail deep inside orbax.
"""

from typing import Any

import jax

_MAX_LISTED = 20


def _path_key(entry: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """{'params/stem/conv/kernel': shape, ...} for the array leaves of `tree`."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(_path_key(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def _differences(stored: dict[str, tuple], expected: dict[str, tuple]) -> list[str]:
    """One line per entry of the {name: shape} maps that differs or is on one side only."""
    problems = [
        f"  {name}: checkpoint {stored[name]} vs model {expected[name]}"
        for name in sorted(stored.keys() & expected.keys())
        if stored[name] != expected[name]
    ]
    problems += [f"  {name}: only in the checkpoint" for name in sorted(stored.keys() - expected)]
    problems += [f"  {name}: only in the model" for name in sorted(expected.keys() - stored)]
    return problems


def mismatch(stored: Any, expected: Any) -> str | None:
    """None if `stored` (the checkpoint's tree) and `expected` (the model's) have the same entries
    with the same shapes; else how many differ, the first 20 of them, a hint when one side has
    scanned stages, and what to do (the end of a sentence, several lines)."""
    stored, expected = _shapes(stored), _shapes(expected)
    problems = _differences(stored, expected)
    if not problems:
        return None
    listed = problems[:_MAX_LISTED]
    if len(problems) > _MAX_LISTED:
        listed.append(f"  ... and {len(problems) - _MAX_LISTED} more")
    one_side = stored.keys() ^ expected.keys()
    layout = (
        "One side has scanned stages (`_scan` modules) and the other not: set "
        "config.model.scan_blocks as the checkpoint was written, or convert the variables with "
        "lambdanet.models.scanned.scan_variables / unscan_variables.\n"
        if any("_scan" in name for name in one_side)
        else ""
    )
    return (
        f"{len(problems)} entries differ:\n"
        + "\n".join(listed)
        + "\n"
        + layout
        + "Use the config the checkpoint was written with (its config.json), or a fresh workdir."
    )
