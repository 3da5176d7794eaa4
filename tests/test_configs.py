"""Every config loads, names a registered model with valid overrides, and documents its command."""

import subprocess
import sys
from pathlib import Path

import pytest

from configs import lambda_resnet
from configs.hybrid_resnet50 import HYBRID_PLACEMENTS
from lambdanet import data, models, train
from lambdanet.config_loading import load_config, load_module

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
EXPERIMENTS = sorted(
    p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in ("__init__", "default")
)


def _module(name: str):
    return load_module(CONFIG_DIR / f"{name}.py")


def test_every_experiment_has_a_config():
    expected = {"demo", "resnet50", "lambda_resnet50_all", "hybrid_resnet50", "imagenette"}
    assert expected | {"lambda_resnet"} <= set(EXPERIMENTS)
    assert lambda_resnet.DEPTHS == [50, 101, 152, 200, 270, 350, 420]


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
    "arg, depth, expected",
    [
        (None, 50, (128, 10, 0.2, 0.0)),
        ("", 50, (128, 10, 0.2, 0.0)),
        ("size=160", 50, (160, 10, 0.2, 0.0)),
        ("depth=101,size=192", 101, (192, 15, 0.2, 0.0)),
        ("depth=152", 152, (192, 15, 0.3, 0.0)),
        ("size=256,depth=152", 152, (256, 15, 0.3, 0.1)),
        ("depth=420", 420, (320, 15, 0.3, 0.2)),
    ],
)
def test_lambda_resnet_configs_follow_table_13(arg, depth, expected):
    config = lambda_resnet.get_config(arg)
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


@pytest.mark.parametrize(
    "arg, message",
    [
        ("depth=101,size=224", r"sizes for it are \[160, 192\].*:depth=101,size=160"),
        ("depth=18", r"depths are \[50, 101, 152, 200, 270, 350, 420\]"),
        ("width=2", r"keys depth and size.*'width=2'"),
        ("depth=big", r"integer values.*'depth=big'"),
        ("152", r"takes depth=D,size=S"),
    ],
)
def test_bad_lambda_resnet_argument_names_the_valid_ones(arg, message):
    with pytest.raises(ValueError, match=message):
        lambda_resnet.get_config(arg)


def test_config_file_loads_by_path_with_its_argument(tmp_path, monkeypatch):
    monkeypatch.chdir(CONFIG_DIR.parent)
    config = load_config("configs/lambda_resnet.py:depth=350,size=288")
    assert (config.model_name, config.dataset.image_size) == ("lambda_resnet350", 288)
    assert load_config("configs/imagenette.py").model_name == "resnet50"
    monkeypatch.chdir(tmp_path)  # relative paths are read from the working directory
    with pytest.raises(FileNotFoundError, match=r"No config file .*configs/demo\.py"):
        load_config("configs/demo.py")


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
    argv = [sys.executable, "-c", parse, "--workdir=unused", "--config=configs/lambda_resnet.py"]
    argv += [*example, "--config.model.stem_conv_impl=direct"]
    out = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.split() == ["512", "0.1", "direct"]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_config_takes_the_implementation_choices(name):
    config = _module(name).get_config()
    model = train.create_model(config, num_classes=10)
    assert (model.stem_conv_impl, model.max_pool_grad) == ("space_to_depth", "views")  # unset
    config.model.lambda_layer.impl, config.model.stem_conv_impl = "einsum", "direct"
    config.model.lambda_layer.scope_size, config.model.scan_blocks = 9, True
    config.model.remat, config.model.remat_policy = "all", "dots_saveable"
    model = train.create_model(config, num_classes=10)
    assert (model.lambda_layer["impl"], model.stem_conv_impl) == ("einsum", "direct")
    assert model.lambda_layer["scope_size"] == 9 and model.scan_blocks
    assert (model.remat, model.remat_policy) == ("all", "dots_saveable")
    config.model.lambda_layer.scope_size = 0  # the global scope (None would mean "unset")
    assert train.create_model(config, num_classes=10).lambda_layer["scope_size"] is None
