"""Ports of timm's tiered-stem ResNets with lambda layers (``timm/models/byoanet.py``).

The same networks as timm's ``resnet26t`` (``timm/models/resnet.py``), ``lambda_resnet26t``,
``lambda_resnet50ts`` and ``lambda_resnet26rpt_256`` (``ByobNet``), so that weights convert one to
one (`lambdanet.convert_timm`) and speed is compared on the same architecture (issue 6):

  * tiered stem: 3x3 convs 24 (stride 2), 32, 64, each + BN + activation, then a 3x3 stride-2
    max-pool;
  * bottleneck stages [c2, c3, c4, c5] of width 64, 128, 256, 512 (outputs 4x), the first block of
    c3-c5 with stride 2; a conv block has its stride on the 3x3 conv; a lambda block replaces the
    3x3 conv by ``LambdaLayer`` (|h|=4, |k|=16, |u|=1; local scope r=9 through timm's biased
    lambda convolution, or a global relative table for "rpt", the ``pos_emb`` of timm's fixed
    feature size), a 2x2 average pool of stride 2 when the block downsamples, then BN +
    activation (timm's ``post_attn``);
  * shortcut: 1x1 conv (stride s) + BN for ``ByobNet`` (``"conv1x1"``), 2x2 average pool (ceil
    mode, padding excluded) then 1x1 conv + BN for timm's ResNet-D style ``resnet26t``
    (``"avg"``);
  * ReLU, or SiLU for the "ts" models; BatchNorm ε = 1e-5, momentum 0.9 (PyTorch's 0.1);
    γ = 0 in the last BN of every block (timm's ``zero_init_last``); the head is a global
    average pool and a dense layer.

Which blocks hold lambda layers follows timm's ``interleave_blocks``: lambda_resnet26t and
lambda_resnet26rpt_256 ``C,C,CL,LL``; lambda_resnet50ts ``CCC,CCCL,CLCLCL,CLC``.

Call ``model.apply(variables, x, train=...)`` with x float [b, H, W, 3] (sides multiples of 32;
``lambda_resnet26rpt_256`` needs H = W = 256, the size its relative tables are made for) for
logits [b, num_classes] in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lambdanet.layers.lambda_layer import LambdaLayer
from lambdanet.layers.pooling import max_pool_3x3
from lambdanet.layers.space_to_depth import stem_conv
from lambdanet.models.fold import FoldedBatchNorm, check_not_training_folded
from lambdanet.models.placement import parse_placement, stage_names

ModuleDef = Any
ACTIVATIONS = {"relu": nn.relu, "silu": nn.silu}
SHORTCUTS = ("conv1x1", "avg")
_PORT_BLOCK_TYPES = "CL"


def _avg_pool_ceil(x: jax.Array) -> jax.Array:
    """2x2 average pool, stride 2, ceil mode, padding excluded (timm ResNet-D ``avg_down``)."""
    padding = tuple((0, side % 2) for side in x.shape[1:3])
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding=padding, count_include_pad=False)


class ByoaBottleneck(nn.Module):
    """Bottleneck: 1x1 conv (w) -> 3x3 conv or lambda layer (w, stride) -> 1x1 conv (4w) + shortcut.

    x: [b, H, W, c] -> [b, H / stride, W / stride, 4w]. Parameter names: ``conv1``/``bn1``,
    ``conv2``/``bn2`` (conv block) or ``lambda_layer``/``post_lambda_bn`` (lambda block),
    ``conv3``/``bn3``, ``downsample_conv``/``downsample_bn`` (projection shortcut).
    """

    width: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable[[jax.Array], jax.Array]
    lambda_layer: ModuleDef
    strides: int = 1
    block_type: str = "C"
    shortcut: str = "conv1x1"
    drop_path_rate: float = 0.0
    zero_init_last_bn: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        y = self.act(self.norm(name="bn1")(self.conv(self.width, (1, 1), name="conv1")(x)))
        if self.block_type == "C":
            strides = (self.strides, self.strides)
            y = self.conv(self.width, (3, 3), strides, padding=1, name="conv2")(y)
            y = self.act(self.norm(name="bn2")(y))
        else:
            y = self.lambda_layer(name="lambda_layer")(y, train=train)
            if self.strides > 1:  # timm's LambdaLayer pools its output: nn.AvgPool2d(2, 2)
                y = nn.avg_pool(y, (2, 2), strides=(2, 2))
            y = self.act(self.norm(name="post_lambda_bn")(y))
        y = self.conv(4 * self.width, (1, 1), name="conv3")(y)
        scale_init = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
        y = self.norm(scale_init=scale_init, name="bn3")(y)
        y = nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2, 3), name="drop_path")(
            y, deterministic=not train
        )
        return self.act(y + self._shortcut(x, y.shape))

    def _shortcut(self, x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        if x.shape == shape:
            return x
        strides = (self.strides, self.strides)
        if self.shortcut == "avg":
            x = _avg_pool_ceil(x) if self.strides > 1 else x
            strides = (1, 1)
        x = self.conv(shape[-1], (1, 1), strides, padding=0, name="downsample_conv")(x)
        return self.norm(name="downsample_bn")(x)


class ByoaResNet(nn.Module):
    """A tiered-stem bottleneck ResNet with optional lambda layers; see the module docstring.

    Attributes:
      stage_sizes: blocks per stage [c2, c3, c4, c5].
      placement: "C" (3x3 conv) or "L" (lambda layer) per block (`placement.parse_placement`).
      num_classes: logits of the head.
      stem_widths: output channels of the three stem convs.
      max_pool_grad: gradient of the stem max-pool, "views" (scatter-free, faster on the H100) or
        "scatter" (XLA's select_and_scatter); the same values (`lambdanet.layers.pooling`).
      stem_conv_impl: the first stem convolution, "direct" or "space_to_depth" (the same
        parameters and values, `lambdanet.layers.space_to_depth`).
      base_width: bottleneck width of c2 (doubles per stage; block outputs are 4x).
      activation: "relu" or "silu".
      shortcut: "conv1x1" (ByobNet) or "avg" (timm ResNet-D ``avg_down``).
      scope_size: local scope r of the lambda layers (with timm's position bias), or None for a
        global relative table sized from the input (timm's "rpt" ``pos_emb``).
      dim_k, heads: |k| and |h| of the lambda layers.
      impl: LambdaLayer implementation ("einsum", "conv", "rows" or "auto").
      drop_path_rate: stochastic depth rate of the last block, linear in the block index
        (timm's ``drop_path_rate``).
      dropout_rate: dropout before the head (timm's ``drop_rate``).
      zero_init_last_bn: γ = 0 in the last BatchNorm of every block.
      bn_momentum, bn_epsilon: BatchNorm settings (PyTorch momentum 0.1 is Flax 0.9).
      batch_norm_folded: the variables come from `fold_batch_norm` (inference only).
      dtype: compute dtype; param_dtype: parameter dtype.
    """

    stage_sizes: Sequence[int]
    placement: Any = "C,C,C,C"
    num_classes: int = 1000
    stem_widths: Sequence[int] = (24, 32, 64)
    max_pool_grad: str = "views"
    stem_conv_impl: str = "space_to_depth"
    base_width: int = 64
    activation: str = "relu"
    shortcut: str = "conv1x1"
    scope_size: int | None = 9
    dim_k: int = 16
    heads: int = 4
    impl: str = "auto"
    drop_path_rate: float = 0.0
    dropout_rate: float = 0.0
    zero_init_last_bn: bool = True
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    batch_norm_folded: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """x: [b, H, W, 3] -> logits [b, num_classes] (float32)."""
        check_not_training_folded(self, train)
        placement = self._placement()
        act = self._activation()
        conv = functools.partial(
            nn.Conv,
            use_bias=self.batch_norm_folded,
            kernel_init=nn.initializers.variance_scaling(2.0, "fan_out", "normal"),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        norm = functools.partial(
            FoldedBatchNorm if self.batch_norm_folded else nn.BatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        x = jnp.asarray(x, self.dtype)
        first_conv = stem_conv(conv, self.stem_conv_impl)
        for i, width in enumerate(self.stem_widths):
            strides = (2, 2) if i == 0 else (1, 1)
            layer = first_conv if i == 0 else conv
            x = layer(width, (3, 3), strides, padding=1, name=f"stem_conv{i + 1}")(x)
            x = act(norm(name=f"stem_bn{i + 1}")(x))
        x = max_pool_3x3(x, self.max_pool_grad)
        drop_rates = iter(self._drop_path_rates())
        stages = stage_names(len(self.stage_sizes))
        for s, (stage, block_types) in enumerate(zip(stages, placement, strict=True)):
            for i, block_type in enumerate(block_types):
                x = ByoaBottleneck(
                    width=self.base_width * 2**s,
                    conv=conv,
                    norm=norm,
                    act=act,
                    lambda_layer=self._lambda_layer(),
                    strides=2 if i == 0 and s > 0 else 1,
                    block_type=block_type,
                    shortcut=self.shortcut,
                    drop_path_rate=next(drop_rates),
                    zero_init_last_bn=self.zero_init_last_bn,
                    name=f"{stage}_block{i + 1}",
                )(x, train)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        x = nn.Dropout(self.dropout_rate, name="head_dropout")(x, deterministic=not train)
        return nn.Dense(
            self.num_classes,
            kernel_init=nn.initializers.normal(0.01),  # timm ByobNet's Linear init
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            name="head",
        )(x)

    def _placement(self) -> tuple[str, ...]:
        placement = parse_placement(self.placement, self.stage_sizes)
        unsupported = sorted(set("".join(placement)) - set(_PORT_BLOCK_TYPES))
        if unsupported:
            raise ValueError(
                f"ByoaResNet supports block types 'C' and 'L' only, got {unsupported} in "
                f"placement {self.placement!r}; use lambdanet.models.ResNet for attention blocks"
            )
        if self.shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut {self.shortcut!r}; choose one of {SHORTCUTS}")
        return placement

    def _activation(self) -> Callable[[jax.Array], jax.Array]:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; choose one of {tuple(ACTIVATIONS)}"
            )
        return ACTIVATIONS[self.activation]

    def _lambda_layer(self) -> ModuleDef:
        return functools.partial(
            LambdaLayer,
            dim_k=self.dim_k,
            heads=self.heads,
            scope_size=self.scope_size,
            position_bias=self.scope_size is not None,  # timm's Conv3d has a bias, pos_emb none
            impl=self.impl,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            batch_norm_folded=self.batch_norm_folded,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def _drop_path_rates(self) -> list[float]:
        """rate·j / (N - 1) for block j of N (timm's ``calculate_drop_path_rates``)."""
        total = sum(self.stage_sizes)
        return [self.drop_path_rate * j / max(total - 1, 1) for j in range(total)]


_26 = (2, 2, 2, 2)
_50 = (3, 4, 6, 3)
# timm's architectures (byoanet.py / resnet.py model_cfgs) as ByoaResNet arguments; the registry
# builds them by these names.
TIMM_CONFIGS: dict[str, dict[str, Any]] = {
    "resnet26t": dict(stage_sizes=_26, placement="C,C,C,C", shortcut="avg"),
    "lambda_resnet26t": dict(stage_sizes=_26, placement="C,C,CL,L"),
    "lambda_resnet50ts": dict(stage_sizes=_50, placement="C,CCCL,CLCLCL,CLC", activation="silu"),
    "lambda_resnet26rpt_256": dict(stage_sizes=_26, placement="C,C,CL,L", scope_size=None),
}
