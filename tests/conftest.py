"""Test session set-up, before any test imports jax.

* 8 fake CPU devices, so sharded code runs as on 8 accelerators (XLA reads the flag when the CPU
  backend starts). Tests that need one device build their mesh from `jax.devices()[:1]`.
* `--xla_backend_optimization_level=0`: tests run tiny programs, for which LLVM's optimisation
  time dominates; this halves compile times on CPU.
* A persistent compilation cache in a temporary directory for the session: runs that compile the
  same program again (resume, eval-only, CLI subprocesses) load it instead.
"""

import atexit
import os
import shutil
import tempfile

import pytest

NUM_FAKE_DEVICES = 8

os.environ["XLA_FLAGS"] = " ".join(
    [
        os.environ.get("XLA_FLAGS", ""),
        f"--xla_force_host_platform_device_count={NUM_FAKE_DEVICES}",
        "--xla_backend_optimization_level=0",
    ]
).strip()

_CACHE_DIR = tempfile.mkdtemp(prefix="lambdanet_jax_cache_")
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


@pytest.fixture
def tiny_config():
    """The demo config shrunk for fast CPU tests.

    A conv-only ResNet (one bottleneck per stage, base width 4) with dropout and stochastic depth
    (so the dropout rng matters), batch 16 of digits at 32x32 without crop augmentation, 8 steps,
    no warm-up and no EMA. Tests that change no traced setting share one compiled train step
    through the cache above.
    """
    from lambdanet.configs import demo, model_config

    config = demo.get_config()
    config.model_name = "resnet50"
    config.model = model_config(
        "resnet50", stage_sizes=(1, 1, 1, 1), base_width=4, dropout_rate=0.1, drop_path_rate=0.1
    )
    config.dataset.train_crop_area = (1.0, 1.0)
    config.dataset.train_crop_aspect_ratio = (1.0, 1.0)
    config.global_batch_size = 16
    config.eval_batch_size = 32
    config.dataset.max_eval_examples = 64
    config.num_train_steps = 8
    config.learning_rate = 3.2  # peak 0.2 at batch 16
    config.warmup_epochs = 0.0
    config.ema_decay = 0.0
    config.log_every_steps = 4
    config.eval_every_epochs = 0.0
    config.checkpoint_every_steps = 4
    return config
