"""What a user hits when something fails (issue #33): each case ends on one clear line that says
what happened, what was kept and what to do, and nothing the workdir recorded is overwritten."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lambdanet import checkpoint, config_records, data, metric_writers, train_loop
from lambdanet.data import array_record
from tests.test_data_array_record import _convert, _folder

REPO = Path(__file__).resolve().parents[1]
# The chaos test's tiny demo: conv layers only, base width 4, batches of 16, no evaluation.
TINY = [
    "--config=demo",
    "--mode=train",
    "--config.model.base_width=4",
    "--config.model.placement=C,C,C,C",
    "--config.global_batch_size=16",
    "--config.eval_batch_size=16",
    "--config.num_train_steps=8",
    "--config.checkpoint_every_steps=4",
    "--config.log_every_steps=4",
]
# A run whose second checkpoint save and the events file's close find the disk full.
DISK_FULL_ON_THE_SECOND_SAVE = """
import errno, os, sys
import orbax.checkpoint as ocp
from lambdanet import main, metric_writers
finalize, calls = ocp.StandardCheckpointHandler.finalize, []
def full(error_path):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(error_path))
def disk_full_on_the_second_save(self, directory):
    calls.append(directory)
    if len(calls) == 2:
        raise full(directory)
    return finalize(self, directory)
def close(self):
    raise full("events")
ocp.StandardCheckpointHandler.finalize = disk_full_on_the_second_save
metric_writers.TensorBoardWriter.close = close
main.run()
"""


def _lambdanet_train(*argv: str, code: str | None = None, env: dict | None = None):
    """`lambdanet-train ARGV` (or `python -c CODE ARGV`) on one CPU device; the result."""
    program = ["-c", code] if code else ["-m", "lambdanet.main"]
    xla_flags = [f for f in os.environ["XLA_FLAGS"].split() if "device_count" not in f]
    env = dict(os.environ, XLA_FLAGS=" ".join(xla_flags), JAX_PLATFORMS="cpu") | (env or {})
    command = [sys.executable, *program, *argv]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _last_line(result) -> str:
    return result.stderr.strip().splitlines()[-1]


def test_1_disk_full_during_a_save_ends_on_the_save_error_without_tracebacks(tmp_path):
    result = _lambdanet_train(f"--workdir={tmp_path}", *TINY, code=DISK_FULL_ON_THE_SECOND_SAVE)
    assert result.returncode == 1
    last = _last_line(result)
    assert last.startswith(f"FATAL Saving a checkpoint in {tmp_path / 'checkpoints'} failed: no")
    assert "the last good checkpoint, step 4 in" in last and "run the same command" in last
    assert "Traceback" not in result.stderr
    assert checkpoint.list_steps(str(tmp_path / "checkpoints")) == [4]


def test_2_a_changed_recipe_is_refused_unless_allowed_and_every_config_is_kept(
    tiny_config, tmp_path
):
    tiny_config.num_train_steps = 4
    train_loop.train_and_evaluate(tiny_config, str(tmp_path), run_eval=False)
    first = (tmp_path / "config.json").read_bytes()

    tiny_config.num_train_steps, tiny_config.label_smoothing = 8, 0.0
    tiny_config.log_every_steps = 2  # bookkeeping: not a change of the recipe
    with pytest.raises(config_records.ConfigChangedError) as refused:
        train_loop.train_and_evaluate(tiny_config, str(tmp_path), run_eval=False)
    message = str(refused.value)
    assert f"Resuming {tmp_path} at step 4 with another recipe than its config.json: " in message
    assert "label_smoothing: 0.1 -> 0.0; num_train_steps: 4 -> 8. Nothing was changed." in message
    assert "log_every_steps" not in message and "--allow_config_change" in message
    assert sorted(p.name for p in tmp_path.glob("config*.json")) == ["config.json"]

    final = train_loop.train_and_evaluate(
        tiny_config, str(tmp_path), run_eval=False, allow_config_change=True
    )
    assert final["step"] == 8 and (tmp_path / "config.json").read_bytes() == first
    with open(tmp_path / "final_metrics.step_4.json") as f:
        assert json.load(f)["step"] == 4  # the first end's, kept
    with open(tmp_path / "config.step_4.json") as f:
        assert json.load(f)["label_smoothing"] == 0.0
    tiny_config.num_train_steps = 12  # the newest record is the one compared with
    with pytest.raises(config_records.ConfigChangedError, match="than its config.step_4.json"):
        train_loop.train_and_evaluate(tiny_config, str(tmp_path), run_eval=False)


@pytest.fixture(scope="module")
def damaged_shards(tmp_path_factory):
    """The shard set of tests/test_data_array_record.py, its second training shard damaged."""
    output = tmp_path_factory.mktemp("shards")
    _convert(_folder(tmp_path_factory.mktemp("folder")), output, examples_per_shard=5, processes=1)
    shard = output / "train-00001-of-00004.array_record"
    damaged = bytearray(shard.read_bytes())
    damaged[3000:3008] = bytes(b ^ 0xFF for b in damaged[3000:3008])  # inside a chunk
    shard.write_bytes(bytes(damaged))
    return output


def test_3_a_damaged_shard_stops_training_naming_it_and_the_command(
    tiny_config, damaged_shards, tmp_path
):
    tiny_config.dataset = data.default_dataset_config()
    tiny_config.dataset.update(
        name="array_record", path=str(damaged_shards), train_split="train", eval_split="val"
    )
    tiny_config.dataset.update(image_size=32, workers=0)
    tiny_config.global_batch_size = tiny_config.eval_batch_size = 8
    with pytest.raises(array_record.ShardReadError) as stopped:
        train_loop.train_and_evaluate(tiny_config, str(tmp_path), run_eval=False)
    message = str(stopped.value)
    shard = damaged_shards / "train-00001-of-00004.array_record"
    assert message.startswith(f"Shard {shard} does not read (Corrupted Riegeli/records file")
    assert f"convert_to_array_record.py --folder=ROOT --output={damaged_shards}`" in message
    assert "Training stopped; no good checkpoint has been saved yet: run the same" in message


def test_4_print_config_of_a_missing_config_file_fails_with_one_line(tmp_path):
    result = _lambdanet_train(f"--config={tmp_path}/missing.py", "--print_config")
    assert result.returncode == 1 and result.stdout == ""
    assert _last_line(result).startswith(
        f"FATAL Flags parsing error: --config={tmp_path}/missing.py: No config file"
    )


def test_5_a_bad_value_ends_on_one_line_and_leaves_no_workdir(tmp_path):
    workdir = tmp_path / "run"
    bad = ["--config.num_train_steps=0", "--config.num_epochs=0"]
    result = _lambdanet_train(f"--workdir={workdir}", *TINY, *bad)
    assert result.returncode == 1
    assert _last_line(result) == (
        "FATAL 1 config value(s) out of range; fix them in the config file or with "
        "--config.FIELD=VALUE: config.num_train_steps=0 and config.num_epochs=0.0: set "
        "num_train_steps > 0 or num_epochs > 0"
    )
    assert "Traceback" not in result.stderr and not workdir.exists()
    verbose = _lambdanet_train(f"--workdir={workdir}", *TINY, *bad, "--verbose")
    assert "Traceback" in verbose.stderr and _last_line(verbose) == _last_line(result)


def test_5_a_mistyped_field_names_the_one_meant(tmp_path):
    result = _lambdanet_train(f"--workdir={tmp_path}", "--config=demo", "--config.modle.name=x")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    last = _last_line(result)
    assert last.startswith("FATAL Flags parsing error: --config.modle.name: the config has no")
    assert 'did you mean "model"' in last.lower()


def test_7_help_exits_0_and_build_is_ignored():
    result = _lambdanet_train("--help")
    assert result.returncode == 0 and "--config" in result.stdout
    ignored = subprocess.run(["git", "check-ignore", "-q", "build/lib/x.py"], cwd=REPO)
    assert ignored.returncode == 0


def test_7_a_read_only_manager_logs_no_warning(tmp_path, caplog):
    manager = checkpoint.create_checkpoint_manager(str(tmp_path))
    manager.close()
    with caplog.at_level("WARNING"):
        checkpoint.create_checkpoint_manager(str(tmp_path), read_only=True).close()
    assert caplog.messages == []


def test_7_a_resume_at_the_final_step_writes_the_train_metrics(tiny_config, tmp_path):
    first = train_loop.train_and_evaluate(tiny_config, str(tmp_path), run_eval=False)
    os.remove(tmp_path / train_loop.FINAL_METRICS_FILE)  # killed after the final save
    again = train_loop.train_and_evaluate(tiny_config, str(tmp_path), run_eval=False)
    with open(tmp_path / train_loop.FINAL_METRICS_FILE) as f:
        written = json.load(f)
    assert written["step"] == 8 and "already_finished" not in again
    for name in ("train_loss", "train_top1", "train_learning_rate"):
        assert written[name] == pytest.approx(first[name], rel=1e-6), name


def test_7_a_train_metrics_read_back_from_either_writer(tmp_path):
    """read_scalars reads the lambdanet writer's events and, with TensorFlow imported (clu's
    writer, scalars packed in tensor_content), TensorFlow's."""
    pytest.importorskip("tensorflow")
    from clu import metric_writers as clu_writers

    for name, writer in (
        ("own", metric_writers.TensorBoardWriter(str(tmp_path / "own"))),
        ("tf", clu_writers.create_default_writer(str(tmp_path / "tf"))),
    ):
        writer.write_scalars(8, {"train_loss": 0.5, "train_top1": 0.25})
        writer.close()
        logged = metric_writers.read_scalars(str(tmp_path / name), 8)
        assert logged == {"train_loss": 0.5, "train_top1": 0.25}, name
