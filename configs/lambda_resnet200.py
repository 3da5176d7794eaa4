"""LambdaResNet-200, 350-epoch recipe (Appendix E.2): Figure 4 / the detailed LambdaResNet
results, with the per-size hyper-parameters of Table 13 [R, low confidence]:

    size  (RandAugment 2 layers)
    256   RandAugment 15, dropout 0.3, stochastic depth 0.1; no Figure 4 point

Depth 200 has no row in Table 13 or point in Figure 4; it takes the values that LambdaResNet-152
and -270 share at 256 px [R].

    python -m lambdanet.main --config=configs/lambda_resnet200.py \
        --workdir=workdir/lambda_resnet200 --config.dataset.manual_dir=DIR_WITH_IMAGENET_TARS

The paper trains this depth at 256 px only.
Lambda layers uniformly spaced in c4 and in all of c5 of ResNet-RS-200 (§4.1). Batch 4096 as
in the paper (2048 for the largest models there); lower it with `--config.global_batch_size`.
"""

import ml_collections

from configs import default


def get_config(image_size: str | None = None) -> ml_collections.ConfigDict:
    return default.lambda_resnet_config(200, image_size)
