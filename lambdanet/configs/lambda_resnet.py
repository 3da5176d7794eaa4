"""LambdaResNets, 350-epoch recipe (Appendix E.2): Figure 4 / the detailed LambdaResNet results.

    lambdanet-train --config=lambda_resnet:depth=152,size=256 \
        --workdir=workdir/lambda_resnet152_256 --config.dataset.path=IMAGENET_SHARDS

The argument `depth=D,size=S` picks a row of Table 13; both keys are optional: depth 50 by
default, and the depth's first size (`lambda_resnet:depth=350` trains at 256). Lambda
layers uniformly spaced in c4 and in all of c5 of ResNet-RS-D (Section 4.1). The recipe is
ResNet-RS's on top of the `default` config: weight decay 4e-5, RandAugment with 2 layers, dropout
and stochastic depth (per-stage schedule) per Table 13 [R, low confidence]. Batch 4096 as in the
paper (2048 for the largest models there); lower it with `--config.global_batch_size`.

    depth  size  RandAugment  dropout  stochastic depth  top-1 (Figure 4)
    50     128   10           0.2      0.0               77.4%
    50     160   10           0.2      0.0               79.2%
    101    160   10           0.3      0.0               80.8%
    101    192   15           0.2      0.0               81.9%
    152    192   15           0.3      0.0               82.5%
    152    224   15           0.3      0.1               83.2%
    152    256   15           0.3      0.1               83.8%
    152    288   15           0.3      0.1               no Figure 4 point
    200    256   15           0.3      0.1               no Figure 4 point
    270    256   15           0.3      0.1               84.2%
    350    256   15           0.3      0.2               84.4%
    350    288   15           0.3      0.2               84.5%
    350    320   15           0.3      0.2               84.7%
    420    320   15           0.3      0.2               84.9%

Depth 200 has no row in Table 13 or point in Figure 4; it takes the values that LambdaResNet-152
and -270 share at 256 px [R]. LambdaResNet-420 at 320 px is the paper's headline 84.9% top-1
(arXiv version) [C].
"""

import ml_collections

from lambdanet.configs import default, model_config

# Table 13 [R, low confidence]: (depth, image size) -> (RandAugment magnitude, dropout,
# stochastic depth). Depth 200 has no row; it takes the 152/270 values at 256.
TABLE_13 = {
    (50, 128): (10, 0.2, 0.0),
    (50, 160): (10, 0.2, 0.0),
    (101, 160): (10, 0.3, 0.0),
    (101, 192): (15, 0.2, 0.0),
    (152, 192): (15, 0.3, 0.0),
    (152, 224): (15, 0.3, 0.1),
    (152, 256): (15, 0.3, 0.1),
    (152, 288): (15, 0.3, 0.1),
    (200, 256): (15, 0.3, 0.1),
    (270, 256): (15, 0.3, 0.1),
    (350, 256): (15, 0.3, 0.2),
    (350, 288): (15, 0.3, 0.2),
    (350, 320): (15, 0.3, 0.2),
    (420, 320): (15, 0.3, 0.2),
}
DEPTHS = sorted({depth for depth, _ in TABLE_13})


def parse_arg(arg: str | None) -> tuple[int, int]:
    """(depth, image size) of "depth=D,size=S"; both keys optional, each a Table 13 value."""
    fields = {}
    for item in (arg or "").split(","):
        if not item:
            continue
        key, _, value = item.partition("=")
        if key not in ("depth", "size") or not value.isdigit():
            raise ValueError(
                f"configs/lambda_resnet.py takes depth=D,size=S (keys depth and size, integer "
                f"values, both optional); got {item!r} in {arg!r}."
            )
        fields[key] = int(value)
    depth = fields.get("depth", DEPTHS[0])
    if depth not in DEPTHS:
        raise ValueError(f"No LambdaResNet-{depth} in Table 13; the paper's depths are {DEPTHS}.")
    sizes = sorted(size for d, size in TABLE_13 if d == depth)
    size = fields.get("size", sizes[0])
    if size not in sizes:
        raise ValueError(
            f"LambdaResNet-{depth} has no Table 13 row at image size {size}; the paper's sizes "
            f"for it are {sizes}, e.g. --config=lambda_resnet:depth={depth},"
            f"size={sizes[0]}."
        )
    return depth, size


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    depth, size = parse_arg(arg)
    magnitude, dropout, stochastic_depth = TABLE_13[depth, size]
    config = default.get_config(f"lambda_resnet{depth}")
    config.model = model_config(
        f"lambda_resnet{depth}",
        dropout_rate=dropout,
        drop_path_rate=stochastic_depth,
        drop_path_schedule="stage",  # ResNet-RS's per-stage schedule [R]
    )
    config.dataset.image_size = size
    config.dataset.randaugment = dict(num_layers=2, magnitude=magnitude)
    config.num_epochs = 350.0
    config.weight_decay = 4e-5
    config.eval_every_epochs = 5.0
    return config
