"""LambdaResNet-50, 350-epoch recipe (Appendix E.2): Figure 4 / the detailed LambdaResNet
results, with the per-size hyper-parameters of Table 13 [R, low confidence]:

    size  (RandAugment 2 layers)
    128   RandAugment 10, dropout 0.2, stochastic depth 0.0; 77.4% top-1 (Figure 4)
    160   RandAugment 10, dropout 0.2, stochastic depth 0.0; 79.2% top-1 (Figure 4)

    python -m lambdanet.main --config=configs/lambda_resnet50.py \
        --workdir=workdir/lambda_resnet50 --config.dataset.manual_dir=DIR_WITH_IMAGENET_TARS

The image size is the config argument (default 128); the paper's other sizes for this depth:
160, e.g. `--config=configs/lambda_resnet50.py:160`, which also selects that row.
Lambda layers uniformly spaced in c4 and in all of c5 of ResNet-RS-50 (§4.1). Batch 4096 as
in the paper (2048 for the largest models there); lower it with `--config.global_batch_size`.
"""

import ml_collections

from configs import default


def get_config(image_size: str | None = None) -> ml_collections.ConfigDict:
    return default.lambda_resnet_config(50, image_size)
