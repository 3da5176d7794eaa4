"""Conv/lambda hybrid ResNet-50, 90-epoch recipe: the hybrid placement table (Appendix D.2; its
numbers are unconfirmed, docs/reproduction.md). C = 3x3 conv kept, L = lambda layer, per stage c2,
c3, c4, c5. The default C,C,L,L row: 15.56M params (analytic; the table as read says 15.4), 78.3%
top-1 (unconfirmed).

    lambdanet-train --config=hybrid_resnet50 --workdir=workdir/hybrid_CCLL \
        --config.model.placement=C,C,L,L --config.dataset.path=IMAGENET_SHARDS

All of the table's rows (`hybrid_placements`), `--seeds` training runs each, into one
CSV/Markdown table of placement, params, inference and training throughput and top-1 (mean ± std)
and a plot of top-1 against throughput (scripts/sweep_hybrids.py):

    python scripts/sweep_hybrids.py --config=hybrid_resnet50 --workdir=workdir/hybrids \
        --seeds=3 --config.dataset.path=IMAGENET_SHARDS
"""

import ml_collections

from lambdanet.configs import default

# The rows of the hybrid table, in the paper's order (C,C,C,C is the ResNet-50 baseline).
HYBRID_PLACEMENTS = (
    "C,C,C,C",
    "L,C,C,C",
    "L,L,C,C",
    "L,L,L,C",
    "L,L,L,L",
    "C,L,L,L",
    "C,C,L,L",
    "C,C,C,L",
)


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config("hybrid_resnet50")
    config.hybrid_placements = HYBRID_PLACEMENTS  # read by scripts/sweep_hybrids.py
    return config
