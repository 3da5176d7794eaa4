"""Where the device time of a profiled step goes: kernel classes and the top kernels.

Reads the Perfetto trace that `scripts/benchmark.py --profile-dir=DIR` writes (JAX profiler,
`create_perfetto_trace=True`) and sums the device kernels' durations; `scripts/profile_summary.py`
is its command line.

Classes (by kernel name): matrix units (cuDNN convolutions, cuBLAS/Triton GEMMs), reduction
fusions (BatchNorm statistics and other XLA reductions), elementwise fusions (XLA loop fusions:
BatchNorm apply, activations, optimizer updates), copies/transposes, and the rest. Without
device streams in the trace (a CPU run) every complete event of the XLA threads counts.
"""

import collections
import re
from pathlib import Path

CLASSES = (  # the first match wins: "convert" is no conv, "input_transpose" no reduction
    (
        "matrix units (conv / GEMM)",
        re.compile(r"xmma|gemm|cutlass|nvjet|cudnn|conv(?!ert)|wgmma|dot"),
    ),
    ("copies / transposes", re.compile(r"copy|transpose|memcpy|memset")),
    ("reduction fusions", re.compile(r"^input_|reduce|reduction")),
    ("elementwise fusions", re.compile(r"^loop_|fusion")),
)


def find_trace(path: str) -> Path:
    """The newest perfetto_trace.json.gz at or under `path`."""
    path = Path(path)
    traces = [path] if path.is_file() else sorted(path.rglob("perfetto_trace.json.gz"))
    if not traces:
        raise FileNotFoundError(f"No perfetto_trace.json.gz under {path}; write one with "
                                "scripts/benchmark.py --profile-dir.")  # fmt: skip
    return max(traces, key=lambda p: p.stat().st_mtime)


def kernel_times(trace: dict) -> dict[str, list[float]]:
    """Kernel name -> durations (microseconds) on the device streams (else the XLA threads)."""
    events = trace["traceEvents"]
    process = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    thread = {
        (e["pid"], e.get("tid")): e["args"]["name"]
        for e in events
        if e.get("name") == "thread_name"
    }
    device = {pid for pid, name in process.items() if "/device:" in name}

    def counted(e) -> bool:
        if device:
            return e["pid"] in device
        name = thread.get((e["pid"], e.get("tid")), "")  # the thunks hold the ops: skip them
        return name.startswith("tf_XLA") and not e["name"].startswith("ThunkExecutor")

    times = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "dur" in e and counted(e):
            times[e["name"]].append(float(e["dur"]))
    return times


def classify(name: str) -> str:
    lowered = name.lower()
    for label, pattern in CLASSES:
        if pattern.search(lowered):
            return label
    return "other"


def summary(times: dict[str, list[float]], steps: int, top: int) -> dict:
    """Per-step milliseconds by class and for the `top` kernels."""
    total = sum(sum(d) for d in times.values())
    by_class = collections.Counter()
    for name, durations in times.items():
        by_class[classify(name)] += sum(durations)
    kernels = sorted(times.items(), key=lambda item: -sum(item[1]))[:top]
    return {
        "device_ms_per_step": total / 1000 / steps,
        "classes": {k: (v / 1000 / steps, v / total) for k, v in by_class.most_common()},
        "top": [
            (name, sum(d) / 1000 / steps, len(d) // steps, classify(name)) for name, d in kernels
        ],
    }


def markdown(result: dict) -> str:
    lines = [f"Device time per step: {result['device_ms_per_step']:.2f} ms", ""]
    lines += ["| class | ms / step | share |", "|---|---|---|"]
    lines += [f"| {k} | {ms:.2f} | {share:.0%} |" for k, (ms, share) in result["classes"].items()]
    lines += ["", "| kernel | ms / step | calls / step | class |", "|---|---|---|---|"]
    lines += [f"| `{n[:70]}` | {ms:.3f} | {c} | {k} |" for n, ms, c, k in result["top"]]
    return "\n".join(lines)
