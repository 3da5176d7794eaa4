"""ResNet-50 baseline, 90-epoch recipe: Table 3 row "Conv (He et al., 2016)", 25.6M params,
76.9% top-1 (Table 3; also the C->C->C->C row of the hybrid table).

    lambdanet-train --config=resnet50 --workdir=workdir/resnet50 \
        --config.dataset.path=IMAGENET_SHARDS

The paper trains with batch 4096 on 32 TPUv3 cores; with fewer accelerators lower the batch
(`--config.global_batch_size=1024`; the learning rate follows the linear scaling rule).
IMAGENET_SHARDS is an ArrayRecord shard set written once from the two ImageNet tars
(`python scripts/convert_to_array_record.py --imagenet_dir=DIR --output=IMAGENET_SHARDS`); TFDS
instead: `--config.dataset.name=imagenet2012 --config.dataset.manual_dir=DIR` (needs the `tfds`
extra, `pip install 'lambdanet[tfds]'`).
"""

import ml_collections

from lambdanet.configs import default


def get_config() -> ml_collections.ConfigDict:
    return default.get_config("resnet50")
