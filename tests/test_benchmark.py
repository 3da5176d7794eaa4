"""The benchmark tool runs on CPU (tiny model, one step); its bookkeeping is exact."""

import gzip
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lambdanet.tools import benchmark, benchmark_measure, benchmark_tables, profile_summary

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
TINY = {"model.stage_sizes": (1, 1, 1, 1), "model.base_width": 8, "half_precision": False}
ONE_STEP = dict(warmup=1, windows=1, steps=1, isolate=False)


def _records_of(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line[:1] == "{"]


def _script(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *argv],
        capture_output=True,
        text=True,
        timeout=600,
        check=check,
    )


def test_the_script_measures_a_config_with_its_overrides():
    out = _script(
        "--config=default:resnet50",
        "--config.model.stage_sizes=(1,1,1,1)",
        "--config.model.base_width=8",
        "--config.half_precision=False",
        "--config.dataset.num_classes=10",
        "--image-size=32",
        "--batch-size=8",
        "--warmup=1",
        "--windows=1",
        "--steps=1",
        "--no-isolate",
    ).stdout
    records = _records_of(out)
    assert [r["mode"] for r in records] == ["train", "infer"]
    for record in records:
        assert "error" not in record, record
        assert record["img_per_s"] > 0 and record["compile_s"] > 0
        assert record["num_params"] > 0 and record["device"] and record["jax"]
        assert (record["config"], record["model"], record["dtype"]) == (
            "default:resnet50",
            "resnet50",
            "float32",
        )
        assert record["config_overrides"]["model.base_width"] == 8
        assert (record["image_size"], record["batch_size"]) == (32, 8)
    assert records[1]["fold_bn"] is True  # inference folds BatchNorm unless --no-fold-bn


def test_a_bad_flag_combination_is_a_usage_error_naming_the_fix():
    out = _script("--parallel=2", check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "add --cost-table or drop --parallel" in out.stderr


def test_specs_apply_the_protocol_then_the_overrides():
    spec = dict(config="imagenette:resnet50", config_overrides={"ema_decay": 0.5}, batch_size=8)
    config = benchmark_measure.spec_config(spec)
    assert (config.ema_decay, config.nesterov, config.label_smoothing) == (0.5, True, 0.1)
    assert (config.dataset.name, config.dataset.image_size) == ("synthetic", 128)
    assert config.global_batch_size == 8
    as_given = benchmark_measure.spec_config(spec | dict(image_size=64), protocol=False)
    assert (as_given.dataset.name, as_given.dataset.image_size) == ("in_memory", 64)


def test_peers_run_beside_each_mode_at_the_configs_image_size():
    settings = benchmark.Settings(
        config="imagenette:resnet50", peers=("timm:resnet50",), peer_compile=True
    )
    specs = benchmark.build_specs(settings)
    assert [(s.get("model", s.get("config")), s["mode"]) for s in specs] == [
        ("imagenette:resnet50", "train"),
        ("timm:resnet50", "train"),
        ("timm:resnet50", "train"),
        ("imagenette:resnet50", "infer"),
        ("timm:resnet50", "infer"),
    ]
    assert [s["compile"] for s in specs if "compile" in s] == [False, True, False]
    assert {(s["image_size"], s["num_classes"]) for s in specs if "num_classes" in s} == {
        (128, 1000)
    }


def test_a_peer_without_timm_is_an_error_record(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # importing it raises ImportError
    spec = dict(kind="model", mode="train", model="timm:resnet18", image_size=32, batch_size=2)
    record = benchmark_measure.run_measurement(spec | dict(num_classes=10, warmup=1))
    assert record["error"].startswith(("ImportError", "ModuleNotFoundError"))


def test_scaling_runs_data_parallel_on_the_first_n_devices(capsys):
    settings = benchmark.Settings(
        config="default:resnet50",
        config_overrides=TINY | {"sync_batch_norm": False},
        image_size=32,
        batch_size=4,
        modes=("train",),
        scaling=(1, 2, 16),
        **ONE_STEP,
    )
    benchmark.run(settings)
    out = capsys.readouterr().out
    one, two, too_many = _records_of(out)
    assert two["config_overrides"]["sync_batch_norm"] is False
    assert (one["num_devices"], one["batch_size"]) == (1, 4)
    assert (two["num_devices"], two["batch_size"]) == (2, 8)  # --batch-size is per device
    assert one["img_per_s"] > 0 and two["img_per_s"] > 0
    assert "16 devices asked for but 8 are visible" in too_many["error"]
    efficiency = two["img_per_s"] / (2 * one["img_per_s"])
    rows = out.splitlines()
    row = next(r for r in rows if r.startswith("| default:resnet50 | train | 2 |"))
    assert f"| {efficiency:.3f} |" in row


@pytest.mark.parametrize("counts", ["2,4", "1,x", "0,1"])
def test_scaling_counts_must_be_positive_and_include_one(counts):
    with pytest.raises(ValueError, match=r"including 1 \(the base\)"):
        benchmark.device_counts(counts)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(parallel=2), "add --cost-table or drop --parallel"),
        (dict(cost_table=True, parallel=2, isolate=False), "drop --no-isolate"),
        (dict(cost_table=True, parallel=0), "1 or more"),
        (dict(scaling=(1, 2), peers=("timm:resnet50",)), "--scaling times --config's model alone"),
        (dict(table4=True, config="default"), "configs of their own: drop --config"),
        (dict(modes=("train", "eval")), "--modes takes train and/or infer"),
    ],
)
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        benchmark.Settings(**settings)


def test_profile_is_written_and_summarised(tmp_path, capsys):
    settings = benchmark.Settings(
        config="default:resnet50",
        config_overrides=TINY,
        image_size=32,
        batch_size=8,
        modes=("infer",),
        profile_dir=str(tmp_path),
        **ONE_STEP | dict(steps=2),
    )
    benchmark.run(settings)
    (record,) = _records_of(capsys.readouterr().out)
    assert record["trace_dir"] == str(tmp_path / "resnet50_infer")
    trace = profile_summary.find_trace(record["trace_dir"])
    with gzip.open(trace) as f:
        times = profile_summary.kernel_times(json.load(f))
    result = profile_summary.summary(times, steps=2, top=3)
    assert result["device_ms_per_step"] > 0 and len(result["top"]) == 3
    assert sum(share for _, share in result["classes"].values()) == pytest.approx(1.0)
    assert any(label.startswith("matrix units") for label in result["classes"])  # the convs
    assert "| class | ms / step | share |" in profile_summary.markdown(result)


def test_kernel_names_are_classified():
    classify = profile_summary.classify
    assert classify("sm90_xmma_fprop_implicit_gemm_bf16bf16") == "matrix units (conv / GEMM)"
    assert classify("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NNN") == classify("gemm_fusion_dot")
    assert classify("input_reduce_fusion_3") == "reduction fusions"
    assert classify("loop_add_fusion_1") == "elementwise fusions"
    assert classify("loop_transpose_fusion_9") == "copies / transposes"
    assert classify("memcpy32_post") == "copies / transposes"
    assert classify("input_transpose_fusion_8") == "copies / transposes"
    assert classify("loop_convert_fusion") == "elementwise fusions"
    assert classify("triton_convolution_fusion") == "matrix units (conv / GEMM)"


def test_layer_benchmark_runs_on_cpu():
    spec = dict(kind="layer", shape=(4, 4, 32), impl="einsum", scope=3, batch_size=2)
    record = benchmark_measure.run_measurement(spec | dict(warmup=1, windows=1, steps=1))
    assert "error" not in record, record
    assert record["ms"] > 0


def test_layer_specs_follow_shapes_and_only():
    shapes = benchmark.layer_shapes("8x8x32,4x4x64")
    settings = benchmark.Settings(layer=True, layer_shapes=shapes, only="rows,einsum")
    assert [(s["shape"], s["impl"]) for s in benchmark.build_specs(settings)] == [
        ((8, 8, 32), "einsum"),
        ((8, 8, 32), "rows"),
        ((4, 4, 64), "einsum"),
        ((4, 4, 64), "rows"),
    ]
    with pytest.raises(ValueError, match="--layer-shapes takes a comma list of positive HxWxD"):
        benchmark.layer_shapes("8x8")


def test_a_failure_is_reported_not_raised():
    spec = dict(kind="model", mode="train", config="default:no_such_model", batch_size=2)
    record = benchmark_measure.run_measurement(spec)
    assert record["error"].startswith("ValueError: unknown model 'no_such_model'")


def test_cost_table_halves_the_batch_until_it_fits_and_counts_gpu_hours(capsys):
    calls = []

    def fake_measure(spec):
        calls.append(spec["batch_size"])
        if spec["batch_size"] > 32:
            return spec | {"error": "JaxRuntimeError: RESOURCE_EXHAUSTED: Out of memory"}
        return spec | {"img_per_s": 1000.0, "epochs": 350.0, "image_size": 320}

    settings = benchmark.Settings(cost_table=True, only="lambda_resnet420:320", **ONE_STEP)
    (record,) = benchmark.cost_table(settings, fake_measure)
    assert calls == [128, 64, 32] and record["config"] == "lambda_resnet420:320"
    hours = 350 * 1_281_167 / 1000 / 3600
    assert record["gpu_hours_1gpu"] == pytest.approx(hours)
    assert record["wall_hours_8gpu_linear"] == pytest.approx(hours / 8)
    table = benchmark_tables.cost_markdown([record])
    assert "| lambda_resnet420:320 | 320 | 350 | 32 | - | 1000 | 124.6 |" in table
    assert "| measured |" in table  # no device in the record


def test_parallel_cost_rows_run_at_once_each_on_a_gpu_of_its_own(capsys):
    lock, busy, started = threading.Lock(), set(), []

    def fake_isolated(spec, device=None):
        with lock:
            assert device in (0, 1) and device not in busy, (device, busy)
            busy.add(device)
            started.append(len(busy))
        time.sleep(0.2)
        with lock:
            busy.discard(device)
        return spec | {"img_per_s": 1000.0, "epochs": 350.0, "image_size": 256}

    only = "lambda_resnet152:256,lambda_resnet350:256,lambda_resnet350:288"
    settings = benchmark.Settings(cost_table=True, parallel=2, only=only)
    records = benchmark.cost_table(settings, fake_isolated)
    assert [r["config"] for r in records] == only.split(",")
    assert len(started) == 3 and max(started) == 2  # two rows ran at once, never on one GPU
    assert len(_records_of(capsys.readouterr().out)) == 3


def test_isolated_worker_sees_only_its_gpu(monkeypatch):
    seen = {}

    def fake_run(argv, **kwargs):
        seen.update(kwargs, argv=argv)
        return subprocess.CompletedProcess(argv, 0, stdout='{"img_per_s": 1.0}\n', stderr="")

    monkeypatch.setattr(benchmark_measure.subprocess, "run", fake_run)
    assert benchmark_measure.run_isolated({}, device=3) == {"img_per_s": 1.0}
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == "3"
    assert seen["argv"][1:3] == ["-m", "lambdanet.tools.benchmark_measure"]
    benchmark_measure.run_isolated({})
    assert seen["env"] is None  # every visible device


def test_missing_cost_rows_interpolate_the_flop_rate_of_their_family(tmp_path, monkeypatch, capsys):
    gflops = {"lambda_resnet152:192": 16.0, "lambda_resnet152:224": 21.8,
              "lambda_resnet270:256": 52.0, "lambda_resnet350:256": 66.0,
              "lambda_resnet50_all": 66.0}  # fmt: skip
    monkeypatch.setattr(benchmark_tables, "config_flops", lambda name: gflops[name] * 1e9)
    measured = [
        {
            "config": "lambda_resnet152:192",
            "batch_size": 128,
            "img_per_s": 2000.0,
            "epochs": 350.0,
            "device": "NVIDIA H200",
        },
        {"config": "lambda_resnet270:256", "batch_size": 64, "img_per_s": 900.0, "epochs": 350.0},
        {"config": "lambda_resnet350:288", "batch_size": 128, "error": "worker exited 1"},
        # another family (Table 3 model) with the very FLOPs of lambda_resnet350:256: not used
        {"config": "lambda_resnet50_all", "batch_size": 128, "img_per_s": 5000.0, "epochs": 90.0},
    ]
    path = tmp_path / "cost.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in measured) + "\n")
    only = "lambda_resnet152:192,lambda_resnet152:224,lambda_resnet350:256"
    benchmark.run(benchmark.Settings(cost_table=True, estimate_from=str(path), only=only))
    out = capsys.readouterr().out
    rows = {r["config"]: r for r in _records_of(out)}
    assert list(rows) == only.split(",")
    assert "estimated_from" not in rows["lambda_resnet152:192"]
    assert rows["lambda_resnet152:192"]["img_per_s"] == 2000.0
    between = rows["lambda_resnet152:224"]  # FLOP rates 32,000 and 46,800 G at 16 and 52 GFLOPs
    assert between["estimated_from"] == "lambda_resnet152:192 .. lambda_resnet270:256"
    t = math.log(21.8 / 16.0) / math.log(52.0 / 16.0)
    assert between["img_per_s"] == pytest.approx(((1 - t) * 32_000 + t * 46_800) / 21.8)
    assert (
        between["batch_size"] == 128 and between["image_size"] == 224 and between["epochs"] == 350
    )
    beyond = rows["lambda_resnet350:256"]  # past the largest measured row: its rate, its batch
    assert beyond["estimated_from"] == "lambda_resnet270:256" and beyond["batch_size"] == 64
    assert beyond["gpu_hours_1gpu"] == pytest.approx(350 * 1_281_167 / (900 * 52 / 66) / 3600)
    assert "| lambda_resnet350:256 | 256 | 350 | 64 | 66.0 | 709 | 175.7 | 22.0 |" in out
    assert "estimated from lambda_resnet270:256 |" in out
    assert "| 16.0 | 2000 | - | - | measured on H200 |" in out  # a measured row names its GPU


def test_every_cost_config_and_table4_model_exists():
    from lambdanet.models import list_models

    for name, *_ in benchmark_tables.TABLE4_ROWS:
        assert benchmark_tables.load_config(name).model_name in list_models()
    for name in benchmark_tables.COST_CONFIGS:
        config = benchmark_tables.load_config(name)
        assert config.model_name in list_models()
        if ":" in name:
            assert config.dataset.image_size == int(name.split(":")[1])


def test_input_pipeline_benchmark_runs_a_config_on_cpu(tmp_path):
    from lambdanet.data import in_memory

    rng = np.random.default_rng(0)
    splits = {
        split: in_memory.ImageArrays(
            rng.integers(0, 256, (n, 36, 36, 3), np.uint8), np.arange(n, dtype=np.int32) % 10
        )
        for split, n in (("train", 24), ("val", 8))
    }
    in_memory.save_npz(tmp_path / "a.npz", splits, [str(i) for i in range(10)], image_format="raw")
    overrides = {"dataset.path": str(tmp_path / "a.npz"), "dataset.image_size": 32}
    overrides |= {"global_batch_size": 8, "model.stage_sizes": [1, 1, 1, 1], "model.base_width": 4}
    spec = dict(kind="input", config="imagenette:resnet50", config_overrides=overrides)
    record = benchmark_measure.run_measurement(spec | dict(warmup=1, windows=2, steps=2))
    assert "error" not in record, record
    assert record["model"] == "resnet50" and record["batch_size"] == 8
    assert record["real_img_per_s"] > 0 and record["synthetic_img_per_s"] > 0
    assert record["real_vs_synthetic"] == pytest.approx(
        record["real_img_per_s"] / record["synthetic_img_per_s"]
    )
    assert len(record["window_img_per_s"]["real"]) == 2 and record["input_ms_per_step"] > 0
