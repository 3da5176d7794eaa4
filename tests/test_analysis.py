"""Parameter counts, FLOPs and the Table 4 memory model (Table 4)."""

from __future__ import annotations

import math

import pytest

from lambdanet import analysis
from lambdanet.models import create_model


def test_count_params_resnet50():
    assert analysis.count_params(create_model("resnet50")) == 25_557_032


def test_flops_resnet50():
    # ResNet-50 (stride on the 3x3 conv) is 4.09 G multiply-adds at 224; XLA counts 2 per MAC.
    assert abs(analysis.flops(create_model("resnet50")) / 2 / 4.09e9 - 1) < 0.05


@pytest.mark.parametrize("name", ["resnet50", "lambda_resnet26t"])
def test_flops_do_not_count_the_space_to_depth_kernel_padding(name):
    blocks = create_model(name, stem_conv_impl="space_to_depth")
    direct = create_model(name, stem_conv_impl="direct")
    assert analysis.flops(blocks) == analysis.flops(direct)


def test_stage_shapes():
    shapes = analysis.stage_shapes(create_model("resnet50"), (224, 320))
    assert shapes == {"c2": (56, 80), "c3": (28, 40), "c4": (14, 20), "c5": (7, 10)}


def one_unit_of_second_digit(value: float) -> float:
    return 10 ** (math.floor(math.log10(value)) - 1)


@pytest.mark.parametrize(
    "layer, kwargs, paper",  # Table 4 "Memory (GB)"
    [
        ("global_sa", {}, 120),
        ("axial_sa", {}, 4.8),
        ("lambda", {}, 1.9),
        ("lambda", {"dim_k": 8}, 0.95),
        ("lambda_shared", {}, 0.63),
    ],
)
def test_table4_memory(layer, kwargs, paper):
    assert abs(analysis.table4_memory_gib(layer, **kwargs) - paper) <= one_unit_of_second_digit(
        paper
    )


def test_table4_memory_exact_values():
    # 16·4 B·(3·56⁴ + 4·28⁴ + 6·14⁴ + 3·7⁴) and the global SA maps at b=128, |h|=8.
    assert analysis.table4_memory_gib("lambda") * 2**30 == 16 * 4 * 32_199_811
    assert analysis.table4_memory_gib("global_sa") * 2**30 == 128 * 8 * 4 * 32_199_811


def test_table4_unknown_layer():
    with pytest.raises(ValueError, match="global_sa"):
        analysis.table4_memory_gib("attention")
