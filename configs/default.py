"""Base config: the paper's 90-epoch ImageNet recipe (Appendix E.2) for a ResNet-50.

Not an experiment by itself (see configs/resnet50.py); other configs start from `get_config()`
and change a few fields. Every field can be overridden on the command line, e.g.
`--config.global_batch_size=1024 --config.dataset.manual_dir=~/imagenet_tars`.

The 90-epoch setup [R]: SGD momentum 0.9, batch 4096, weight decay 1e-4, learning rate
0.1 x batch / 256 warmed up linearly over 5 epochs then cosine-decayed, label smoothing 0.1,
EMA 0.9999 of the weights, 224x224 with random resized crop and flip. configs/lambda_resnet.py
builds the 350-epoch LambdaResNet recipe from it (Table 13).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from lambdanet.data import default_dataset_config


def get_config() -> ml_collections.ConfigDict:
    """The 90-epoch recipe with `resnet50` on TFDS imagenet2012."""
    config = ml_collections.ConfigDict()
    config.model_name = "resnet50"
    # Overrides of the registry model's attributes (lambdanet.models.ResNet), e.g. dropout_rate;
    # `lambda_layer` updates the model's lambda-layer settings (LambdaLayer's attributes). The
    # fields below are declared unset (None: the model's own value), so that every config takes
    # them on the command line, e.g. --config.model.lambda_layer.scope_size=9.
    config.model = ml_collections.ConfigDict(
        dict(
            lambda_layer=ml_collections.ConfigDict(
                dict(
                    impl=placeholder(str),  # "auto", "einsum", "conv", "rows"
                    scope_size=placeholder(int),  # r (0: global)
                    dim_k=placeholder(int),  # |k|
                    heads=placeholder(int),  # |h|
                    dim_u=placeholder(int),  # |u|
                    embedding_init_std=placeholder(float),
                )
            ),
            stem_conv_impl=placeholder(str),  # "space_to_depth" or "direct"
            max_pool_grad=placeholder(str),  # "views" or "scatter"
            scan_blocks=placeholder(bool),  # scanned runs of identical blocks (compile time)
            remat=placeholder(str),  # rematerialised stages, e.g. "c4,c5" or "all"
            remat_policy=placeholder(str),  # what they keep, e.g. "dots_saveable"
        )
    )
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
