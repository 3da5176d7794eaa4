"""Command line of `lambdanet.benchmark`: throughput, memory and compile time vs timm.

    python scripts/benchmark.py --model lambda_resnet50ts --peer timm:lambda_resnet50ts
    python scripts/benchmark.py --layer | --table4 | --cost-table

See `lambdanet/benchmark.py` for the protocol; one JSON line per measurement.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lambdanet.benchmark import main  # noqa: E402

if __name__ == "__main__":
    main()
