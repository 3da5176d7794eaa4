"""scripts/sweep_hybrids.py: one run per placement into one CSV + Markdown table."""

import csv

import pytest

from configs import hybrid_resnet50
from scripts import sweep_hybrids as sweep


def test_table_has_one_row_per_placement(tmp_path):
    rows = [
        dict(placement="C,C,L,L", params_m=15.5634, images_per_sec=4980.4, top1=78.31),
        dict(placement="L,L,L,L", params_m=14.9961, images_per_sec=1160.0, top1=78.4),
    ]
    sweep.write_table(rows, str(tmp_path))
    with open(tmp_path / "hybrids.csv") as f:
        assert [r["placement"] for r in csv.DictReader(f)] == ["C,C,L,L", "L,L,L,L"]
    lines = (tmp_path / "hybrids.md").read_text().splitlines()
    assert lines[0] == "| placement | params (M) | inference throughput (images/s) | top-1 (%) |"
    assert lines[2] == "| C → C → L → L | 15.56 | 4980 | 78.3 |"
    assert len(lines) == 4


@pytest.mark.slow
def test_sweep_trains_and_times_each_placement(tmp_path):
    config = hybrid_resnet50.get_config()
    config.model.update(dict(stage_sizes=(1, 1, 1, 1), base_width=4))
    config.dataset.update(dict(name="digits", image_size=32, eval_crop_fraction=1.0))
    config.dataset.max_eval_examples = 32
    config.half_precision, config.ema_decay, config.warmup_epochs = False, 0.0, 0.0
    config.global_batch_size, config.eval_batch_size, config.num_train_steps = 16, 32, 2
    rows = sweep.run_sweep(config, str(tmp_path), ["C,C,C,C", "C,C,C,L"], batch_size=8, steps=1)
    assert [row["placement"] for row in rows] == ["C,C,C,C", "C,C,C,L"]
    assert rows[0]["params_m"] != rows[1]["params_m"]
    assert all(row["images_per_sec"] > 0 and 0 <= row["top1"] <= 100 for row in rows)
    assert (tmp_path / "CCCL" / "final_metrics.json").exists()
