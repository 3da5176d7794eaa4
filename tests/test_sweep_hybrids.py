"""The sweep (lambdanet.tools.sweep, scripts/sweep_hybrids.py): entries as data, runs packed
and resumed, the seed table and plot."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lambdanet.tools import sweep, sweep_jobs, sweep_table

REPO = Path(__file__).resolve().parents[1]
SCRIPT = str(REPO / "scripts" / "sweep_hybrids.py")
# Two placements of the demo's LambdaResNet, shrunk to a few seconds of CPU per run.
TINY_SWEEP = """
from lambdanet.configs.demo import get_config

def get_sweep():
    return [
        ("CCCC", "demo", {"model.placement": "C,C,C,C"}),
        ("CCCL", "demo", {"model.placement": "C,C,C,L"}),
    ]
"""
TINY_RUN = [
    "--config.model.base_width=4",
    "--config.num_train_steps=2",
    "--config.global_batch_size=16",
    "--config.eval_batch_size=32",
    "--config.dataset.max_eval_examples=32",
    "--config.ema_decay=0.0",
    "--config.warmup_epochs=0.0",
    "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=1",
]
TINY_THROUGHPUT = ["--throughput_batch_size=8", "--throughput_steps=1"]


def _run(entry, seed, top1, params=1_000_000):
    return dict(kind="run", entry=entry, placement="C,C,L,L", seed=seed, top1=top1,
                num_params=params, wall_s=10.0, resumed=False)  # fmt: skip


def _speed(entry, mode, img_per_s, placement="C,C,L,L"):
    return dict(kind="throughput", entry=entry, placement=placement, mode=mode,
                img_per_s=img_per_s, batch_size=128, device="H200", wall_s=5.0)  # fmt: skip


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _sweep(tmp_path, *argv, sweep_file=None, **kwargs):
    """The script in a fresh process on one CPU device, the tiny sweep by default."""
    if sweep_file is None:
        sweep_file = tmp_path / "tiny_sweep.py"
        sweep_file.write_text(TINY_SWEEP)
    command = [sys.executable, SCRIPT, f"--config={sweep_file}", f"--workdir={tmp_path / 'w'}"]
    xla_flags = [f for f in os.environ["XLA_FLAGS"].split() if "device_count" not in f]
    env = dict(os.environ, XLA_FLAGS=" ".join(xla_flags), JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    return command + list(argv), dict(cwd=tmp_path, env=env, text=True, **kwargs)


def test_table_maths_against_hand_computed_numbers(tmp_path):
    records = [
        *(_run("A", s, v) for s, v in enumerate((0.78, 0.79, 0.80))),  # 79.0 ± 1.0
        *(_run("B", s, v, 2_000_000) for s, v in enumerate((0.75, 0.76))),  # 75.5 ± 0.7071
        *(_run("C", s, v) for s, v in enumerate((0.80, 0.78, 0.79))),  # 79.0 ± 1.0
        _run("D", 0, 0.70),  # one seed: no std, in no pair
        _speed("A", "infer", 5000.0),
        _speed("A", "train", 1500.0),
        _speed("B", "infer", 3000.0),
    ]
    rows = sweep_table.summarize(records, order=["B"])
    assert [row["entry"] for row in rows] == ["B", "A", "C", "D"]
    b, a, _, d = rows
    assert (a["n_seeds"], a["top1_mean"], a["top1_std"]) == (3, pytest.approx(79.0), 1.0)
    assert b["top1_mean"] == pytest.approx(75.5) and b["top1_std"] == pytest.approx(0.5**0.5)
    assert (b["params_m"], b["infer_img_per_s"], b["train_img_per_s"]) == (2.0, 3000.0, None)
    assert (d["n_seeds"], d["top1_std"]) == (1, None)
    # SE of A - B: sqrt(1/3 + 0.5/2) = 0.7638 < 3.5 / 2; A - C: difference 0.
    se = math.sqrt(1 / 3 + 0.5 / 2)
    pairs = sweep_table.significant_pairs(rows)
    assert pairs == [("B", "A", pytest.approx(-3.5), pytest.approx(se)),
                     ("B", "C", pytest.approx(-3.5), pytest.approx(se))]  # fmt: skip

    sweep_table.write_table(rows, str(tmp_path / "t"), note="NOTE")
    with open(tmp_path / "t.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert csv_rows[1]["entry"] == "A" and float(csv_rows[1]["top1_mean"]) == pytest.approx(79.0)
    assert csv_rows[0]["train_img_per_s"] == "" and csv_rows[3]["top1_std"] == ""
    lines = (tmp_path / "t.md").read_text().splitlines()
    assert lines[0] == (
        "| entry | placement | seeds | top-1 (%), mean ± std | params (M) | inference (img/s) "
        "| training (img/s) |"
    )
    assert lines[2] == "| B | C → C → L → L | 2 | 75.5 ± 0.7 | 2.00 | 3000 | - |"
    assert lines[3] == "| A | C → C → L → L | 3 | 79.0 ± 1.0 | 1.00 | 5000 | 1500 |"
    assert lines[5] == "| D | C → C → L → L | 1 | 70.0 | 1.00 | - | - |"
    assert "NOTE" in lines and lines[-2:] == [
        "- B - A: -3.50 points (SE 0.76)",
        "- B - C: -3.50 points (SE 0.76)",
    ]
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sweep_table.markdown_table(rows[:1]).splitlines()[-1] == "- none"


def test_sweep_entries_are_data_in_both_forms():
    entries = sweep.sweep_entries("imagenette")
    assert [e.name for e in entries] == [
        "resnet50", "LCCC", "LLCC", "LLLC", "LLLL", "CLLL", "CCLL", "CCCL", "lambda_resnet26t"
    ]  # fmt: skip
    labels = []
    for entry in entries:
        config = sweep.resolve_config(entry, ["--config.dataset.path=imagenette.npz"])
        assert config.dataset.path == "imagenette.npz"
        labels.append(sweep.placement_label(config))
        if entry.config.endswith(":hybrid"):
            assert config.model.lambda_layer.embedding_init_std == 0.25  # imagenette's hybrid
    assert labels[0] == "C,C,C,C" and labels[1] == "L,C,C,C" and labels[-1] == "C,C,CL,L"

    paper = sweep.sweep_entries("hybrid_resnet50")
    assert [e.name for e in paper][:2] == ["CCCC", "LCCC"] and len(paper) == 8
    assert paper[0].config == "hybrid_resnet50"  # the config as named
    assert sweep.select_entries(paper, ["LLLL", "CCCC"]) == [paper[0], paper[4]]
    with pytest.raises(ValueError, match=r"has no field 'heads'"):
        sweep.resolve_config(paper[0], ["--config.model.heads=2"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--only=CCCL,nope"], "--only: no entries ['nope'] in the sweep; its entries are"),
        (["--seeds=0"], "--seeds is the number of seeds per entry: give 1 or more"),
        (["--parallel=0"], "--parallel is the number of runs per GPU: give 1 or more"),
        (["--config.model.nope=1"], "the config has no field 'nope'"),
        (["--gpus="], "--gpus lists the GPU indices to use, e.g. --gpus=0,1."),
    ],
)
def test_bad_input_is_refused_before_anything_starts(tmp_path, argv, message):
    command, kwargs = _sweep(tmp_path, *argv)
    result = subprocess.run(command, capture_output=True, timeout=120, **kwargs)
    assert result.returncode == 1 and message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "w").exists()


def _sleeper(tmp_path, name, seconds, estimate=None):
    def finish(wall_s):
        return [{"kind": "run", "entry": name, "seed": 0, "wall_s": wall_s}]

    command = [sys.executable, "-c", f"import time; time.sleep({seconds})"]
    log = str(tmp_path / f"{name}.txt")
    return sweep_jobs.Job(("run", name, 0), command, log, {}, lambda: estimate, finish)


def test_jobs_share_slots_and_stop_at_the_deadline(tmp_path):
    jobs = [_sleeper(tmp_path, name, 0.5) for name in "abc"]
    done, start = [], time.monotonic()
    left, failed = sweep_jobs.run_jobs(
        jobs, ["0", "0"], sweep_jobs.Stopper(0), done.append, grace_s=5
    )
    assert (left, failed) == ([], []) and [r["entry"] for r in done] == ["a", "b", "c"]
    assert 1.0 <= time.monotonic() - start < 5  # two at a time, then the third

    jobs = [_sleeper(tmp_path, "long", 60), _sleeper(tmp_path, "too_long", 1, estimate=100)]
    start = time.monotonic()
    left, failed = sweep_jobs.run_jobs(
        jobs, ["0", "1"], sweep_jobs.Stopper(2), done.append, grace_s=5
    )
    assert left == [("run", "too_long", 0), ("run", "long", 0)] and failed == []
    assert time.monotonic() - start < 10 and len(done) == 3  # SIGTERM ended the sleeper


def test_given_results_are_not_run_again(tmp_path):
    given = tmp_path / "given.jsonl"
    records = [_run(e, s, 0.5) for e in ("CCCC", "CCCL") for s in (0, 1)]
    records += [_speed(e, m, 100.0) for e in ("CCCC", "CCCL") for m in ("infer", "train")]
    _write_jsonl(given, records[:5])
    _write_jsonl(tmp_path / "more.jsonl", records[5:])
    new = tmp_path / "new.jsonl"
    argv = [f"--results={new},{given},{tmp_path / 'more.jsonl'}", "--seeds=2", *TINY_RUN]
    command, kwargs = _sweep(tmp_path, *argv)
    result = subprocess.run(command, capture_output=True, timeout=120, **kwargs)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not new.exists() and sorted(os.listdir(tmp_path / "w")) == sweep_outputs("hybrids")
    assert "| CCCL | C → C → L → L | 2 | 50.0 ± 0.0 |" in result.stdout

    # Measurements take 5 s and runs 10 s in the given lines: none fits in 3 s.
    command, kwargs = _sweep(tmp_path, f"--results={given}", "--seeds=3", "--deadline_s=3")
    command += ["--only=CCCL"]
    result = subprocess.run(command, capture_output=True, timeout=120, **kwargs)
    assert result.returncode == sweep.EXIT_STOPPED, result.stderr[-2000:]
    # One measurement process per entry (both modes), one run.
    assert "1 measurement(s) and 1 run(s) left (not expected to end before the deadline)" in (
        result.stderr
    )
    assert not (tmp_path / "w" / "CCCL").exists()


def test_run_estimates_come_from_finished_runs_that_did_not_resume():
    records = [_run("A", 0, 0.5) | dict(wall_s=30.0), _run("A", 1, 0.5) | dict(wall_s=50.0)]
    records += [_run("A", 2, 0.5) | dict(wall_s=1.0, resumed=True), _run("B", 0, 0.5)]
    assert sweep.estimate_s(records, "run", "A", 7.0) == 40.0
    assert sweep.estimate_s(records, "run", "C", 7.0) == 30.0  # the median of all entries'
    assert (
        sweep.estimate_s([], "run", "C", 7.0) == 7.0 and sweep.estimate_s([], "run", "C", 0) is None
    )


def test_finished_workdirs_count_as_results(tmp_path):
    entry = sweep.Entry("CCLL", "hybrid_resnet50", {"model.placement": "C,C,L,L"})
    final = dict(eval_top1=0.75, num_params=15_560_000, train_time_sec=100.0)
    for seed in (0, 1):
        (tmp_path / "CCLL" / f"seed{seed}").mkdir(parents=True)
        (tmp_path / "CCLL" / f"seed{seed}" / "final_metrics.json").write_text(json.dumps(final))
    records = [_run("CCLL", 0, 0.5)]  # seed 0 has its line: not read again
    found = sweep.finished_runs([entry], {"CCLL": "C,C,L,L"}, 3, str(tmp_path), records)
    assert [(r["seed"], r["top1"], r["wall_s"], r["resumed"]) for r in found] == [
        (1, 0.75, None, None)
    ]
    assert found[0]["workdir"] == str(tmp_path / "CCLL" / "seed1")


def sweep_outputs(prefix):
    return sorted(f"{prefix}.{ext}" for ext in ("csv", "md", "png"))


def test_killed_sweep_resumes_and_a_finished_one_runs_nothing(tmp_path):
    """A real sweep (2 entries x 2 seeds, 2 at a time), SIGKILLed with its runs after the first
    result; run again it ends with one line per run and measurement; again, it runs nothing.
    CCCC's throughput comes from a given file."""
    given, results = tmp_path / "given.jsonl", tmp_path / "results.jsonl"
    speeds = [_speed("CCCC", "infer", 100.0, "C,C,C,C"), _speed("CCCC", "train", 50.0, "C,C,C,C")]
    _write_jsonl(given, speeds)
    argv = [f"--results={results},{given}", "--seeds=2", "--parallel=2", *TINY_THROUGHPUT]
    command, kwargs = _sweep(tmp_path, *argv, *TINY_RUN)
    sweeper = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, **kwargs)  # fmt: skip
    deadline = time.monotonic() + 240
    while not (results.exists() and '"kind": "run"' in results.read_text()):
        assert sweeper.poll() is None and time.monotonic() < deadline, "no run finished"
        time.sleep(0.2)
    os.killpg(sweeper.pid, signal.SIGKILL)  # the sweep and the runs it started
    sweeper.wait()

    result = subprocess.run(command, capture_output=True, timeout=240, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = _read_jsonl(results)
    keys = sorted(sweep.result_key(r) for r in lines)
    assert keys == sorted(
        [("run", e, s) for e in ("CCCC", "CCCL") for s in (0, 1)]
        + [("throughput", "CCCL", "infer"), ("throughput", "CCCL", "train")]
    )
    run = next(r for r in lines if r["kind"] == "run" and r["entry"] == "CCCL")
    assert run["placement"] == "C,C,C,L" and 0 <= run["top1"] <= 1 and run["num_params"] > 0
    assert run["workdir"] == str(tmp_path / "w" / "CCCL" / f"seed{run['seed']}")
    assert "Final metrics" in (Path(run["workdir"]) / "log.txt").read_text()
    with open(Path(run["workdir"]) / "config.json") as f:
        assert json.load(f)["seed"] == run["seed"]
    table = (tmp_path / "w" / "hybrids.md").read_text()
    assert "| CCCL | C → C → C → L | 2 |" in table and "| 100 | 50 |" in table

    logs = {p: p.stat().st_size for p in (tmp_path / "w").glob("*/seed*/log.txt")}
    result = subprocess.run(command, capture_output=True, timeout=120, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _read_jsonl(results) == lines
    assert {p: p.stat().st_size for p in logs} == logs  # no run started

    command = [sys.executable, SCRIPT, "--table_only", f"--results={given},{results}"]
    command.append(f"--table={tmp_path / 'again' / 'table'}")
    result = subprocess.run(command, capture_output=True, timeout=120, **kwargs)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "again" / "table.md").read_text() == table
    assert sorted(os.listdir(tmp_path / "again")) == sweep_outputs("table")


def test_runs_and_measurements_name_their_config_and_take_every_override(tmp_path):
    entry = sweep.sweep_entries("imagenette")[-2]  # CCCL: imagenette:hybrid, model.placement
    given = ["--config.dataset.path=x.npz"]
    run = sweep.train_job(entry, "C,C,C,L", 1, str(tmp_path), given, 1, lambda: None)
    assert run.command[1:] == [
        "-m",
        "lambdanet.main",
        "--config=imagenette:hybrid",
        f"--workdir={tmp_path / 'CCCL' / 'seed1'}",
        "--config.seed=1",
        "--config.data_seed=1",
        "--config.model.placement=C,C,C,L",
        "--config.dataset.path=x.npz",
    ]
    options = sweep.SweepOptions(
        workdir=str(tmp_path), results=[], table=None, seeds=1, parallel=1, gpus=["0"],
        only=None, deadline_s=0, run_estimate_s=0, stop_grace_s=1, throughput_batch_size=8,
        throughput_steps=2,
    )  # fmt: skip
    measure = sweep.throughput_command(entry, ["infer", "train"], given, options)
    assert measure[1] == str(REPO / "scripts" / "benchmark.py")
    assert measure[measure.index("--config=imagenette:hybrid") + 1 :][:2] == [
        "--config.model.placement=C,C,C,L",
        "--config.dataset.path=x.npz",
    ]
    assert {"--modes=infer,train", "--batch-size=8", "--warmup=2", "--steps=2"} <= set(measure)
    with pytest.raises(ValueError, match=r"entry CCCL \(imagenette:hybrid\): flag --config.seed"):
        sweep.resolve_config(entry, ["--config.seed=one"])
