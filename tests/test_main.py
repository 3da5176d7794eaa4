"""The command line: flags reach the config and the mode; a real run writes its workdir."""

import json
import logging as std_logging
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from absl import flags, logging
from absl.testing import flagsaver
from tensorboard.backend.event_processing import event_accumulator

from lambdanet import configs, evaluate, main, train_loop

REPO = Path(__file__).resolve().parents[1]
DEMO = configs.config_path("demo")


@pytest.fixture
def calls(monkeypatch):
    """Runs `main.main` with flags set (as if parsed), recording its call into `train`.

    Parsing the flags sets absl's log level from --verbosity (warnings only); it is restored
    after, or later tests in this process would lose their INFO records."""
    recorded, level = [], logging.get_absl_logger().level
    monkeypatch.setattr(
        train_loop, "train_and_evaluate", lambda *a, **k: recorded.append(("train", a, k)) or {}
    )
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: recorded.append(("eval", a, k)))

    def run(**flag_values):
        with flagsaver.as_parsed(config=DEMO, **flag_values):
            flags.FLAGS.mark_as_parsed()
            main.main(["lambdanet.main"])
        return recorded[-1]

    yield run
    flags.FLAGS.unparse_flags()
    logging.get_absl_logger().setLevel(level)


def test_modes_and_checkpoint_flag(calls, tmp_path):
    kind, (config, workdir), kwargs = calls(workdir=str(tmp_path))
    rules = {"allow_config_change": False, "require_checksums": False}
    assert (kind, workdir, kwargs) == ("train", str(tmp_path), {"run_eval": True} | rules)
    assert config.dataset.name == "digits"
    assert calls(workdir=str(tmp_path), mode="train")[2] == {"run_eval": False} | rules
    kwargs = calls(workdir=str(tmp_path), allow_config_change="true", require_checksums="true")[2]
    assert kwargs == {"run_eval": True, "allow_config_change": True, "require_checksums": True}
    kind, args, _ = calls(workdir=str(tmp_path), mode="eval", checkpoint="40")
    assert kind == "eval" and args[1:] == (str(tmp_path), "40", False)


def test_run_stopped_by_a_signal_exits_with_the_resume_status(calls, monkeypatch, tmp_path):
    monkeypatch.setattr(train_loop, "train_and_evaluate", lambda *a, **k: {"stopped_early": True})
    with pytest.raises(SystemExit) as stopped:
        calls(workdir=str(tmp_path))
    assert stopped.value.code == main.EXIT_STOPPED == 75


def test_an_empty_compilation_cache_flag_turns_the_cache_off(calls, tmp_path):
    """Also when $JAX_COMPILATION_CACHE_DIR (the session's, tests/conftest.py) names one."""
    before = jax.config.jax_compilation_cache_dir
    try:
        calls(workdir=str(tmp_path), compilation_cache="")
        assert jax.config.jax_compilation_cache_dir is None
        assert not jax.config.jax_enable_compilation_cache
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        jax.config.update("jax_enable_compilation_cache", True)


def test_unknown_model_attribute_on_the_command_line_says_how_to_set_it(tmp_path):
    command = [sys.executable, "-m", "lambdanet.main", "--config=demo"]
    command += [f"--workdir={tmp_path}", "--config.model.heads=3"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "FATAL Flags parsing error: --config.model.heads: the config has no field"
    )
    assert "--print_config lists every field" in last
    assert "`config.model.heads = VALUE` in a copy of the config" in last
    assert not os.listdir(tmp_path)


def test_print_config_prints_the_overridden_config_and_builds_nothing(tmp_path):
    command = [sys.executable, "-m", "lambdanet.main", "--config=lambda_resnet:depth=152,size=256"]
    command += ["--config.global_batch_size=512", "--print_config"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert {"model_name: lambda_resnet152", "global_batch_size: 512"} <= set(lines)
    assert "  image_size: 256" in lines and list(tmp_path.iterdir()) == []


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
    assert "Compiling the train step for lambda_resnet50" in log  # said before the long wait
    how = r"\((traced and saved to|traced program loaded from) \S+\)"
    assert re.search(rf"Train step (compiled and cached|loaded from cache) {how}; the first", log)
    assert "step 60/60 (100.0%)" in log and "ETA" in log
    assert "Learning rate: peak 0.1 = 0.4 x 64 / 256" in log
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)
    assert (saved["num_train_steps"], saved["model"]["base_width"]) == (60, 8)
    with open(tmp_path / train_loop.FINAL_METRICS_FILE) as f:
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
    with open(elsewhere / evaluate.EVAL_METRICS_FILE) as f:
        evaluated = json.load(f)
    assert evaluated["step"] == 60
    for name in ("eval_loss", "eval_top1", "eval_top5", "eval_num_examples"):
        assert evaluated[name] == final[name]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_train_like_one_process_with_as_many_devices(tmp_path):
    """The multi-host path on one machine: 2 processes x 2 CPU devices (jax.distributed, gloo
    collectives) against 1 process x 4 devices, same global batch: same losses, every eval
    example counted once, one checkpoint written jointly."""
    flags_ = [f for f in os.environ["XLA_FLAGS"].split() if "device_count" not in f]
    common = [sys.executable, "-m", "lambdanet.main", f"--config={DEMO}"]
    common += ["--config.num_train_steps=2", "--config.log_every_steps=1"]

    def env(devices: int) -> dict:
        xla = " ".join([*flags_, f"--xla_force_host_platform_device_count={devices}"])
        return dict(os.environ, XLA_FLAGS=xla, JAX_PLATFORMS="cpu")

    port = _free_port()
    workers = [
        subprocess.Popen(
            [*common, f"--workdir={tmp_path / 'two'}", f"--coordinator_address=localhost:{port}"]
            + ["--num_processes=2", f"--process_id={i}"],
            cwd=REPO,
            env=env(2),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    logs = [w.communicate(timeout=600)[1] for w in workers]
    for worker, log in zip(workers, logs, strict=True):
        assert worker.returncode == 0, log[-3000:]
    assert "JAX process 1 of 2; 2 local / 4 global devices (cpu)" in logs[1]
    one = subprocess.run(
        [*common, f"--workdir={tmp_path / 'one'}"], cwd=REPO, env=env(4), capture_output=True
    )
    assert one.returncode == 0, one.stderr[-3000:]

    with open(tmp_path / "two" / train_loop.FINAL_METRICS_FILE) as f:
        two_processes = json.load(f)
    with open(tmp_path / "one" / train_loop.FINAL_METRICS_FILE) as f:
        one_process = json.load(f)
    assert two_processes["eval_num_examples"] == one_process["eval_num_examples"] == 300
    for name in ("train_loss", "eval_loss", "eval_top1"):
        assert two_processes[name] == pytest.approx(one_process[name], rel=1e-5), name
    assert (tmp_path / "two" / "checkpoints" / "2").is_dir()


def test_console_filter_drops_orbax_chatter_but_keeps_its_warnings():
    def record(path, level, message):
        return std_logging.LogRecord("absl", level, path, 1, message, None, None)

    orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
    keep = main._QUIET_LIBRARIES.filter
    assert keep(record("/lambdanet/train.py", std_logging.INFO, "Resuming from step 4."))
    assert keep(record(orbax, std_logging.WARNING, "Checkpoint save failed."))
    assert not keep(record(orbax, std_logging.INFO, "Saving checkpoint at step 4."))
    # every interval save without eval metrics (by design) would warn
    assert not keep(
        record(orbax, std_logging.WARNING, "Requested `tracked_metric`; did not provide metrics.")
    )
