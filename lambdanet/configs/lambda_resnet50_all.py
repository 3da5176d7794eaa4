"""ResNet-50 with every bottleneck 3x3 conv replaced by a lambda layer, 90-epoch recipe:
Table 3 row "Lambda layer", 15.0M params, 78.4% top-1 (|k|=16, |h|=4, |u|=1, local position
lambdas of scope 23x23; Table 3). The |u|=4 row (16.0M, 78.9%) is
`--config=default:lambda_resnet50_u4`.

    lambdanet-train --config=lambda_resnet50_all \
        --workdir=workdir/lambda_resnet50_all --config.dataset.path=IMAGENET_SHARDS

Batch 4096 as in the paper; lower it with `--config.global_batch_size` on fewer accelerators.
"""

import ml_collections

from lambdanet.configs import default


def get_config() -> ml_collections.ConfigDict:
    return default.get_config("lambda_resnet50_all")
