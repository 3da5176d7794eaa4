"""Sweep conv/lambda placements with seeds: runs packed onto GPUs, throughput, resumable results.

A sweep is a list of entries (name, config, overrides), each trained once per seed. Its config
(`sweep_entries`, a NAME[:ARG] or PATH[:ARG] as `--config` takes it) is read in one of two forms:
  * its file also defines `get_sweep()`, the entries as data: (name, config NAME[:ARG],
    {FIELD: VALUE} overrides). `imagenette`'s is the hybrid table on Imagenette: ResNet-50, the
    paper's seven hybrid placements, LambdaResNet-26t;
  * otherwise the config has `hybrid_placements`, one entry per placement, named by its letters
    (C,C,L,L: CCLL), that config with `model.placement` set (`hybrid_resnet50`: the paper's
    table on ImageNet).
The `--config.FIELD=VALUE` overrides given to the sweep go to every run, after the entry's own;
an entry's config is resolved as lambdanet-train resolves it (`command_line.parse_config`).

Run (entry, seed k): `python -m lambdanet.main --config=CONFIG --workdir=WORKDIR/<entry>/seed<k>
--config.seed=k --config.data_seed=k --config.FIELD=VALUE...`, in the sweep's working
directory, its console log appended to WORKDIR/<entry>/seed<k>/log.txt; `parallel` P runs per
GPU of `gpus` (CUDA_VISIBLE_DEVICES; XLA_PYTHON_CLIENT_MEM_FRACTION 0.9/P when P > 1), seed by
seed (every entry's seed 0 first: the table fills in early, and later seeds load their programs
from JAX's compilation cache, which concurrent runs of one entry would each compile). Before the
runs, while no run holds a GPU, each entry's inference and training throughput is measured once,
alone on one GPU, both in one process (`throughput_command`: scripts/benchmark.py on the entry's
config, synthetic inputs, batch `throughput_batch_size`), its output in
WORKDIR/<entry>/throughput.txt.

Every finished run (entry, config, overrides, placement, seed, top-1, parameters, train and wall
time, workdir) and every measurement is one JSON line appended to the first `results` file
(default WORKDIR/results.jsonl). All the files given are read at the start and what they hold is
not run again, nor is a run whose workdir holds final_metrics.json (its line is added): a killed
sweep continues where it stopped, an interrupted run resuming from its workdir's checkpoint.
Entries are identified by name. `deadline_s` starts no run or measurement expected to end after
it (the median wall time of the entry's finished runs that did not resume, else of all
entries', else `run_estimate_s`; measurements: the median of earlier ones) and, when it passes,
stops those in flight (SIGTERM, which saves a checkpoint; SIGKILL after `stop_grace_s`); so does
a SIGTERM or SIGINT to the sweep. `run_sweep` returns 0 when nothing is left, 75 when some work
is left (run the same command again), 1 when a run or a measurement failed (its log is named).
After each result, and with `write_table_only` from the results files alone, it writes the
table and plot (`lambdanet.tools.sweep_table`). The command line is scripts/sweep_hybrids.py.
"""

import dataclasses
import itertools
import json
import os
import re
import signal
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import ml_collections

import lambdanet
from lambdanet import command_line, configs
from lambdanet.checkpoint import CHECKPOINT_DIR
from lambdanet.tools import sweep_table
from lambdanet.tools.sweep_jobs import Job, Stopper, run_jobs
from lambdanet.train_loop import EXIT_STOPPED, FINAL_METRICS_FILE

BENCHMARK_SCRIPT = Path(lambdanet.__file__).resolve().parents[1] / "scripts" / "benchmark.py"
RUN_LOG = "log.txt"
THROUGHPUT_MODES = ("infer", "train")
THROUGHPUT_FIELDS = ("img_per_s", "window_img_per_s", "batch_size", "image_size", "dtype")
THROUGHPUT_FIELDS += ("num_params", "device", "jax", "compile_s", "peak_gib")
MEMORY_SHARED = 0.9  # of a GPU's memory, split between the runs packed onto it


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of a sweep: `python -m lambdanet.main --config=CONFIG` with `overrides`."""

    name: str
    config: str  # NAME[:ARG] (a shipped config) or PATH[:ARG], as --config takes it
    overrides: dict


@dataclasses.dataclass(frozen=True)
class SweepOptions:
    """How a sweep runs (scripts/sweep_hybrids.py's flags; the module docstring says what each
    does). `results` and `table` default to WORKDIR/results.jsonl and WORKDIR/hybrids."""

    workdir: str | None
    results: Sequence[str]
    table: str | None
    seeds: int
    parallel: int
    gpus: Sequence[str]
    only: Sequence[str] | None
    deadline_s: float
    run_estimate_s: float
    stop_grace_s: float
    throughput_batch_size: int
    throughput_steps: int

    def results_files(self) -> list[str]:
        return list(self.results) or [os.path.join(self.workdir, "results.jsonl")]

    def table_prefix(self) -> str:
        return self.table or os.path.join(self.workdir, "hybrids")


def sweep_entries(config: str) -> list[Entry]:
    """The entries of `config` (NAME[:ARG] or PATH[:ARG]): its file's `get_sweep()`, else one
    per placement of the config's `hybrid_placements`."""
    path = configs.config_path(config).partition(":")[0]
    module = configs.load_module(path)
    if hasattr(module, "get_sweep"):
        entries = [Entry(*entry) for entry in module.get_sweep()]
    else:
        placements = configs.load_config(config).get("hybrid_placements")
        if not placements:
            raise ValueError(
                f"--config={config} defines neither get_sweep() nor hybrid_placements: give a "
                "sweep config (e.g. imagenette) or a config with hybrid_placements "
                "(hybrid_resnet50)."
            )
        entries = [Entry(p.replace(",", ""), config, {"model.placement": p}) for p in placements]
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


def resolve_config(entry: Entry, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The entry's config after its and `overrides`' --config.FIELD=VALUE, as lambdanet-train
    resolves it; a ValueError names the entry and what does not apply."""
    try:
        return command_line.parse_config(
            entry.config, [*override_args(entry.overrides), *overrides]
        )
    except ValueError as error:
        raise ValueError(f"entry {entry.name} ({entry.config}): {error}") from error


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


def throughput_command(
    entry: Entry, modes: Sequence[str], overrides: Sequence[str], options: SweepOptions
) -> list[str]:
    """scripts/benchmark.py measuring `modes` of the entry's model in one process: its config
    with its and `overrides`' --config.FIELD=VALUE (image size, precision and classes the
    config's), batch `options.throughput_batch_size`, `options.throughput_steps` warm-up steps
    then the median of 3 windows of as many steps."""
    steps = options.throughput_steps
    return [
        sys.executable,
        str(BENCHMARK_SCRIPT),
        "--no-isolate",
        f"--config={entry.config}",
        *override_args(entry.overrides),
        *overrides,
        f"--modes={','.join(modes)}",
        f"--batch-size={options.throughput_batch_size}",
        f"--warmup={steps}",
        "--windows=3",
        f"--steps={steps}",
    ]


def throughput_job(entry: Entry, placement: str, command: list[str], modes, log, estimate) -> Job:
    """The process of `command` (`throughput_command`), its output in `log`; its result lines:
    one per mode of `modes`, from the JSON lines it prints."""

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


def placement_label(config: ml_collections.ConfigDict) -> str:
    """The placement of the config's model (its `model.placement`, e.g. C,C,L,L)."""
    return str(config.model.placement)


def run_sweep(config: str, overrides: Sequence[str], options: SweepOptions) -> int:
    """The sweep of `config` (see the module docstring), `overrides` going to every run; returns
    the exit status."""
    if not options.workdir:
        raise ValueError("--config and --workdir are needed (except with --table_only).")
    entries = select_entries(sweep_entries(config), options.only)
    resolved = {entry.name: resolve_config(entry, overrides) for entry in entries}
    labels = {name: placement_label(config) for name, config in resolved.items()}
    results, table = options.results_files(), options.table_prefix()
    records, order = read_results(results), [entry.name for entry in entries]

    def on_result(record: dict) -> None:
        records.append(record)
        append_result(results[0], record)
        write_table(records, order, table)

    for record in finished_runs(entries, labels, options.seeds, options.workdir, records):
        on_result(record)
    write_table(records, order, table)
    done = {result_key(r) for r in records}
    measurements = []
    for entry in entries:
        modes = [m for m in THROUGHPUT_MODES if ("throughput", entry.name, m) not in done]
        if modes:
            command = throughput_command(entry, modes, overrides, options)
            log = os.path.join(options.workdir, entry.name, "throughput.txt")
            estimate = lambda entry=entry: estimate_s(records, "throughput", entry.name, 0.0)
            measurements.append(
                throughput_job(entry, labels[entry.name], command, modes, log, estimate)
            )
    runs = [
        train_job(
            entry,
            labels[entry.name],
            seed,
            options.workdir,
            overrides,
            options.parallel,
            lambda entry=entry: estimate_s(records, "run", entry.name, options.run_estimate_s),
        )
        for seed, entry in itertools.product(range(options.seeds), entries)
        if ("run", entry.name, seed) not in done
    ]
    stop = Stopper(options.deadline_s)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop.on_signal)
    left, failed = run_jobs(measurements, options.gpus, stop, on_result, options.stop_grace_s)
    slots = [gpu for gpu in options.gpus for _ in range(options.parallel)]
    runs_left, runs_failed = run_jobs(runs, slots, stop, on_result, options.stop_grace_s)
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


def write_table(records: list[dict], order: Sequence[str], prefix: str) -> None:
    """The table and plot of `records` at PREFIX.csv/.md/.png: the entries of `order` in that
    order, or every entry when `order` is empty (a results file may hold another sweep's
    entries, e.g. the hybrid table's runs that the Table 3 sweep reuses)."""
    if order:
        records = [r for r in records if r["entry"] in order]
    rows = sweep_table.summarize(records, order)
    sweep_table.write_table(rows, prefix, sweep_table.table_note(records))


def write_table_only(config: str | None, overrides: Sequence[str], options: SweepOptions) -> None:
    """The table and plot from the `options.results` files (and, with `config` and a workdir,
    the runs' final_metrics.json), its entries in the sweep's order when `config` is given."""
    if overrides:
        raise ValueError(f"--table_only runs nothing: drop {list(overrides)}.")
    if not options.results:
        raise ValueError("--table_only needs --results=FILE[,FILE...].")
    missing = [path for path in options.results if not os.path.exists(path)]
    if missing:
        raise ValueError(f"--results: no files {missing}.")
    if not options.table and not options.workdir:
        raise ValueError("--table_only needs --table=PREFIX (or --workdir).")
    records, order = read_results(options.results), []
    if config:
        entries = select_entries(sweep_entries(config), options.only)
        order = [entry.name for entry in entries]
        if options.workdir:
            labels = {entry.name: placement_label(resolve_config(entry)) for entry in entries}
            records += finished_runs(entries, labels, options.seeds, options.workdir, records)
    write_table(records, order, options.table_prefix())
    print(Path(f"{options.table_prefix()}.md").read_text())
