"""Chaos test of resumption: SIGKILL a small training run at random times, resume, compare.

    python scripts/chaos_resume.py --trials=20 --seed=0
    python scripts/chaos_resume.py --trials=20 --seed=0 --corrupt

Trains `--config=demo` shrunk to a conv ResNet once without interruption, then again with
`--trials` SIGKILLs at random times (with `--corrupt`, also damaging the newest checkpoint before
each restart), and checks that every restart resumed from the newest good checkpoint and that
every finished run ends with the uninterrupted run's train state. Prints one JSON line (the
summary, `lambdanet.tools.chaos`, whose docstring gives every field); exit status 0 when it
passes, 1 otherwise.
"""

import json
import sys

from absl import app, flags

from lambdanet.tools import chaos

_TRIALS = flags.DEFINE_integer("trials", 20, "Number of SIGKILLs.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the kill times.")
_NUM_TRAIN_STEPS = flags.DEFINE_integer("num_train_steps", 48, "Training steps of each run.")
_DEVICES = flags.DEFINE_integer("devices", 1, "CPU devices of each run (the same for all runs).")
_TOLERANCE = flags.DEFINE_float("tolerance", 1e-6, "Largest final-state difference that passes.")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where runs and logs go (default: a temporary dir)."
)
_CORRUPT = flags.DEFINE_bool(
    "corrupt", False, "Also damage the newest checkpoint before each restart."
)


def main(argv: list[str]) -> None:
    del argv
    summary = chaos.run_chaos(
        _TRIALS.value,
        _SEED.value,
        _NUM_TRAIN_STEPS.value,
        _DEVICES.value,
        _TOLERANCE.value,
        _WORKDIR.value,
        _CORRUPT.value,
    )
    print(json.dumps(summary))
    sys.exit(0 if summary["pass"] else 1)


if __name__ == "__main__":
    app.run(main)
