"""Sweep conv/lambda placements with seeds: runs packed onto GPUs, throughput, one table and plot.

A sweep is a list of entries (name, config, overrides), each trained once per seed. `--config`
names a config file and is read in one of two forms:
  * the file defines `get_sweep()`, the entries as data: (name, config FILE[:ARG] relative to the
    repository root, {FIELD: VALUE} overrides). configs/imagenette.py's is the hybrid table on
    Imagenette: ResNet-50, the paper's seven hybrid placements, LambdaResNet-26t;
  * otherwise the config (`FILE[:ARG]`) has `hybrid_placements`, one entry per placement, named
    by its letters (C,C,L,L: CCLL), that config with `model.placement` set
    (configs/hybrid_resnet50.py: the paper's table on ImageNet).
Every `--config.FIELD=VALUE` after the flags goes to every run (e.g. the dataset's path).

Run (entry, seed k): `python -m lambdanet.main --config=CONFIG --workdir=WORKDIR/<entry>/seed<k>
--config.seed=k --config.data_seed=k --config.FIELD=VALUE...`, from the repository root, its
console log appended to WORKDIR/<entry>/seed<k>/log.txt; `--parallel` P runs per GPU of
`--gpus` (CUDA_VISIBLE_DEVICES; XLA_PYTHON_CLIENT_MEM_FRACTION 0.9/P when P > 1), seed by seed
(every entry's seed 0 first: the table fills in early, and later seeds load their programs from
JAX's compilation cache, which concurrent runs of one entry would each compile). Before the
runs, while no run holds a GPU, each entry's inference and training throughput is measured once,
alone on one GPU, both in one process (`scripts/benchmark.py --no-isolate --modes=infer,train`:
synthetic inputs, 1,000 classes, the config's image size and precision, batch
`--throughput_batch_size`), its output in WORKDIR/<entry>/throughput.txt.

Every finished run (entry, placement, seed, top-1, parameters, train and wall time, workdir) and
every measurement is one JSON line appended to the first file of `--results` (default
WORKDIR/results.jsonl). All the files given are read at the start and what they hold is not run
again, nor is a run whose workdir holds final_metrics.json (its line is added): a killed sweep
continues where it stopped, an interrupted run resuming from its workdir's checkpoint. Entries are
identified by name. `--deadline_s` starts no run or measurement expected to end after it (the
median wall time of the entry's finished runs that did not resume, else of all entries', else
`--run_estimate_s`; measurements: the median of earlier ones) and, when it passes, stops those in
flight (SIGTERM, which saves a checkpoint; SIGKILL after `--stop_grace_s`); so does a SIGTERM or
SIGINT to the sweep. Exit status: 0 when nothing is left, 75 when some work is left (run the same
command again), 1 when a run or a measurement failed (its log is named).

After each result, and with `--table_only` from the `--results` files alone (plus the workdirs'
final_metrics.json when --config and --workdir are given), it writes TABLE.csv, TABLE.md and
TABLE.png (`--table`, default WORKDIR/hybrids): per entry its placement, number of seeds, top-1
mean ± sample standard deviation over seeds, parameters, inference and training img/s; the
Markdown also lists the pairs of entries whose top-1 means differ by more than 2 standard errors
(sqrt(s1²/n1 + s2²/n2)); the PNG plots top-1 (error bars: one std) against inference img/s,
points labelled by entry, the all-conv and all-lambda entries marked as the end points.

(a) The Imagenette table on one H200 (the array file, 44 MiB, written once on any machine from
fast.ai's imagenette2-160 folder; see configs/imagenette.py):

    python scripts/make_arrays.py --folder=IMAGENETTE_DIR --splits=train,val --size=128 \
        --quality=85 --output=artifacts/imagenette_128.npz
    python scripts/sweep_hybrids.py --config=configs/imagenette.py --workdir=workdir/hybrids \
        --seeds=3 --parallel=3 --deadline_s=480 --stop_grace_s=30 \
        --results=results/raw/hybrids_imagenette.jsonl --table=results/raw/hybrids_imagenette \
        --config.dataset.path=artifacts/imagenette_128.npz

Run it again until it exits 0; on a fresh machine it reruns only what the results file lacks.

(b) The table and plot again, from the results files of one or several calls:

    python scripts/sweep_hybrids.py --table_only \
        --results=results/raw/hybrids_imagenette.jsonl[,MORE.jsonl] \
        --table=results/raw/hybrids_imagenette

The paper's table on ImageNet: `--config=configs/hybrid_resnet50.py --workdir=workdir/hybrids
--config.dataset.manual_dir=DIR_WITH_IMAGENET_TARS`.
"""

import csv
import dataclasses
import itertools
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from lambdanet import config_loading
from lambdanet.checkpoint import CHECKPOINT_DIR
from lambdanet.train import EXIT_STOPPED, FINAL_METRICS_FILE

ROOT = Path(__file__).resolve().parents[1]
RUN_LOG = "log.txt"
THROUGHPUT_MODES = ("infer", "train")
THROUGHPUT_FIELDS = ("img_per_s", "window_img_per_s", "batch_size", "image_size", "dtype")
THROUGHPUT_FIELDS += ("num_params", "device", "jax", "compile_s", "peak_gib")
MEMORY_SHARED = 0.9  # of a GPU's memory, split between the runs packed onto it
POLL_S = 0.5
COLUMNS = ("entry", "placement", "n_seeds", "top1_mean", "top1_std", "params_m")
COLUMNS += ("infer_img_per_s", "train_img_per_s")
HEADERS = ("entry", "placement", "seeds", "top-1 (%), mean ± std", "params (M)")
HEADERS += ("inference (img/s)", "training (img/s)")

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of a sweep: `python -m lambdanet.main --config=CONFIG` with `overrides`."""

    name: str
    config: str  # FILE[:ARG], relative to the repository root
    overrides: dict


@dataclasses.dataclass
class Job:
    """One subprocess of the sweep (a training run or a throughput measurement)."""

    key: tuple  # ("run", entry, seed) or ("throughput", entry)
    command: list[str]
    log: str  # its stdout and stderr
    env: dict  # added to the environment, with the slot's GPU
    estimate_s: Callable[[], float | None]  # its expected wall time now (None: unknown)
    finish: Callable[[float], list[dict]]  # (wall s) -> its result lines, [] if it failed


def define_flags() -> None:
    """Command-line flags; defined only when run as a script, so tests can import the module."""
    flags.DEFINE_string("config", None, "FILE[:ARG] with get_sweep() or hybrid_placements.")
    flags.DEFINE_string("workdir", None, "Directory of the runs (WORKDIR/<entry>/seed<k>).")
    flags.DEFINE_list("results", None, "JSON-lines files: all read, new lines go to the first.")
    flags.DEFINE_string("table", None, "TABLE.csv/.md/.png (default WORKDIR/hybrids).")
    flags.DEFINE_integer("seeds", 3, "Seeds per entry: config.seed = config.data_seed = 0 .. N-1.")
    flags.DEFINE_integer("parallel", 1, "Runs at once per GPU.")
    flags.DEFINE_list("gpus", ["0"], "GPU indices the runs are spread over.")
    flags.DEFINE_list("only", None, "Entries to run (default: all of the sweep).")
    flags.DEFINE_float("deadline_s", 0.0, "Budget in seconds from the start (0: none).")
    flags.DEFINE_float("run_estimate_s", 0.0, "A run's wall time before any finished (0: none).")
    flags.DEFINE_float("stop_grace_s", 60.0, "Seconds between SIGTERM and SIGKILL at a stop.")
    flags.DEFINE_integer("throughput_batch_size", 128, "Batch of the throughput runs.")
    flags.DEFINE_integer("throughput_steps", 30, "Steps per timed throughput window.")
    flags.DEFINE_bool("table_only", False, "Only write the table and plot from --results.")
    flags.register_validator(
        "seeds", lambda n: n >= 1, "--seeds is the number of seeds per entry: give 1 or more."
    )
    flags.register_validator(
        "parallel", lambda n: n >= 1, "--parallel is the number of runs per GPU: give 1 or more."
    )
    flags.register_validator(
        "gpus",
        lambda ids: bool(ids) and all(i.isdigit() for i in ids),
        "--gpus lists the GPU indices to use, e.g. --gpus=0,1.",
    )


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing of the sweep's flags; returns [program, --config.FIELD=VALUE ...], the
    overrides that go to every run."""
    overrides = [arg for arg in argv[1:] if arg.startswith("--config.")]
    rest = app.parse_flags_with_usage([arg for arg in argv if arg not in overrides])
    if len(rest) > 1:
        sys.exit(
            f"sweep_hybrids: unexpected arguments {rest[1:]}: give flags as --NAME=VALUE (the "
            "runs' overrides as --config.FIELD=VALUE)."
        )
    return [argv[0], *overrides]


def sweep_entries(config: str) -> list[Entry]:
    """The entries of `config` (FILE[:ARG], relative to the working directory): FILE's
    `get_sweep()`, else one per placement of the config's `hybrid_placements`."""
    path, sep, arg = config.partition(":")
    module = config_loading.load_module(path)
    if hasattr(module, "get_sweep"):
        entries = [Entry(*entry) for entry in module.get_sweep()]
    else:
        source = f"{os.path.relpath(path, ROOT)}{sep}{arg}"
        placements = config_loading.load_config(config).get("hybrid_placements")
        if not placements:
            raise ValueError(
                f"--config={config} defines neither get_sweep() nor hybrid_placements: give a "
                "sweep file (e.g. configs/imagenette.py) or a config with hybrid_placements "
                "(configs/hybrid_resnet50.py)."
            )
        entries = [Entry(p.replace(",", ""), source, {"model.placement": p}) for p in placements]
    names = [entry.name for entry in entries]
    bad = [name for name in names if not re.fullmatch(r"[\w.-]+", name) or names.count(name) > 1]
    if bad:
        raise ValueError(f"{config}: entry names {bad} repeat or are not directory names.")
    return entries


def select_entries(entries: list[Entry], only: Sequence[str] | None) -> list[Entry]:
    """The entries named in `only` (all if None), in the sweep's order."""
    known = [entry.name for entry in entries]
    unknown = sorted(set(only or ()) - set(known))
    if unknown:
        raise ValueError(f"--only: no entries {unknown} in the sweep; its entries are {known}.")
    return [entry for entry in entries if not only or entry.name in only]


def override_args(overrides: dict) -> list[str]:
    """{FIELD: VALUE} as lambdanet.main's --config.FIELD=VALUE arguments."""
    return [f"--config.{field}={value}" for field, value in overrides.items()]


def resolve_config(entry: Entry, overrides: Sequence[str] = ()):
    """The entry's config after its and `overrides`' --config.FIELD=VALUE, as lambdanet.main
    parses it; a ValueError names the entry and the field when an override does not apply."""
    argv = ["sweep", f"--config={ROOT / entry.config}", *override_args(entry.overrides)]
    argv += overrides
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
    try:
        values(argv)
    except (AttributeError, flags.Error) as error:
        problem = error
        if isinstance(error, AttributeError):  # raised by ml_collections for an unknown field
            problem = f"the config has no field {str(error).strip(chr(34) + chr(39))!r}"
        raise ValueError(
            f"entry {entry.name} ({entry.config}, {argv[2:]}): {problem}. --config.FIELD "
            "overrides only fields the config defines: check the spelling and the value."
        ) from error
    return values.config


def placement_label(config) -> str:
    """The placement of the config's model: its `model.placement`, else the registry's."""
    from lambdanet import train

    return str(train.create_model(config, 1000).placement)


def read_results(paths: Sequence[str]) -> list[dict]:
    """The lines of the JSON-lines files that exist, the first occurrence of each key kept."""
    records, seen = [], set()
    for path in paths:
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number} is not a JSON line ({error})") from error
                if result_key(record) not in seen:
                    seen.add(result_key(record))
                    records.append(record)
    return records


def result_key(record: dict) -> tuple:
    """("run", entry, seed) or ("throughput", entry, mode): what one result line stands for."""
    second = record["seed"] if record["kind"] == "run" else record["mode"]
    return record["kind"], record["entry"], second


def append_result(path: str, record: dict) -> None:
    """Appends `record` as one line in a single write (a kill leaves no partial line)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def run_dir(workdir: str, entry: str, seed: int) -> str:
    return os.path.join(workdir, entry, f"seed{seed}")


def run_record(entry: Entry, placement: str, seed: int, run_workdir: str, **timing) -> dict:
    """The result line of a finished run, from its final_metrics.json; `timing`: wall_s and
    resumed (None when unknown)."""
    with open(os.path.join(run_workdir, FINAL_METRICS_FILE)) as f:
        final = json.load(f)
    return dict(
        kind="run",
        entry=entry.name,
        config=entry.config,
        overrides=entry.overrides,
        placement=placement,
        seed=seed,
        top1=final["eval_top1"],
        num_params=final["num_params"],
        train_time_s=final["train_time_sec"],
        workdir=run_workdir,
        **timing,
    )


def estimate_s(records: list[dict], kind: str, entry: str, default: float) -> float | None:
    """Expected wall time of a `kind` job of `entry`: the median over the entry's earlier ones
    (runs: those that did not resume), else over all entries', else `default` (0: unknown)."""
    done = [
        r for r in records if r["kind"] == kind and r.get("wall_s") and not r.get("resumed", False)
    ]
    own = [r["wall_s"] for r in done if r["entry"] == entry]
    times = own or [r["wall_s"] for r in done]
    return statistics.median(times) if times else (default or None)


def throughput_job(
    entry: Entry, placement: str, config, modes: Sequence[str], log: str, estimate
) -> Job:
    """One process that measures `modes` of the config's model in turn (scripts/benchmark.py's
    model measurement, 1,000 classes, `--throughput_batch_size`), its output in `log`."""
    command = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--no-isolate"]
    command += [f"--model={config.model_name}", f"--overrides={json.dumps(config.model.to_dict())}"]
    command += [f"--modes={','.join(modes)}", f"--image-size={config.dataset.image_size}"]
    command += ["--dtype=" + ("bfloat16" if config.half_precision else "float32")]
    command += [f"--batch-size={FLAGS.throughput_batch_size}", "--num-classes=1000"]
    steps = FLAGS.throughput_steps
    command += [f"--warmup={steps}", "--windows=3", f"--steps={steps}"]

    def finish(wall_s: float) -> list[dict]:
        lines = [line for line in Path(log).read_text().splitlines() if line.startswith("{")]
        measured = [json.loads(line) for line in lines]
        measured = [m for m in measured if "img_per_s" in m]
        if [m["mode"] for m in measured] != list(modes):
            return []
        head = dict(kind="throughput", entry=entry.name, placement=placement)
        return [
            head
            | dict(mode=m["mode"])
            | {k: m.get(k) for k in THROUGHPUT_FIELDS}
            | dict(wall_s=wall_s)
            for m in measured
        ]

    return Job(("throughput", entry.name), command, log, {}, estimate, finish)


def train_job(entry, placement, seed, workdir, overrides, parallel, estimate) -> Job:
    """The run of `entry` with `seed` in WORKDIR/<entry>/seed<seed>, with the --config.FIELD
    `overrides` of every run; `parallel` runs share its GPU."""
    path = run_dir(workdir, entry.name, seed)
    checkpoints = os.path.join(path, CHECKPOINT_DIR)
    resumed = os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints))
    command = [sys.executable, "-m", "lambdanet.main", f"--config={entry.config}"]
    # A seed draws the initialisation, dropout and the data order and augmentation.
    command += [
        f"--workdir={os.path.abspath(path)}",
        f"--config.seed={seed}",
        f"--config.data_seed={seed}",
    ]
    command += [*override_args(entry.overrides), *overrides]
    memory = {"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{MEMORY_SHARED / parallel:.3f}"}

    def finish(wall_s: float) -> list[dict]:
        return [run_record(entry, placement, seed, path, wall_s=wall_s, resumed=resumed)]

    log, env = os.path.join(path, RUN_LOG), memory if parallel > 1 else {}
    return Job(("run", entry.name, seed), command, log, env, estimate, finish)


class Stopper:
    """Whether the sweep must stop: its deadline passed, or `on_signal` was called."""

    def __init__(self, deadline_s: float):
        self.deadline = time.monotonic() + deadline_s if deadline_s > 0 else math.inf
        self.signalled = False

    def on_signal(self, signum, frame) -> None:
        """A signal handler: stop now."""
        del signum, frame
        self.signalled = True

    def __call__(self) -> bool:
        return self.signalled or time.monotonic() >= self.deadline

    def fits(self, estimate: float | None) -> bool:
        """Whether a job expected to take `estimate` s (None: unknown) ends before the deadline."""
        return estimate is None or time.monotonic() + estimate <= self.deadline


def run_jobs(jobs: list[Job], slots: list[str], stop: Stopper, on_result, grace_s: float):
    """Runs `jobs`, one per slot (the GPU index it runs on) at a time, from the repository root;
    calls `on_result(line)` for each that succeeded. Returns (keys of the jobs left, logs of
    those that failed)."""
    pending, running = list(jobs), {}  # running: slot number -> (job, process, start)
    left, failed = [], []
    while pending or running:
        for slot, (job, process, start) in list(running.items()):
            if process.poll() is None:
                continue
            del running[slot]
            results = job.finish(time.monotonic() - start) if process.returncode == 0 else []
            for result in results:
                on_result(result)
            if results:
                continue
            if process.returncode == EXIT_STOPPED or stop():  # stopped by a signal
                left.append(job.key)
            else:
                failed.append(job.log)
        if stop():
            _stop_processes([process for _, process, _ in running.values()], grace_s)
            in_flight = [job for job, _, _ in running.values()]
            return left + [job.key for job in pending + in_flight], failed
        for slot in [i for i in range(len(slots)) if i not in running]:
            job = next((j for j in pending if stop.fits(j.estimate_s())), None)
            if job is None:
                break
            pending.remove(job)
            running[slot] = (job, _start(job, slots[slot]), time.monotonic())
        if pending and not running:  # none fits before the deadline
            return left + [job.key for job in pending], failed
        time.sleep(POLL_S)
    return left, failed


def _start(job: Job, gpu: str) -> subprocess.Popen:
    os.makedirs(os.path.dirname(job.log), exist_ok=True)
    mode = "a" if job.key[0] == "run" else "w"  # a resumed run keeps its earlier log
    with open(job.log, mode) as log:
        env = os.environ | {"CUDA_VISIBLE_DEVICES": gpu} | job.env
        return subprocess.Popen(job.command, cwd=ROOT, env=env, stdout=log, stderr=log)


def _stop_processes(processes: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM (lambdanet.main saves a checkpoint), then SIGKILL those still alive after
    `grace_s`."""
    for process in processes:
        process.terminate()
    end = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def summarize(records: list[dict], order: Sequence[str] = ()) -> list[dict]:
    """One row per entry (those of `order` first, then the others as they appear): placement,
    seeds, top-1 (%) mean and sample std over seeds (None below 2 seeds), parameters (M) and
    img/s of each throughput mode (None when missing)."""
    names = list(dict.fromkeys([*order, *(r["entry"] for r in records)]))
    rows = []
    for name in names:
        own = [r for r in records if r["entry"] == name]
        runs = [r for r in own if r["kind"] == "run"]
        speed = {r["mode"]: r["img_per_s"] for r in own if r["kind"] == "throughput"}
        top1 = [100.0 * r["top1"] for r in runs]
        rows.append(
            dict(
                entry=name,
                placement=next((r["placement"] for r in own), None),
                n_seeds=len(top1),
                top1_mean=statistics.mean(top1) if top1 else None,
                top1_std=statistics.stdev(top1) if len(top1) > 1 else None,
                params_m=runs[0]["num_params"] / 1e6 if runs else None,
                infer_img_per_s=speed.get("infer"),
                train_img_per_s=speed.get("train"),
            )
        )
    return rows


def significant_pairs(rows: list[dict]) -> list[tuple[str, str, float, float]]:
    """(entry a, entry b, mean a - mean b, standard error of the difference) for each pair of
    rows with 2+ seeds whose top-1 means differ by more than 2 standard errors."""
    pairs = []
    for a, b in itertools.combinations([r for r in rows if r["n_seeds"] > 1], 2):
        difference = a["top1_mean"] - b["top1_mean"]
        se = math.sqrt(a["top1_std"] ** 2 / a["n_seeds"] + b["top1_std"] ** 2 / b["n_seeds"])
        if abs(difference) > 2 * se:
            pairs.append((a["entry"], b["entry"], difference, se))
    return pairs


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(rows: list[dict], note: str = "") -> str:
    """The table (top-1 as mean ± std), `note`, and the pairs that differ by more than 2 SE."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for row in rows:
        top1 = _fmt(row["top1_mean"], ".1f")
        if row["top1_std"] is not None:
            top1 += f" ± {row['top1_std']:.1f}"
        cells = (
            row["entry"],
            _fmt(row["placement"], "").replace(",", " → "),
            str(row["n_seeds"]),
            top1,
            _fmt(row["params_m"], ".2f"),
            _fmt(row["infer_img_per_s"], ".0f"),
            _fmt(row["train_img_per_s"], ".0f"),
        )
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", note] if note else []
    lines += ["", "Top-1 differences larger than 2 standard errors (SE = sqrt(s1²/n1 + s2²/n2)):"]
    pairs = significant_pairs(rows)
    lines += [f"- {a} - {b}: {d:+.2f} points (SE {se:.2f})" for a, b, d, se in pairs]
    return "\n".join(lines + ([] if pairs else ["- none"])) + "\n"


def plot(rows: list[dict], path: str) -> None:
    """Top-1 (error bars: one std) against inference img/s, each point labelled by its entry;
    the all-conv and all-lambda entries are the end points (squares, joined by a dotted line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["top1_mean"] is not None and r["infer_img_per_s"]]
    figure, axes = plt.subplots(figsize=(7, 4.5), dpi=120)
    ends = [r for r in shown if _is_end_point(r["placement"])]
    if len(ends) == 2:
        speeds, top1 = [r["infer_img_per_s"] for r in ends], [r["top1_mean"] for r in ends]
        axes.plot(speeds, top1, ":", color="gray", label="all-conv to all-lambda")
    for row in shown:
        axes.errorbar(
            row["infer_img_per_s"],
            row["top1_mean"],
            yerr=row["top1_std"] or 0.0,
            fmt="s" if row in ends else "o",
            color="C1" if row in ends else "C0",
            capsize=3,
        )
        point = (row["infer_img_per_s"], row["top1_mean"])
        axes.annotate(row["entry"], point, textcoords="offset points", xytext=(5, 4), fontsize=8)
    axes.set(xlabel="inference throughput (images/s)", ylabel="top-1 (%), mean ± std over seeds")
    axes.grid(alpha=0.3)
    if len(ends) == 2:
        axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _is_end_point(placement: str | None) -> bool:
    """Whether the placement holds one kind of layer only (C,C,C,C or L,L,L,L)."""
    letters = set((placement or "").replace(",", ""))
    return letters in ({"C"}, {"L"})


def write_table(rows: list[dict], prefix: str, note: str = "") -> None:
    """PREFIX.csv (full precision), PREFIX.md (rounded, with `note` and the 2-SE pairs) and
    PREFIX.png."""
    os.makedirs(os.path.dirname(prefix) or ".", exist_ok=True)
    with open(f"{prefix}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    Path(f"{prefix}.md").write_text(markdown_table(rows, note))
    plot(rows, f"{prefix}.png")


def finished_runs(entries, labels, seeds: int, workdir: str, records: list[dict]) -> list[dict]:
    """Result lines of the runs in `workdir` that wrote final_metrics.json but are not in
    `records` (wall time and resumption unknown)."""
    known = {result_key(r) for r in records}
    found = []
    for entry, seed in itertools.product(entries, range(seeds)):
        path = run_dir(workdir, entry.name, seed)
        if ("run", entry.name, seed) in known:
            continue
        if os.path.exists(os.path.join(path, FINAL_METRICS_FILE)):
            label = labels[entry.name]
            found.append(run_record(entry, label, seed, path, wall_s=None, resumed=None))
    return found


def table_note(records: list[dict]) -> str:
    """How the table's numbers were obtained (devices and batch of the throughput lines)."""
    speeds = [r for r in records if r["kind"] == "throughput"]
    devices = ", ".join(sorted({str(r.get("device")) for r in speeds})) or "-"
    batches = ", ".join(sorted({str(r.get("batch_size")) for r in speeds})) or "-"
    return (
        "Top-1: final validation top-1 of each seed (config.seed and data_seed), mean ± sample "
        "standard deviation. Parameters: the trained model's. Throughput: scripts/benchmark.py "
        f"(measure_jax_model), each entry alone on one GPU, synthetic inputs, 1,000 classes, "
        f"batch {batches}, on {devices}."
    )


def run_sweep(overrides: list[str]) -> int:
    """The sweep of the flags (see the module docstring); returns the exit status."""
    if not FLAGS.config or not FLAGS.workdir:
        raise ValueError("--config and --workdir are needed (except with --table_only).")
    entries = select_entries(sweep_entries(FLAGS.config), FLAGS.only)
    configs = {entry.name: resolve_config(entry, overrides) for entry in entries}
    labels = {name: placement_label(config) for name, config in configs.items()}
    results = FLAGS.results or [os.path.join(FLAGS.workdir, "results.jsonl")]
    table = FLAGS.table or os.path.join(FLAGS.workdir, "hybrids")
    records, order = read_results(results), [entry.name for entry in entries]

    def on_result(record: dict) -> None:
        records.append(record)
        append_result(results[0], record)
        write_table(summarize(records, order), table, table_note(records))

    for record in finished_runs(entries, labels, FLAGS.seeds, FLAGS.workdir, records):
        on_result(record)
    write_table(summarize(records, order), table, table_note(records))
    done = {result_key(r) for r in records}
    missing = {
        entry.name: [m for m in THROUGHPUT_MODES if ("throughput", entry.name, m) not in done]
        for entry in entries
    }
    measurements = [
        throughput_job(
            entry,
            labels[entry.name],
            configs[entry.name],
            missing[entry.name],
            os.path.join(FLAGS.workdir, entry.name, "throughput.txt"),
            lambda entry=entry: estimate_s(records, "throughput", entry.name, 0.0),
        )
        for entry in entries
        if missing[entry.name]
    ]
    runs = [
        train_job(
            entry,
            labels[entry.name],
            seed,
            FLAGS.workdir,
            overrides,
            FLAGS.parallel,
            lambda entry=entry: estimate_s(records, "run", entry.name, FLAGS.run_estimate_s),
        )
        for seed, entry in itertools.product(range(FLAGS.seeds), entries)
        if ("run", entry.name, seed) not in done
    ]
    stop = Stopper(FLAGS.deadline_s)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop.on_signal)
    left, failed = run_jobs(measurements, FLAGS.gpus, stop, on_result, FLAGS.stop_grace_s)
    slots = [gpu for gpu in FLAGS.gpus for _ in range(FLAGS.parallel)]
    runs_left, runs_failed = run_jobs(runs, slots, stop, on_result, FLAGS.stop_grace_s)
    print(Path(f"{table}.md").read_text())
    for log in failed + runs_failed:
        print(f"Failed: see {log}", file=sys.stderr)
    if left or runs_left:
        print(
            f"{len(left)} measurement(s) and {len(runs_left)} run(s) left "
            f"({'stopped' if stop() else 'not expected to end before the deadline'}): run the "
            "same command again to continue.",
            file=sys.stderr,
        )
    return 1 if failed or runs_failed else EXIT_STOPPED if left or runs_left else 0


def write_table_only(overrides: list[str]) -> None:
    """--table_only: the table and plot from the --results files (and, with --config and
    --workdir, the runs' final_metrics.json)."""
    if overrides:
        raise ValueError(f"--table_only runs nothing: drop {overrides}.")
    if not FLAGS.results:
        raise ValueError("--table_only needs --results=FILE[,FILE...].")
    missing = [path for path in FLAGS.results if not os.path.exists(path)]
    if missing:
        raise ValueError(f"--results: no files {missing}.")
    if not FLAGS.table and not FLAGS.workdir:
        raise ValueError("--table_only needs --table=PREFIX (or --workdir).")
    records, order = read_results(FLAGS.results), []
    if FLAGS.config:
        entries = select_entries(sweep_entries(FLAGS.config), FLAGS.only)
        order = [entry.name for entry in entries]
        if FLAGS.workdir:
            labels = {entry.name: placement_label(resolve_config(entry)) for entry in entries}
            records += finished_runs(entries, labels, FLAGS.seeds, FLAGS.workdir, records)
    table = FLAGS.table or os.path.join(FLAGS.workdir, "hybrids")
    write_table(summarize(records, order), table, table_note(records))
    print(Path(f"{table}.md").read_text())


def main(argv: list[str]) -> None:
    try:
        if FLAGS.table_only:
            write_table_only(argv[1:])
        else:
            sys.exit(run_sweep(argv[1:]))
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"sweep_hybrids: {error}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags)
