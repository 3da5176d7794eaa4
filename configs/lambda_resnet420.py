"""LambdaResNet-420, 350-epoch recipe (Appendix E.2): Figure 4 / the detailed LambdaResNet
results, with the per-size hyper-parameters of Table 13 [R, low confidence]:

    size  (RandAugment 2 layers)
    320   RandAugment 15, dropout 0.3, stochastic depth 0.2; 84.9% top-1 (Figure 4)

LambdaResNet-420 @320 is the paper's headline 84.9% (arXiv version) [C].

    python -m lambdanet.main --config=configs/lambda_resnet420.py \
        --workdir=workdir/lambda_resnet420 --config.dataset.manual_dir=DIR_WITH_IMAGENET_TARS

The paper trains this depth at 320 px only.
Lambda layers uniformly spaced in c4 and in all of c5 of ResNet-RS-420 (§4.1). Batch 4096 as
in the paper (2048 for the largest models there); lower it with `--config.global_batch_size`.
"""

import ml_collections

from configs import default


def get_config(image_size: str | None = None) -> ml_collections.ConfigDict:
    return default.lambda_resnet_config(420, image_size)
