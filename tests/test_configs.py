"""Every config loads, names a registered model with valid overrides, and documents its command."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from configs import default
from configs.hybrid_resnet50 import HYBRID_PLACEMENTS
from lambdanet import data, models, train

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
EXPERIMENTS = sorted(
    p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "default")
)
LAMBDA_RESNET_DEPTHS = (50, 101, 152, 200, 270, 350, 420)


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"configs.{name}", CONFIG_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_experiment_has_a_config():
    expected = {"demo", "resnet50", "lambda_resnet50_all", "hybrid_resnet50", "imagenette"}
    expected |= {f"lambda_resnet{depth}" for depth in LAMBDA_RESNET_DEPTHS}
    assert expected <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_config_builds_its_model_and_documents_its_command(name):
    module = _module(name)
    config = module.get_config()
    assert f"python -m lambdanet.main --config=configs/{name}.py" in module.__doc__
    assert set(config.dataset) == set(data.default_dataset_config())
    model = train.create_model(config, num_classes=10)  # unknown overrides raise here
    models.parse_placement(model.placement, model.stage_sizes)
    assert config.global_batch_size % 8 == 0 and config.eval_batch_size % 8 == 0


def test_90_epoch_recipe():
    config = _module("resnet50").get_config()
    assert config.model_name == "resnet50"
    assert (config.num_epochs, config.warmup_epochs, config.global_batch_size) == (90, 5, 4096)
    assert (config.learning_rate, config.momentum, config.weight_decay) == (0.1, 0.9, 1e-4)
    assert (config.label_smoothing, config.ema_decay) == (0.1, 0.9999)
    assert config.dataset.name == "imagenet2012" and config.dataset.image_size == 224
    assert _module("lambda_resnet50_all").get_config().model_name == "lambda_resnet50_all"


@pytest.mark.parametrize(
    "depth, size, expected",
    [
        (50, None, (128, 10, 0.2, 0.0)),
        (101, "192", (192, 15, 0.2, 0.0)),
        (152, None, (192, 15, 0.3, 0.0)),
        (152, "256", (256, 15, 0.3, 0.1)),
        (420, None, (320, 15, 0.3, 0.2)),
    ],
)
def test_lambda_resnet_configs_follow_table_13(depth, size, expected):
    config = _module(f"lambda_resnet{depth}").get_config(size)
    assert config.model_name == f"lambda_resnet{depth}"
    assert (config.num_epochs, config.weight_decay) == (350, 4e-5)
    got = (
        config.dataset.image_size,
        config.dataset.randaugment.magnitude,
        config.model.dropout_rate,
        config.model.drop_path_rate,
    )
    assert got == expected
    assert config.dataset.randaugment.num_layers == 2


def test_image_size_outside_table_13_lists_the_sizes():
    with pytest.raises(ValueError, match=r"sizes for it are \[160, 192\]"):
        default.lambda_resnet_config(101, "224")


def test_hybrid_config_lists_the_paper_placements():
    config = _module("hybrid_resnet50").get_config()
    assert config.model.placement == "C,C,L,L"
    assert tuple(config.hybrid_placements) == HYBRID_PLACEMENTS and len(HYBRID_PLACEMENTS) == 8
    for placement in HYBRID_PLACEMENTS:
        models.parse_placement(placement, models.STAGE_SIZES[50])


def test_demo_config_trains_the_embedded_digits_on_cpu():
    config = _module("demo").get_config()
    assert config.dataset.name == "digits" and config.dataset.image_size == 32
    assert not config.half_precision and config.ema_decay < 0.999
    assert "L" in config.model.placement


def test_main_documents_an_override_that_parses():
    from lambdanet import main  # its docstring; the flags are parsed in a fresh process

    example = ["--config.global_batch_size=512", "--config.model.dropout_rate=0.1"]
    assert "`" + " ".join(example) + "`" in main.__doc__.replace("\n", " ")
    parse = (
        "import sys; from absl import flags; from lambdanet import main; flags.FLAGS(sys.argv); "
        "c = main._CONFIG.value; print(c.global_batch_size, c.model.dropout_rate, "
        "c.model.stem_conv_impl)"
    )
    argv = [sys.executable, "-c", parse, "--workdir=unused", "--config=configs/lambda_resnet50.py"]
    argv += [*example, "--config.model.stem_conv_impl=direct"]
    out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.split() == ["512", "0.1", "direct"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_config_takes_the_implementation_choices(name):
    config = _module(name).get_config()
    model = train.create_model(config, num_classes=10)
    assert (model.stem_conv_impl, model.max_pool_grad) == ("space_to_depth", "views")  # unset
    config.model.impl, config.model.stem_conv_impl = "einsum", "direct"
    model = train.create_model(config, num_classes=10)
    assert (model.impl, model.stem_conv_impl) == ("einsum", "direct")
