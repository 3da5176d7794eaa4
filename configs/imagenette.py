"""LambdaResNet-50 on Imagenette (10 ImageNet classes) read from a local image folder.

Reproduces no table of the paper: a real-photo run that fits one GPU in well under an hour.

    python -m lambdanet.main --config=configs/imagenette.py --workdir=workdir/imagenette \
        --config.dataset.path=PATH/TO/imagenette

The folder holds `train/<class>/*.JPEG` and `val/<class>/*.JPEG` (fast.ai's imagenette2 layout).
The default `in_memory` path decodes it once into uint8 arrays at 146 px and augments on the
device, without TensorFlow; `--config.dataset.name=image_folder` streams it with TFDS
ImageFolder instead. LambdaResNet-50 at 128 px with the Table 13 row of that size (RandAugment
magnitude 10, dropout 0.2), 100 epochs at batch 256.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
    config = default.lambda_resnet_config(50, 128)
    config.dataset.name = "in_memory"
    config.dataset.eval_split = "val"
    config.global_batch_size = 256
    config.eval_batch_size = 256
    config.num_epochs = 100.0
    config.ema_decay = 0.999  # ~1000-step average; a 2,400-step run is too short for 0.9999
    config.log_every_steps = 50
    config.checkpoint_every_steps = 500
    return config
