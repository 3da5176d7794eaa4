"""What a checkpoint whose variables do not fit the model is refused with."""

import jax
import jax.numpy as jnp

from lambdanet import checkpoint_compat


def _tree(**shapes):
    return {"params": {name: jax.ShapeDtypeStruct(s, jnp.float32) for name, s in shapes.items()}}


def test_matching_trees_have_no_mismatch():
    arrays = {"params": {"conv": jnp.ones((3, 3, 2, 4)), "bias": jnp.ones(4)}}
    assert checkpoint_compat.mismatch(_tree(conv=(3, 3, 2, 4), bias=(4,)), arrays) is None


def test_each_differing_entry_is_listed_once():
    problem = checkpoint_compat.mismatch(
        _tree(conv=(3, 3, 2, 4), old=(1,)), _tree(conv=(3, 3, 2, 8), new=(2,))
    )
    assert problem.startswith("3 entries differ:\n")
    assert "  params/conv: checkpoint (3, 3, 2, 4) vs model (3, 3, 2, 8)" in problem
    assert "  params/old: only in the checkpoint" in problem
    assert "  params/new: only in the model" in problem
    assert "scanned stages" not in problem
    assert problem.endswith("or a fresh workdir.")


def test_long_lists_are_cut_and_scanned_layouts_get_a_hint():
    stored = _tree(**{f"stage_scan_{i}": (i + 1,) for i in range(25)})
    problem = checkpoint_compat.mismatch(stored, _tree())
    assert problem.count("only in the checkpoint") == 20
    assert "  ... and 5 more\n" in problem
    assert "config.model.scan_blocks" in problem
