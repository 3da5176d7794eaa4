"""ResNet v1 bottleneck backbones: torchvision ResNet-50, ResNet-D / ResNet-RS, LambdaResNets.

One class, `ResNet`, covers every architecture of the paper (§5, Appendix E.1):

  * the torchvision layout (7x7 stem + max-pool, stride on the 3x3 conv, 1x1 conv + BN projection
    shortcut): ResNet-50 has 25,557,032 parameters, the baseline of Tables 3 and 4;
  * the ResNet-RS options (Bello et al. 2021, `tensorflow/tpu` ``resnet_model.py``): ResNet-D deep
    stem (3x3 convs 32, 32, 64), average-pool shortcut, stem max-pool replaced by a strided 3x3
    conv, squeeze-excitation (ratio 0.25 of the block output), stochastic depth, dropout before
    the head; zero-initialised γ of the last BatchNorm of every bottleneck (E.1);
  * the 3x3 slot of every bottleneck chosen by a placement spec (`placement.py`): conv,
    lambda layer, or an attention baseline. A non-conv slot that downsamples is followed by a
    3x3 average pool with stride 2 (§1.2, quote [C]). SE is applied in conv blocks only (§4.1).

Call ``model.apply(variables, x, train=..., rngs={"dropout": key})`` with x float [b, H, W, 3]
(sides multiples of 32; relative position tables are sized from the input at trace time) for
logits [b, num_classes] in float32, or with ``return_features=True`` for the multi-scale feature
maps {"stem": [b, H/4, W/4, base_width] (after the stem pool), "c2": [b, H/4, W/4, 4·base_width],
"c3" (H/8, 8·base_width), "c4" (H/16), "c5" (H/32, 32·base_width), "pre_logits": [b, 32·base_width]
(global average pool, float32)} (COCO backbones). In train mode BatchNorm uses batch statistics
and updates ``batch_stats`` (pass ``mutable=["batch_stats"]``); stochastic depth and dropout draw
from the ``dropout`` rng stream and act only in train mode.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lambdanet.layers.attention import (
    AxialSelfAttention,
    LocalSelfAttention,
    RelativeSelfAttention2D,
    SqueezeExcite,
)
from lambdanet.layers.lambda_layer import LambdaLayer, position_embedding_shape
from lambdanet.layers.pooling import max_pool_3x3
from lambdanet.layers.space_to_depth import stem_conv
from lambdanet.models.fold import FoldedBatchNorm, check_not_training_folded
from lambdanet.models.placement import parse_placement, stage_names

ModuleDef = Any
DROP_PATH_SCHEDULES = ("block", "stage")
_ATTENTION = {"G": RelativeSelfAttention2D, "X": AxialSelfAttention, "S": LocalSelfAttention}


def _pool_after_mixer(y: jax.Array) -> jax.Array:
    """3x3 average pool, stride 2: the downsampling of a lambda/attention block (§1.2)."""
    return nn.avg_pool(y, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), count_include_pad=False)


def drop_path_rates(rate: float, stage_sizes: Sequence[int], schedule: str) -> list[list[float]]:
    """Stochastic depth rate of every block, per stage, growing linearly with depth.

    "block" (timm ``drop_path_rate``): block j of N drops with rate·j/(N - 1).
    "stage" (tensorflow/tpu ResNet-RS ``get_drop_connect_rate``): every block of stage i
    (0-based) of S drops with rate·(i + 2)/(S + 1).
    """
    if schedule not in DROP_PATH_SCHEDULES:
        raise ValueError(f"drop_path_schedule={schedule!r}; choose one of {DROP_PATH_SCHEDULES}")
    total, rates = sum(stage_sizes), []
    for s, size in enumerate(stage_sizes):
        if schedule == "stage":
            rates.append([rate * (s + 2) / (len(stage_sizes) + 1)] * size)
        else:
            first = sum(stage_sizes[:s])
            rates.append([rate * (first + i) / max(total - 1, 1) for i in range(size)])
    return rates


class Bottleneck(nn.Module):
    """ResNet v1 bottleneck: 1x1 conv (w) -> 3x3 slot (w, stride) -> 1x1 conv (4w), + shortcut.

    x: [b, H, W, c] -> [b, H / stride, W / stride, 4w]. ``mixer`` builds the module of a non-conv
    slot (``block_type`` "L", "G", "X" or "S"), ``se`` the squeeze-excitation applied after the
    last BatchNorm (or None); ``embeddings`` is the shared relative table of a lambda slot.
    """

    width: int
    conv: ModuleDef
    norm: ModuleDef
    strides: int = 1
    block_type: str = "C"
    mixer: ModuleDef | None = None
    se: ModuleDef | None = None
    drop_path_rate: float = 0.0
    avg_down: bool = False
    zero_init_last_bn: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, embeddings: jax.Array | None = None):
        y = self.conv(self.width, (1, 1), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self._spatial(y, train, embeddings)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(4 * self.width, (1, 1), name="conv3")(y)
        scale_init = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
        y = self.norm(scale_init=scale_init, name="bn3")(y)
        if self.se is not None:
            y = self.se(name="se")(y)
        y = nn.Dropout(self.drop_path_rate, broadcast_dims=(1, 2, 3), name="drop_path")(
            y, deterministic=not train
        )
        return nn.relu(y + self._shortcut(x, y.shape))

    def _spatial(self, y: jax.Array, train: bool, embeddings: jax.Array | None) -> jax.Array:
        if self.block_type == "C":
            strides = (self.strides, self.strides)
            return self.conv(self.width, (3, 3), strides, padding=1, name="conv2")(y)
        if self.block_type == "L":
            y = self.mixer(name="lambda_layer")(y, train=train, embeddings=embeddings)
        else:
            y = self.mixer(name="self_attention")(y)
        return _pool_after_mixer(y) if self.strides > 1 else y

    def _shortcut(self, x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
        """Identity, or projection: 1x1 conv (stride s) + BN; ResNet-D: 2x2 avg pool, 1x1 conv."""
        if x.shape == shape:
            return x
        strides = (self.strides, self.strides)
        if self.avg_down and self.strides > 1:
            x = nn.avg_pool(x, strides, strides, padding="SAME", count_include_pad=False)
            strides = (1, 1)
        x = self.conv(shape[-1], (1, 1), strides, name="downsample_conv")(x)
        return self.norm(name="downsample_bn")(x)


class ResNet(nn.Module):
    """ResNet v1 with bottleneck blocks; see the module docstring for the call convention.

    Attributes:
      stage_sizes: blocks per stage [c2, c3, c4, c5] (`placement.STAGE_SIZES`).
      num_classes: logits of the head.
      placement: which layer fills each bottleneck's 3x3 slot (`placement.parse_placement`).
      base_width: bottleneck width of c2 (widths double per stage, outputs are 4x).
      deep_stem: ResNet-D stem, 3x3 convs (w/2, w/2, w), instead of one 7x7 conv (w).
      replace_stem_pool: the stem max-pool becomes a 3x3 stride-2 conv + BN + ReLU (ResNet-RS).
      max_pool_grad: gradient of the stem max-pool, "views" (scatter-free, faster on the H100) or
        "scatter" (XLA's select_and_scatter); the same values (`lambdanet.layers.pooling`).
      stem_conv_impl: the stem's first (stride-2, 3-channel) convolution, "direct" or
        "space_to_depth" (a stride-1 convolution over 2x2 blocks; the same parameters and values,
        `lambdanet.layers.space_to_depth`).
      avg_down: ResNet-D shortcut, 2x2 average pool then 1x1 conv, in downsampling blocks.
      se_ratio: squeeze-excitation in conv blocks, reduced width = ratio x block output
        channels (ResNet-RS 0.25; Hu et al.'s reduction 16 is 1/16); 0 disables it.
      drop_path_rate: stochastic depth rate of the last block (`drop_path_rates`).
      drop_path_schedule: "block" (linear per block, timm) or "stage" (linear per stage, the
        tensorflow/tpu ResNet-RS code the paper builds on).
      dropout_rate: dropout before the classification head.
      zero_init_last_bn: γ = 0 in the last BatchNorm of every bottleneck (E.1).
      remat: stages whose blocks are rematerialised (``nn.remat``, i.e. jax.checkpoint) in the
        backward pass, e.g. ("c2", "c3") or "all": trades compute for activation memory.
      dim_k, dim_u, scope_size, impl, multi_head, key_norm, key_softmax_axes,
        norm_qv, content, position, embedding_init_std: lambda layer settings (`LambdaLayer`);
        paper defaults |k|=16, |u|=1, scope 23x23, impl "auto" (conv when n > 85² or |u| > 1,
        Appendix E.1, unconfirmed), embeddings N(0, 1) (E.1, unconfirmed; also the shared
        tables' init).
      heads: |h| of the lambda layers (default 4) and of the attention baselines (default 8).
      shared_embeddings: one relative table per resolution, shared by the lambda layers that run
        at it (Table 4), parameters ``rel_embeddings_stride{4,8,16,32}`` of the model.
      attention_window: window side of the local self-attention baseline ("S").
      bn_momentum, bn_epsilon: BatchNorm settings (statistics in float32 under bfloat16).
      batch_norm_folded: the variables come from `fold_batch_norm` (inference only): every
        conv is biased and the BatchNorm after it is gone.
      dtype: compute dtype; param_dtype: parameter dtype.
    """

    stage_sizes: Sequence[int]
    num_classes: int = 1000
    placement: Any = "C,C,C,C"
    base_width: int = 64
    deep_stem: bool = False
    replace_stem_pool: bool = False
    max_pool_grad: str = "views"
    stem_conv_impl: str = "space_to_depth"
    avg_down: bool = False
    se_ratio: float = 0.0
    drop_path_rate: float = 0.0
    drop_path_schedule: str = "block"
    dropout_rate: float = 0.0
    zero_init_last_bn: bool = True
    remat: Sequence[str] | str = ()
    dim_k: int = 16
    heads: int | None = None
    dim_u: int = 1
    scope_size: int | None = 23
    impl: str = "auto"
    multi_head: bool = False
    key_norm: str = "softmax"
    key_softmax_axes: str = "m"
    norm_qv: bool = True
    content: bool = True
    position: bool = True
    embedding_init_std: float = 1.0
    shared_embeddings: bool = False
    attention_window: int = 7
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    batch_norm_folded: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False, return_features: bool = False):
        """x: [b, H, W, 3] -> logits [b, num_classes] (float32), or the features dict."""
        check_not_training_folded(self, train)
        placement = parse_placement(self.placement, self.stage_sizes)
        stages = stage_names(len(self.stage_sizes))
        remat = self._remat_stages(stages)
        drop_rates = drop_path_rates(self.drop_path_rate, self.stage_sizes, self.drop_path_schedule)
        conv = functools.partial(
            nn.Conv, use_bias=self.batch_norm_folded, dtype=self.dtype, param_dtype=self.param_dtype
        )
        norm = functools.partial(
            FoldedBatchNorm if self.batch_norm_folded else nn.BatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        x = self._stem(jnp.asarray(x, self.dtype), conv, norm)
        features, stride, tables = {"stem": x}, 4, {}
        for s, (stage, block_types) in enumerate(zip(stages, placement, strict=True)):
            block_cls = nn.remat(Bottleneck, static_argnums=(2,)) if stage in remat else Bottleneck
            for i, block_type in enumerate(block_types):
                shared = block_type == "L" and self.shared_embeddings
                embeddings = self._shared_table(tables, x, stride) if shared else None
                strides = 2 if i == 0 and s > 0 else 1
                x = block_cls(
                    width=self.base_width * 2**s,
                    conv=conv,
                    norm=norm,
                    strides=strides,
                    block_type=block_type,
                    mixer=self._mixer(block_type),
                    se=self._se() if block_type == "C" else None,
                    drop_path_rate=drop_rates[s][i],
                    avg_down=self.avg_down,
                    zero_init_last_bn=self.zero_init_last_bn,
                    name=f"{stage}_block{i + 1}",
                )(x, train, embeddings)
                stride *= strides
            features[stage] = x
        features["pre_logits"] = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        if return_features:
            return features
        x = nn.Dropout(self.dropout_rate, name="head_dropout")(
            features["pre_logits"], deterministic=not train
        )
        head_init = nn.initializers.normal(0.01)  # ResNet-RS final dense
        return nn.Dense(
            self.num_classes,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            kernel_init=head_init,
            name="head",
        )(x)

    def _stem(self, x: jax.Array, conv: ModuleDef, norm: ModuleDef) -> jax.Array:
        """[b, H, W, 3] -> [b, H/4, W/4, base_width]."""
        width = self.base_width
        first_conv = stem_conv(conv, self.stem_conv_impl)
        if self.deep_stem:
            for i, (features, strides) in enumerate([(width // 2, 2), (width // 2, 1), (width, 1)]):
                layer = first_conv if i == 0 else conv
                x = layer(
                    features, (3, 3), (strides, strides), padding=1, name=f"stem_conv{i + 1}"
                )(x)
                x = nn.relu(norm(name=f"stem_bn{i + 1}")(x))
        else:
            x = first_conv(width, (7, 7), (2, 2), padding=3, name="stem_conv1")(x)
            x = nn.relu(norm(name="stem_bn1")(x))
        if self.replace_stem_pool:
            x = conv(width, (3, 3), (2, 2), padding=1, name="stem_pool_conv")(x)
            return nn.relu(norm(name="stem_pool_bn")(x))
        return max_pool_3x3(x, self.max_pool_grad)

    def _mixer(self, block_type: str) -> ModuleDef | None:
        """The module (partial) that fills a non-conv 3x3 slot."""
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if block_type == "C":
            return None
        if block_type == "L":
            return functools.partial(
                LambdaLayer,
                dim_k=self.dim_k,
                heads=self.heads or 4,
                dim_u=self.dim_u,
                scope_size=self.scope_size,
                impl=self.impl,
                multi_head=self.multi_head,
                key_norm=self.key_norm,
                key_softmax_axes=self.key_softmax_axes,
                norm_qv=self.norm_qv,
                content=self.content,
                position=self.position,
                embedding_init_std=self.embedding_init_std,
                bn_momentum=self.bn_momentum,
                bn_epsilon=self.bn_epsilon,
                batch_norm_folded=self.batch_norm_folded,
                **dtypes,
            )
        extra = dict(window=self.attention_window) if block_type == "S" else {}
        return functools.partial(_ATTENTION[block_type], heads=self.heads or 8, **extra, **dtypes)

    def _se(self) -> ModuleDef | None:
        if not self.se_ratio:
            return None
        dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return functools.partial(SqueezeExcite, ratio=self.se_ratio, **dtypes)

    def _shared_table(self, tables: dict, x: jax.Array, stride: int) -> jax.Array:
        """The relative table shared by the lambda layers whose input has this stride."""
        if stride not in tables:
            shape = position_embedding_shape(x.shape[1:3], self.scope_size, self.dim_k, self.dim_u)
            tables[stride] = self.param(
                f"rel_embeddings_stride{stride}",
                nn.initializers.normal(self.embedding_init_std),
                shape,
                self.param_dtype,
            )
        return tables[stride]

    def _remat_stages(self, stages: Sequence[str]) -> frozenset[str]:
        names = stages if self.remat == "all" else self.remat
        names = [n for n in names.split(",") if n] if isinstance(names, str) else names
        unknown = sorted(set(names) - set(stages))
        if unknown:
            raise ValueError(f"remat stages {unknown} unknown; choose among {stages} or 'all'")
        return frozenset(names)
