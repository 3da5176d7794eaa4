"""Demo: a small LambdaResNet on scikit-learn's handwritten digits; trains and evaluates on CPU.

    lambdanet-train --config=demo --workdir=workdir/demo

Reproduces no table of the paper: it shows the whole pipeline on data that needs no download.
The 1,797 8x8 digits (1,497 train / 300 validation, upsampled to 32x32, `lambdanet.data.digits`)
train a LambdaResNet-style network (ResNet-RS stem and shortcuts, one bottleneck per stage, base
width 16, lambda layers in c3..c5 with |k|=16, |h|=4) for 30 epochs; on 2 CPU cores it takes a
few minutes and reaches above 95% validation top-1. Checkpoints, TensorBoard events and
final_metrics.json land in the workdir; then

    lambdanet-train --config=demo --workdir=workdir/demo --mode=eval

re-evaluates the last checkpoint.
"""

import ml_collections

from lambdanet.configs import default, model_config


def get_config() -> ml_collections.ConfigDict:
    config = default.get_config("lambda_resnet50")
    config.model = model_config(
        "lambda_resnet50", stage_sizes=(1, 1, 1, 1), base_width=16, placement="C,L,L,L"
    )
    config.dataset.name = "digits"
    config.dataset.image_size = 32
    config.dataset.train_crop_area = (0.5, 1.0)
    config.dataset.horizontal_flip = False  # a mirrored digit is another symbol
    config.dataset.eval_crop_fraction = 1.0

    config.global_batch_size = 128
    config.eval_batch_size = 128
    config.num_epochs = 30.0
    config.warmup_epochs = 1.0
    config.learning_rate = 0.4  # per 256: peak 0.2 at batch 128
    config.weight_decay = 5e-5
    config.ema_decay = 0.99  # ~100-step average; the paper's 0.9999 needs a long run
    config.half_precision = False  # CPUs compute bfloat16 slowly

    config.log_every_steps = 20
    config.eval_every_epochs = 10.0
    config.checkpoint_every_steps = 100
    return config
