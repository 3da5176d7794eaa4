"""The synthetic source: one fixed batch of model-ready images, a `Dataset` like the real ones."""

import numpy as np

from lambdanet import data
from lambdanet.data import synthetic


def _dataset(process_index=0, process_count=1, **fields):
    config = data.default_dataset_config()
    config.update(dict(name="synthetic", image_size=8) | fields)
    return data.create_dataset(
        config,
        global_batch_size=4,
        eval_batch_size=6,
        seed=0,
        process_index=process_index,
        process_count=process_count,
    )


def test_every_train_batch_is_the_same_model_ready_batch():
    ds = _dataset(num_classes=5)
    batches = ds.train_iter(0)
    first, second = next(batches), next(batches)
    assert first["image"].shape == (4, 8, 8, 3) and first["image"].dtype == np.float32
    assert first["label"].dtype == np.int32 and set(first["label"]) <= set(range(5))
    assert first is second and ds.device_preprocess(first, None, train=True) is first
    assert (ds.num_classes, ds.image_size) == (5, 8)
    assert abs(float(first["image"].mean())) < 0.5  # standard normal: already normalised


def test_imagenet_sized_by_default():
    ds = _dataset()
    assert ds.num_classes == synthetic.NUM_CLASSES == len(ds.class_names)
    assert ds.num_train_examples == synthetic.IMAGENET_TRAIN_EXAMPLES


def test_eval_batches_count_every_example_once_over_processes():
    shards = [_dataset(i, 2, max_eval_examples=10) for i in range(2)]
    masks = [[batch["mask"] for batch in ds.eval_iter()] for ds in shards]
    assert len(masks[0]) == len(masks[1]) == shards[0].num_eval_batches
    assert all(mask.shape == (3,) for process in masks for mask in process)
    assert sum(int(mask.sum()) for process in masks for mask in process) == 10
