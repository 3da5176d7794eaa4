"""Parameter counts, FLOPs and the Table 4 memory model of the registered architectures.

* `count_params`: a model's parameters, from ``jax.eval_shape`` of ``model.init``: shapes only,
  no initialisation, so the deepest LambdaResNets are counted without materialising them;
  `num_params` counts a parameter tree.
* `flops`: XLA's cost analysis of the compiled inference forward pass. XLA counts a
  multiply-add as 2 FLOPs; the paper's "FLOPS" (and the usual 4.1B of ResNet-50) count
  multiply-adds, i.e. half of this number.
* `table4_memory_gib`: the "Memory (GB)" column of Table 4, computed from the
  architecture: the stage output resolutions n and the number of layers l per stage are read
  off the model (ResNet-50 at 224: n = 56², 28², 14², 7², l = 3, 4, 6, 3), then
    global SA Θ(blhn²), axial SA Θ(blhn√n) (two passes: height and width),
    local SA Θ(blhnm), lambda layer Θ(lkn²), shared embeddings Θ(kn²) (one table per
    resolution), lambda convolution Θ(lknm) (m = window²),
  at batch b = 128, |h| = 8 heads, |k| = 16, float32, in GiB. This reproduces the paper's
  column (120, 4.8, 1.9, 0.95, 0.63) to within one unit of its second significant digit.

Run ``python -m lambdanet.analysis`` for a markdown table of every registered model's parameter
count next to the paper's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lambdanet.models import create_model, list_models, model_entry
from lambdanet.models.placement import stage_names

TABLE4_LAYERS = ("global_sa", "axial_sa", "local_sa", "lambda", "lambda_shared", "lambda_conv")


def _abstract_init(model: nn.Module, input_shape: Sequence[int], **kwargs):
    """(output, variables) of ``model.init_with_output`` as shapes only."""
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    return jax.eval_shape(
        lambda key, x: model.init_with_output(key, x, train=False, **kwargs), jax.random.key(0), x
    )


def count_params(model: nn.Module, input_shape: Sequence[int] = (1, 224, 224, 3)) -> int:
    """Number of trainable parameters (the ``params`` collection) of ``model`` at ``input_shape``.

    The input shape matters only for layers whose tables are sized from the input (global
    relative embeddings); BatchNorm statistics are not parameters.
    """
    _, variables = _abstract_init(model, input_shape)
    return num_params(variables["params"])


def num_params(params: Any) -> int:
    """Number of scalars in a parameter tree (of arrays or of shapes)."""
    return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


def flops(model: nn.Module, input_shape: Sequence[int] = (1, 224, 224, 3)) -> float:
    """FLOPs of one inference forward pass on ``input_shape``, from XLA's cost analysis.

    A multiply-add counts 2; divide by 2 for the multiply-add "FLOPS" of the paper. The stem's
    first convolution counts as the direct convolution: the space-to-depth form computes the
    same outputs with a zero-padded kernel, whose extra products are no work of the model.
    """
    if hasattr(model, "stem_conv_impl"):
        model = model.clone(stem_conv_impl="direct")
    _, variables = _abstract_init(model, input_shape)
    x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
    forward = jax.jit(lambda variables, x: model.apply(variables, x, train=False))
    cost = forward.lower(variables, x).compile().cost_analysis()
    if isinstance(cost, Sequence):  # older jax: one dict per device program
        cost = cost[0]
    return float(cost["flops"])


def stage_shapes(
    model: nn.Module, image_size: int | tuple[int, int] = 224
) -> dict[str, tuple[int, int]]:
    """Spatial output shape (H, W) of every stage c2, c3, ... of a `ResNet` at ``image_size``."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    features, _ = _abstract_init(model, (1, height, width, 3), return_features=True)
    return {name: tuple(features[name].shape[1:3]) for name in stage_names(len(model.stage_sizes))}


def table4_memory_gib(
    layer: str,
    model: nn.Module | None = None,
    *,
    image_size: int | tuple[int, int] = 224,
    batch_size: int = 128,
    heads: int = 8,
    dim_k: int = 16,
    window: int = 7,
    bytes_per_element: int = 4,
) -> float:
    """Table 4's memory (GiB) of the attention maps or position embeddings of ``layer`` in every
    bottleneck of ``model`` (default: the torchvision ResNet-50).

    layer: one of `TABLE4_LAYERS`. b = ``batch_size``, |h| = ``heads``, |k| = ``dim_k``,
    m = ``window``² for the local layers; see the module docstring for the formulas.
    """
    if layer not in TABLE4_LAYERS:
        raise ValueError(f"unknown layer {layer!r}; choose one of {TABLE4_LAYERS}")
    model = create_model("resnet50") if model is None else model
    shapes = stage_shapes(model, image_size)
    layers = dict(zip(shapes, model.stage_sizes, strict=True))
    b, h, k, m = batch_size, heads, dim_k, window**2
    per_stage = {
        "global_sa": lambda H, W: b * h * (H * W) ** 2,
        "axial_sa": lambda H, W: b * h * H * W * (H + W),
        "local_sa": lambda H, W: b * h * H * W * m,
        "lambda": lambda H, W: k * (H * W) ** 2,
        "lambda_shared": lambda H, W: k * (H * W) ** 2,
        "lambda_conv": lambda H, W: k * H * W * m,
    }[layer]
    elements = sum(
        per_stage(*shape) * (1 if layer == "lambda_shared" else layers[name])
        for name, shape in shapes.items()
    )
    return elements * bytes_per_element / 2**30


def params_table() -> str:
    """Markdown table: every registered model, its parameter count (M) and the paper's."""
    rows = ["| model | family | params (M) | paper (M) | what |", "|---|---|---|---|---|"]
    for name in list_models():
        entry = model_entry(name)
        params = count_params(create_model(name)) / 1e6
        paper = "–" if entry.paper_params_m is None else f"{entry.paper_params_m:.1f}"
        rows.append(f"| {name} | {entry.family} | {params:.3f} | {paper} | {entry.description} |")
    return "\n".join(rows)


def main() -> None:
    print(params_table())
    print()
    print("| Table 4 layer | memory (GiB), ResNet-50 @224, b=128, h=8, k=16 |")
    print("|---|---|")
    for layer in TABLE4_LAYERS:
        print(f"| {layer} | {table4_memory_gib(layer):.3g} |")
    print(f"| lambda, k=8 | {table4_memory_gib('lambda', dim_k=8):.3g} |")


if __name__ == "__main__":
    main()
