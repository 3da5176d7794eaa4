"""Every config loads by name or path, builds its model from `config.model` unchanged, and
documents its command; the command line reaches every model setting."""

import importlib
import os
import subprocess
import sys

import pytest

from lambdanet import data, models, train
from lambdanet.configs import (
    CONFIG_DIR,
    config_path,
    lambda_resnet,
    list_configs,
    load_config,
    model_config,
)
from lambdanet.configs.hybrid_resnet50 import HYBRID_PLACEMENTS

EXPERIMENTS = [name for name in list_configs() if name != "default"]


def test_every_experiment_has_a_config():
    expected = {"demo", "resnet50", "lambda_resnet50_all", "hybrid_resnet50", "imagenette"}
    assert expected | {"lambda_resnet", "default"} <= set(list_configs())
    assert lambda_resnet.DEPTHS == [50, 101, 152, 200, 270, 350, 420]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_config_builds_its_model_and_documents_its_command(name):
    config = load_config(name)
    module = importlib.import_module(f"lambdanet.configs.{name}")
    assert f"lambdanet-train --config={name}" in module.__doc__
    assert set(config.dataset) == set(data.default_dataset_config())
    assert set(config.model) == set(models.registry.ARCHITECTURE_SETTINGS)
    model = train.create_model(config, num_classes=10)
    assert model.stage_sizes == tuple(config.model.stage_sizes)
    assert config.global_batch_size % 8 == 0 and config.eval_batch_size % 8 == 0


def test_model_config_holds_every_setting_of_the_registered_model():
    config = model_config("lambda_resnet26t", lambda_layer=dict(impl="conv"))
    assert config.to_dict() == models.model_kwargs(
        "lambda_resnet26t", lambda_layer={"impl": "conv"}
    )
    assert config.lambda_layer.scope_size == 9 and config.lambda_layer.impl == "conv"
    model = models.ResNet(**config.to_dict())
    assert model == models.create_model("lambda_resnet26t", lambda_layer=dict(impl="conv"))
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['widht'\].*'base_width'"):
        model_config("resnet50", widht=3)


def test_default_takes_any_registered_model():
    assert load_config("default").model_name == "resnet50"
    config = load_config("default:lambda_resnet50_u4")
    assert config.model.lambda_layer.dim_u == 4 and config.model.lambda_layer.scope_size == 7
    with pytest.raises(ValueError, match="unknown model 'resnet5'; registered models: resnet50"):
        load_config("default:resnet5")


def test_90_epoch_recipe():
    config = load_config("resnet50")
    assert config.model_name == "resnet50"
    assert (config.num_epochs, config.warmup_epochs, config.global_batch_size) == (90, 5, 4096)
    assert (config.learning_rate, config.momentum, config.weight_decay) == (0.1, 0.9, 1e-4)
    assert (config.label_smoothing, config.ema_decay) == (0.1, 0.9999)
    assert config.dataset.image_size == 224
    assert load_config("lambda_resnet50_all").model_name == "lambda_resnet50_all"


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
    assert config.model.drop_path_schedule == "stage"
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


def test_config_loads_by_name_or_by_path_with_its_argument(tmp_path, monkeypatch):
    by_name = load_config("lambda_resnet:depth=350,size=288")
    assert (by_name.model_name, by_name.dataset.image_size) == ("lambda_resnet350", 288)
    monkeypatch.chdir(CONFIG_DIR)  # relative paths are read from the working directory
    by_path = load_config("./lambda_resnet.py:depth=350,size=288")
    assert by_path.to_dict() == by_name.to_dict()
    mine = tmp_path / "mine.py"
    mine.write_text(
        "from lambdanet.configs import demo\n"
        "def get_config(arg):\n    c = demo.get_config()\n    c.seed = int(arg)\n    return c\n"
    )
    monkeypatch.chdir(tmp_path)
    assert load_config("mine.py:7").seed == 7
    assert config_path("demo") == os.path.join(CONFIG_DIR, "demo.py")
    with pytest.raises(FileNotFoundError, match=r"No config file configs/demo\.py .*demo, "):
        load_config("configs/demo.py")
    with pytest.raises(FileNotFoundError, match=r"No config named 'dmeo'; .* default, demo, "):
        load_config("dmeo")


def test_hybrid_config_lists_the_paper_placements():
    config = load_config("hybrid_resnet50")
    assert config.model.placement == "C,C,L,L"
    assert tuple(config.hybrid_placements) == HYBRID_PLACEMENTS and len(HYBRID_PLACEMENTS) == 8
    for placement in HYBRID_PLACEMENTS:
        models.parse_placement(placement, models.STAGE_SIZES[50])


def test_demo_config_trains_the_embedded_digits_on_cpu():
    config = load_config("demo")
    assert config.dataset.name == "digits" and config.dataset.image_size == 32
    assert not config.half_precision and config.ema_decay < 0.999
    assert "L" in config.model.placement


def _parse_in_subprocess(cwd, *argv: str) -> subprocess.CompletedProcess:
    """main's flag parsing in a fresh process, printing the model settings it resolved."""
    parse = (
        "import sys; from absl import flags; from lambdanet import command_line, main; "
        "flags.FLAGS(command_line.resolve_config_flag(sys.argv)); c = main._CONFIG.value; "
        "print(c.global_batch_size, c.model.dropout_rate, c.model.se_ratio, "
        "c.model.lambda_layer.scope_size, c.model.lambda_layer.impl, c.model.remat_policy)"
    )
    argv = [sys.executable, "-c", parse, "--workdir=unused", *argv]
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd)


def test_command_line_reaches_every_model_setting(tmp_path):
    from lambdanet import main  # its docstring; the flags are parsed in a fresh process

    example = ["--config.global_batch_size=512", "--config.model.dropout_rate=0.1"]
    assert "`" + " ".join(example) + "`" in main.__doc__.replace("\n", " ")
    settings = [
        "--config.model.se_ratio=0.25",
        "--config.model.lambda_layer.scope_size=9",
        "--config.model.lambda_layer.impl=conv",
        "--config.model.remat_policy=dots_saveable",
    ]
    out = _parse_in_subprocess(tmp_path, "--config=lambda_resnet", *example, *settings)
    assert out.stdout.split() == ["512", "0.1", "0.25", "9", "conv", "dots_saveable"], out.stderr
    out = _parse_in_subprocess(
        tmp_path, "--config=lambda_resnet", "--config.model.lambda_layer.scope_size=None"
    )
    assert out.stdout.split()[3] == "None", out.stderr  # the global scope


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--config=nope", "No config named 'nope'; the configs shipped with lambdanet are"),
        ("--config.model_name=resnet50", "--config.model_name labels the run"),
    ],
)
def test_command_line_refuses_a_missing_config_or_a_model_name(tmp_path, arg, message):
    argv = [arg] if arg.startswith("--config=") else ["--config=demo", arg]
    out = _parse_in_subprocess(tmp_path, *argv)
    assert out.returncode != 0
    assert message in out.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_model_settings_reach_the_model_unchanged(name):
    config = load_config(name)
    config.model.lambda_layer.impl, config.model.stem_conv_impl = "einsum", "direct"
    config.model.lambda_layer.scope_size, config.model.scan_blocks = 9, True
    config.model.remat, config.model.remat_policy = "all", "dots_saveable"
    model = train.create_model(config, num_classes=10)
    assert (model.lambda_layer["impl"], model.stem_conv_impl) == ("einsum", "direct")
    assert model.lambda_layer["scope_size"] == 9 and model.scan_blocks
    assert (model.remat, model.remat_policy) == ("all", "dots_saveable")
    config.model.lambda_layer.scope_size = None  # the global scope
    assert train.create_model(config, num_classes=10).lambda_layer["scope_size"] is None
