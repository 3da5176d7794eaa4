r"""Where the device time of a profiled step goes: kernel classes and the top kernels.

Reads the newest Perfetto trace at or under TRACE_DIR_OR_FILE, as `scripts/benchmark.py
--profile-dir=DIR` writes them (`lambdanet.tools.profile_summary` says how kernels are classed):

    python scripts/benchmark.py --config=default:resnet50 --modes=train --profile-dir=traces \
        --steps=10
    python scripts/profile_summary.py traces/resnet50_train --steps=10
"""

import gzip
import json
import sys
from collections.abc import Sequence

from absl import app, flags

from lambdanet.tools import profile_summary

_STEPS = flags.DEFINE_integer("steps", 1, "Steps the trace holds (for per-step times).")
_TOP = flags.DEFINE_integer("top", 12, "How many kernels to list.")


def main(argv: Sequence[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: profile_summary.py TRACE_DIR_OR_FILE [--steps=N] [--top=K]")
    path = profile_summary.find_trace(argv[1])
    with gzip.open(path) as f:
        trace = json.load(f)
    result = profile_summary.summary(profile_summary.kernel_times(trace), _STEPS.value, _TOP.value)
    print(f"Trace: {path}")
    print(profile_summary.markdown(result))
    print(json.dumps(result))


if __name__ == "__main__":
    app.run(main)
