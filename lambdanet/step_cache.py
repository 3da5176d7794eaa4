"""Jitted steps whose traced programs are kept across processes (`jax.export`).

JAX's persistent compilation cache finds a compiled program by its lowered form, so a process
that runs a step again still traces the Python model first; for a deep model that is most of a
cache hit (figures: results/throughput.md, "Compile time and step rate, unrolled vs scanned, and
initialisation"). A `CachedStep` also keeps the traced program, serialized StableHLO, in
`<cache dir>/traced/`, named by a hash of everything the program is a function of:

* the caller's key (the step's name and the whole config),
* the source files of the lambdanet package and of the other imported modules outside the
  installed libraries (`source_files`),
* the versions of the libraries that trace it, and the jax settings that change tracing,
* the arguments' tree paths, shapes, dtypes and shardings, and the devices.

A process that finds the file deserializes it instead of tracing; both run the deserialized
program, so they lower the same module and the compiled program is shared through JAX's cache.
A change to any of the above (an edited source file, another config value) names another file.
Single-process runs only: with several processes the step is traced as usual.
"""

import functools
import hashlib
import importlib.metadata
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
from absl import logging

TRACED_DIR = "traced"
_LIBRARIES = ("jax", "jaxlib", "flax", "optax", "clu", "numpy")
_JAX_SETTINGS = (
    "jax_enable_x64",
    "jax_default_matmul_precision",
    "jax_default_prng_impl",
    "jax_threefry_partitionable",
    "jax_numpy_rank_promotion",
    "jax_numpy_dtype_promotion",
)


class CachedStep:
    """`fn(*args)` for a jitted `fn`, run as its traced program, loaded when an earlier process
    traced it for the same key (module docstring), traced and saved otherwise.

    out_structure(*args) -> a pytree with the structure of fn's output (its leaves unused): a
    loaded program returns flat leaves, and this rebuilds them. donate_argnums: the arguments
    whose buffers the step may reuse, as in `jax.jit`. The cache directory is JAX's
    `jax_compilation_cache_dir` when the step first runs ('' or unset: no cache).
    `how` says, after the first call, whether the program was loaded, traced and saved, or traced.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        out_structure: Callable[..., Any],
        key: dict[str, Any],
        donate_argnums: Sequence[int] = (),
    ):
        self.fn, self.out_structure, self.key = fn, out_structure, key
        self.donate_argnums = tuple(donate_argnums)
        self.how = ""
        self._run: Callable[..., Any] | None = None
        self._flat_run: Callable[..., Any] | None = None  # the loaded program: leaves -> leaves

    def __call__(self, *args):
        if self._run is None:
            self._run = self._build(args)
        return self._run(*args)

    def compile(self, *args) -> Callable[..., Any]:
        """The step for arguments like `args`, compiled now (or loaded from JAX's cache) rather
        than at its first call: a benchmark times tracing or loading and compiling this way."""
        if self._run is None:
            self._run = self._build(args)
        if self._flat_run is None:
            return self.fn.lower(*args).compile()
        compiled = self._flat_run.lower(*jax.tree.leaves(args)).compile()
        out_tree = self._out_tree
        return lambda *a: out_tree.unflatten(compiled(*jax.tree.leaves(a)))

    def _build(self, args: tuple) -> Callable[..., Any]:
        cache_dir = jax.config.jax_compilation_cache_dir
        if not cache_dir or jax.process_count() > 1:
            self.how = "traced (no cache)" if not cache_dir else "traced (several processes)"
            return self.fn
        leaves, in_tree = jax.tree.flatten(args)
        out_tree = jax.tree.structure(self.out_structure(*args))
        path = Path(cache_dir, TRACED_DIR, f"{self.key['step']}-{_fingerprint(self.key, args)}")
        donated = _leaf_positions(args, self.donate_argnums)
        exported = _load(path, len(leaves), out_tree.num_leaves)
        if exported is not None:
            self.how = f"traced program loaded from {path}"
        else:
            exported = self._export(leaves, in_tree, out_tree, donated)
            self.how = f"traced and saved to {path}" if _save(path, exported) else "traced"

        def program(*flat_args):
            return exported.call(*flat_args)

        program.__name__ = f"{self.key['step']}_step"  # JAX's log names it "jit(train_step)"
        run = jax.jit(program, donate_argnums=donated)
        self._flat_run, self._out_tree = run, out_tree
        return lambda *a: out_tree.unflatten(run(*jax.tree.leaves(a)))

    def _export(self, leaves: list, in_tree, out_tree, donated: tuple[int, ...]):
        traced_tree = []

        def flat_fn(*flat_args):
            out = self.fn(*in_tree.unflatten(flat_args))
            traced_tree.append(jax.tree.structure(out))
            return jax.tree.leaves(out)

        specs = [
            jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
            for x in leaves
        ]
        exported = jax.export.export(jax.jit(flat_fn, donate_argnums=donated))(*specs)
        if traced_tree[0] != out_tree:
            raise ValueError(
                f"{self.key['step']} step: out_structure gives {out_tree}, the step returns "
                f"{traced_tree[0]}."
            )
        return exported


def _leaf_positions(args: tuple, argnums: tuple[int, ...]) -> tuple[int, ...]:
    """Positions in the flattened `args` of the leaves of the arguments `argnums`."""
    positions, start = [], 0
    for index, arg in enumerate(args):
        count = len(jax.tree.leaves(arg))
        if index in argnums:
            positions.extend(range(start, start + count))
        start += count
    return tuple(positions)


def _fingerprint(key: dict[str, Any], args: tuple) -> str:
    devices = [(d.platform, d.device_kind, d.id) for d in jax.devices()]
    settings = {name: str(getattr(jax.config, name, None)) for name in _JAX_SETTINGS}
    leaves = [
        (jax.tree_util.keystr(path), tuple(x.shape), str(x.dtype), str(getattr(x, "sharding", "")))
        for path, x in jax.tree_util.tree_flatten_with_path(args)[0]
    ]
    described = dict(
        key=key,
        sources=_sources_digest(),
        versions=_versions(),
        settings=settings,
        devices=devices,
        leaves=leaves,
    )
    text = json.dumps(described, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@functools.cache
def _sources_digest() -> str:
    digest = hashlib.sha256()
    for file in sorted(source_files()):
        digest.update(str(file).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def source_files() -> set[Path]:
    """lambdanet's Python files, and those of every imported module outside the installed
    libraries (a model registered by the user's own code, a script, a config file): an edit to
    any of them keys new programs."""
    files = set(Path(__file__).resolve().parent.rglob("*.py"))
    installed = {os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix)}
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None) or ""
        real = os.path.realpath(file)
        if not file.endswith(".py") or any(real.startswith(root) for root in installed):
            continue
        if "site-packages" not in real and "dist-packages" not in real and os.path.isfile(real):
            files.add(Path(real))
    return files


@functools.cache
def _versions() -> dict[str, str]:
    versions = {}
    for name in _LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = ""
    return versions


def _load(path: Path, num_in: int, num_out: int) -> jax.export.Exported | None:
    """The program saved at `path`, or None when there is none or it does not fit."""
    try:
        exported = jax.export.deserialize(bytearray(path.read_bytes()))
    except FileNotFoundError:
        return None
    except Exception as error:  # a truncated or foreign file: trace again and replace it
        logging.warning("Traced program %s is unreadable (%s); tracing again.", path, error)
        return None
    if len(exported.in_avals) != num_in or len(exported.out_avals) != num_out:
        logging.warning("Traced program %s does not fit the step's arguments; tracing again.", path)
        return None
    return exported


def _save(path: Path, exported: jax.export.Exported) -> bool:
    """Writes the program atomically (a killed write leaves no partial file); False on errors."""
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(exported.serialize())
        os.replace(temporary, path)
        return True
    except OSError as error:  # a full or read-only disk costs the next process a trace only
        logging.warning("Could not save the traced program to %s (%s).", path, error)
        if temporary and os.path.exists(temporary):
            os.remove(temporary)
        return False
