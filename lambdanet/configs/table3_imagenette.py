"""Table 3 and the D.1 ablations on Imagenette: the lambda layer against attention and channel
attention in a ResNet-50, with the recipe and budget of the hybrid table (`imagenette`: 128 px,
60 epochs, batch 256), 3 seeds each, throughput and memory measured alone:

    python scripts/sweep_hybrids.py --config=table3_imagenette --workdir=workdir/table3 \
        --seeds=3 --parallel=4 --table=results/raw/table3_imagenette \
        --results=results/raw/table3_imagenette.jsonl,results/raw/hybrids_imagenette.jsonl \
        --config.dataset.path=artifacts/imagenette_128.npz

One of its models alone (the argument is `imagenette`'s):

    lambdanet-train --config=table3_imagenette:se_resnet50 --workdir=workdir/se_resnet50 \
        --config.dataset.path=artifacts/imagenette_128.npz

Reproduces no number of the paper (its Table 3 is ImageNet at 224 px): the same comparison on
real photographs at 128 px. Entries (`get_sweep()`):

* Table 3: `resnet50` (Conv), `se_resnet50` (+ channel attention), `global_sa` (global relative
  self-attention; Table 4 has it out of memory at 224 px, here c2 is 32x32), `axial_sa`,
  `local_sa` (7x7), `LLLL` (the lambda layer in every bottleneck, |k|=16, |h|=4, |u|=1, r=23),
  `lambda_u4` (|u|=4, r=7 lambda convolution).
* D.1 (b): `content_only` and `position_only` (the all-lambda model without position, or without
  content lambdas).
* D.1 (a): `k8`, `k32` (|k|) and `h8` (|h|) beside LLLL's k16 h4.

`resnet50` and `LLLL` are the hybrid table's entries of the same names, with the same configs
(`imagenette:resnet50`; `imagenette:hybrid` with placement L,L,L,L, the all-lambda model), so
passing results/raw/hybrids_imagenette.jsonl as a second --results file reuses their runs and
measurements. At 128 px c4 and c5 are 8x8 and 4x4, so every scope of 15 or more is global
there: D.1 (c)'s scope ablation is left out.
"""

import ml_collections

from lambdanet.configs import imagenette

_ALL_LAMBDA = "imagenette:all_lambda"


def get_sweep() -> list[tuple[str, str, dict]]:
    """(name, config NAME:ARG, {config field: value}) of every entry, in the table's order."""
    return [
        ("resnet50", "imagenette:resnet50", {}),
        ("se_resnet50", "imagenette:se_resnet50", {}),
        ("global_sa", "imagenette:global_sa", {}),
        ("axial_sa", "imagenette:axial_sa", {}),
        ("local_sa", "imagenette:local_sa", {}),
        ("LLLL", "imagenette:hybrid", {"model.placement": "L,L,L,L"}),
        ("lambda_u4", "imagenette:lambda_u4", {}),
        ("content_only", _ALL_LAMBDA, {"model.lambda_layer.position": False}),
        ("position_only", _ALL_LAMBDA, {"model.lambda_layer.content": False}),
        ("k8", _ALL_LAMBDA, {"model.lambda_layer.dim_k": 8}),
        ("k32", _ALL_LAMBDA, {"model.lambda_layer.dim_k": 32}),
        ("h8", _ALL_LAMBDA, {"model.lambda_layer.heads": 8}),
    ]


def get_config(model: str = "resnet50") -> ml_collections.ConfigDict:
    """`imagenette.get_config(model)`: the sweep's runs name their configs themselves."""
    return imagenette.get_config(model)
