"""LambdaResNet-350, 350-epoch recipe (Appendix E.2): Figure 4 / the detailed LambdaResNet
results, with the per-size hyper-parameters of Table 13 [R, low confidence]:

    size  (RandAugment 2 layers)
    256   RandAugment 15, dropout 0.3, stochastic depth 0.2; 84.4% top-1 (Figure 4)
    288   RandAugment 15, dropout 0.3, stochastic depth 0.2; 84.5% top-1 (Figure 4)
    320   RandAugment 15, dropout 0.3, stochastic depth 0.2; 84.7% top-1 (Figure 4)

    python -m lambdanet.main --config=configs/lambda_resnet350.py \
        --workdir=workdir/lambda_resnet350 --config.dataset.manual_dir=DIR_WITH_IMAGENET_TARS

The image size is the config argument (default 256); the paper's other sizes for this depth:
288, 320, e.g. `--config=configs/lambda_resnet350.py:320`, which also selects that row.
Lambda layers uniformly spaced in c4 and in all of c5 of ResNet-RS-350 (§4.1). Batch 4096 as
in the paper (2048 for the largest models there); lower it with `--config.global_batch_size`.
"""

import ml_collections

from configs import default


def get_config(image_size: str | None = None) -> ml_collections.ConfigDict:
    return default.lambda_resnet_config(350, image_size)
