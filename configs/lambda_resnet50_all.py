"""ResNet-50 with every bottleneck 3x3 conv replaced by a lambda layer, 90-epoch recipe:
Table 3 row "Lambda layer", 15.0M params, 78.4% top-1 (|k|=16, |h|=4, |u|=1, local position
lambdas of scope 23x23; Table 3). The |u|=4 row (16.0M, 78.9%) is
`--config.model_name=lambda_resnet50_u4`.

    python -m lambdanet.main --config=configs/lambda_resnet50_all.py \
        --workdir=workdir/lambda_resnet50_all --config.dataset.manual_dir=DIR_WITH_IMAGENET_TARS

Batch 4096 as in the paper; lower it with `--config.global_batch_size` on fewer accelerators.
"""

from pathlib import Path

import ml_collections

from lambdanet.config_loading import load_config


def get_config() -> ml_collections.ConfigDict:
    config = load_config(Path(__file__).with_name("default.py"))
    config.model_name = "lambda_resnet50_all"
    return config
