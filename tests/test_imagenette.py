"""The Imagenette configs on a sample of the real photographs: train, eval-only, summarise."""

import os
from pathlib import Path

import numpy as np
import pytest

from lambdanet import evaluate, train, train_loop
from lambdanet.configs import imagenette
from lambdanet.data import arrays_writer as make_arrays
from lambdanet.tools import summarize as summarize_runs

IMAGENETTE = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenette"
TINY = dict(stage_sizes=(1, 1, 1, 1), base_width=8)


@pytest.mark.parametrize("model", sorted(imagenette.MODELS))
def test_every_imagenette_model_builds_with_the_shared_recipe(model):
    config = imagenette.get_config(model)
    reference = imagenette.get_config()
    for field in ("learning_rate", "num_epochs", "global_batch_size", "ema_decay", "weight_decay"):
        assert config[field] == reference[field]
    assert config.dataset == reference.dataset
    train.create_model(config, num_classes=10)


def test_unknown_imagenette_model_lists_the_choices():
    with pytest.raises(ValueError, match=r"--config=imagenette:NAME .*'all_lambda'"):
        imagenette.get_config("resnet18")


@pytest.mark.skipif(not IMAGENETTE.is_dir(), reason="../shared/data/imagenette is absent")
def test_hybrid_trains_on_an_imagenette_sample_and_eval_only_agrees(tmp_path):
    arrays = str(tmp_path / "sample.npz")
    make_arrays.make_arrays(
        arrays, folder=str(IMAGENETTE), splits=["train", "val"], size=40, max_per_class=2
    )
    config = imagenette.get_config("hybrid")
    config.model.update(TINY)
    config.dataset.update(dict(path=arrays, image_size=32))
    config.update(dict(global_batch_size=8, eval_batch_size=8, num_epochs=2.0, warmup_epochs=1.0))
    config.update(dict(half_precision=False, log_every_steps=1, eval_every_epochs=1.0))
    workdir = str(tmp_path / "run")

    final = train_loop.train_and_evaluate(config, workdir)
    assert final["step"] == 4  # 20 images, batch 8: 2 steps an epoch
    assert np.isfinite(final["train_loss"]) and 0 <= final["eval_top1"] <= 1
    evaluated = evaluate.evaluate(config, workdir)
    assert evaluated["eval_top1"] == pytest.approx(final["eval_top1"], abs=1e-6)

    run = summarize_runs.summarize("hybrid", workdir)
    assert [round(epoch) for epoch, _ in run["curve"]] == [1, 2]
    assert run["curve"][-1][1] == pytest.approx(final["eval_top1"], abs=1e-6)
    assert run["eval_only_top1"] == pytest.approx(final["eval_top1"], abs=1e-6)
    assert run["model"] == "hybrid_resnet50" and run["num_params"] == final["num_params"]
    table = summarize_runs.markdown_table([run])
    assert f"| hybrid | hybrid_resnet50 | {final['num_params'] / 1e6:.2f}M | 2 |" in table
    png = str(tmp_path / "curves.png")
    summarize_runs.plot_curves([run], png, "sample")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 1000


def test_scalars_of_the_tensorflow_free_writer_are_read_back(tmp_path):
    from lambdanet import metric_writers

    writer = metric_writers.TensorBoardWriter(str(tmp_path))
    writer.write_hparams({"model_name": "resnet50", "model": {"base_width": 8}})
    writer.write_scalars(20, {"eval_top1": 0.5, "images_per_sec": 100.0})
    writer.write_scalars(10, {"eval_top1": 0.25})
    writer.close()
    scalars = summarize_runs.read_scalars(str(tmp_path))
    assert scalars == {"eval_top1": [(10, 0.25), (20, 0.5)], "images_per_sec": [(20, 100.0)]}
