"""LambdaResNet-101, 350-epoch recipe (Appendix E.2): Figure 4 / the detailed LambdaResNet
results, with the per-size hyper-parameters of Table 13 [R, low confidence]:

    size  (RandAugment 2 layers)
    160   RandAugment 10, dropout 0.3, stochastic depth 0.0; 80.8% top-1 (Figure 4)
    192   RandAugment 15, dropout 0.2, stochastic depth 0.0; 81.9% top-1 (Figure 4)

    python -m lambdanet.main --config=configs/lambda_resnet101.py \
        --workdir=workdir/lambda_resnet101 --config.dataset.manual_dir=DIR_WITH_IMAGENET_TARS

The image size is the config argument (default 160); the paper's other sizes for this depth:
192, e.g. `--config=configs/lambda_resnet101.py:192`, which also selects that row.
Lambda layers uniformly spaced in c4 and in all of c5 of ResNet-RS-101 (§4.1). Batch 4096 as
in the paper (2048 for the largest models there); lower it with `--config.global_batch_size`.
"""

import ml_collections

from configs import default


def get_config(image_size: str | None = None) -> ml_collections.ConfigDict:
    return default.lambda_resnet_config(101, image_size)
