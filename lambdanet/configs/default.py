"""Base config: the paper's 90-epoch ImageNet recipe (Appendix E.2) for a ResNet-50.

Other configs start from `get_config()` and change a few fields; its argument trains any
registered model with this recipe (`--config=default:lambda_resnet50_u4`). Every field can be
overridden on the command line, e.g. `--config.global_batch_size=1024
--config.model.lambda_layer.scope_size=9`.

The 90-epoch setup [R]: SGD momentum 0.9, batch 4096, weight decay 1e-4, learning rate
0.1 x batch / 256 warmed up linearly over 5 epochs then cosine-decayed, label smoothing 0.1,
EMA 0.9999 of the weights, 224x224 with random resized crop and flip. `lambda_resnet`
builds the 350-epoch LambdaResNet recipe from it (Table 13).
"""

import ml_collections

from lambdanet.configs import model_config
from lambdanet.data import default_dataset_config


def get_config(model: str = "resnet50") -> ml_collections.ConfigDict:
    """The 90-epoch recipe with the registered model `model` (default resnet50) on ImageNet
    ArrayRecord shards (`config.dataset.path`), e.g. `--config=default:se_resnet50`
    (`lambdanet.models.list_models()` names them)."""
    config = ml_collections.ConfigDict()
    config.model_name = model  # the registry entry config.model starts from (a label of the run)
    config.model = model_config(model)
    config.dataset = default_dataset_config()
    config.seed = 0  # parameter initialisation, dropout and stochastic depth
    config.data_seed = 0  # data order and augmentation

    config.global_batch_size = 4096
    config.eval_batch_size = 1024
    config.num_epochs = 90.0
    config.num_train_steps = -1  # > 0 overrides num_epochs

    config.learning_rate = 0.1  # per 256 examples (linear scaling rule)
    config.warmup_epochs = 5.0
    config.momentum = 0.9
    config.nesterov = False
    config.weight_decay = 1e-4
    config.weight_decay_exclude_bn_and_bias = True
    config.grad_clip_norm = 0.0  # 0 disables clipping
    config.label_smoothing = 0.1
    config.ema_decay = 0.9999  # 0 disables the EMA; eval uses the EMA weights otherwise
    config.half_precision = True  # bfloat16 compute, float32 parameters
    # BatchNorm statistics over the global batch (all-reduced across devices). False: over each
    # device's shard, with no all-reduce (PyTorch DDP without SyncBatchNorm).
    config.sync_batch_norm = True
    config.skip_nonfinite_steps = False  # False: stop at a NaN/inf loss or gradient
    # With skip_nonfinite_steps: stop once more than this fraction of the run's steps was skipped.
    config.max_nonfinite_fraction = 0.05

    config.log_every_steps = 100
    config.eval_every_epochs = 1.0  # 0 evaluates at the end only
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3  # the last k, plus the best by eval top-1
    # Fine-tuning: start from the params/batch_stats of this checkpoint (a workdir or a step
    # directory, e.g. timm weights from scripts/convert_timm.py) unless the workdir resumes.
    config.init_from = ""
    return config
