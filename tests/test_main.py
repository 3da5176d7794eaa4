"""The command line: flags reach the config and the mode; a real run writes its workdir."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from absl.testing import flagsaver
from tensorboard.backend.event_processing import event_accumulator

from lambdanet import main, train

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.py")


@pytest.fixture
def calls(monkeypatch):
    """Runs `main.main` with flags set (as if parsed), recording its call into `train`."""
    recorded = []
    monkeypatch.setattr(
        train, "train_and_evaluate", lambda *a, **k: recorded.append(("train", a, k))
    )
    monkeypatch.setattr(train, "evaluate", lambda *a, **k: recorded.append(("eval", a, k)))

    def run(**flag_values):
        with flagsaver.as_parsed(config=DEMO, **flag_values):
            flags.FLAGS.mark_as_parsed()
            main.main(["lambdanet.main"])
        return recorded[-1]

    yield run
    flags.FLAGS.unparse_flags()


def test_modes_and_checkpoint_flag(calls, tmp_path):
    kind, (config, workdir), kwargs = calls(workdir=str(tmp_path))
    assert (kind, workdir, kwargs) == ("train", str(tmp_path), {"run_eval": True})
    assert config.dataset.name == "digits"
    assert calls(workdir=str(tmp_path), mode="train")[2] == {"run_eval": False}
    kind, args, _ = calls(workdir=str(tmp_path), mode="eval", checkpoint="40")
    assert kind == "eval" and args[1:] == (str(tmp_path), "40")


def test_training_modules_import_without_tensorflow():
    code = (
        "import sys, lambdanet.main, lambdanet.train, lambdanet.checkpoint;"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def _demo(*argv: str) -> str:
    """Runs the README's main command (on one CPU device) with `argv` added; returns its log."""
    command = [sys.executable, "-m", "lambdanet.main", f"--config={DEMO}", *argv]
    xla_flags = [f for f in os.environ["XLA_FLAGS"].split() if "device_count" not in f]
    env = dict(
        os.environ, JAX_LOG_COMPILES="1", XLA_FLAGS=" ".join(xla_flags)
    )  # 1 CPU as in README
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


def test_demo_command_trains_compiles_once_and_eval_only_reproduces_it(tmp_path):
    """The demo, shortened by flags (half the width, 60 steps of 64), then --mode=eval on it."""
    overrides = [
        "--config.model.base_width=8",
        "--config.global_batch_size=64",
        "--config.eval_batch_size=64",
        "--config.num_train_steps=60",
        "--config.log_every_steps=20",
    ]
    log = _demo(f"--workdir={tmp_path}", *overrides)
    assert log.count("Compiling jit(train_step)") == 1
    assert "step 60/60 (100.0%)" in log and "ETA" in log
    assert "Learning rate: peak 0.1 = 0.4 x 64 / 256" in log
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)
    assert (saved["num_train_steps"], saved["model"]["base_width"]) == (60, 8)
    with open(tmp_path / train.FINAL_METRICS_FILE) as f:
        final = json.load(f)
    assert final["step"] == 60 and final["eval_num_examples"] == 300
    assert final["eval_top1"] > 0.6, final  # chance is 0.1
    events = event_accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    assert {"train_loss", "train_top1", "eval_top1", "images_per_sec"} <= set(
        events.Tags()["scalars"]
    )

    elsewhere = tmp_path / "eval"
    _demo(
        f"--workdir={elsewhere}",
        *overrides,
        "--mode=eval",
        f"--checkpoint={tmp_path}/checkpoints/60",
    )
    with open(elsewhere / train.EVAL_METRICS_FILE) as f:
        evaluated = json.load(f)
    assert evaluated["step"] == 60
    for name in ("eval_loss", "eval_top1", "eval_top5", "eval_num_examples"):
        assert evaluated[name] == final[name]
