"""Config files by path, as `python -m lambdanet.main --config=FILE[:ARG]` reads them.

A config file is plain Python with a `get_config()` (or `get_config(arg)`); ml_collections'
config_flags loads it from its path, not as a module of an importable package, and so do the
scripts and the config files themselves through `load_config`:

    config = load_config("configs/imagenette.py:resnet50")  # get_config("resnet50")
"""

import importlib.util
import os
import types

import ml_collections


def load_module(path: str | os.PathLike) -> types.ModuleType:
    """The Python file at `path` (relative to the working directory) as a fresh module."""
    path = os.path.abspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No config file {path} (from the working directory {os.getcwd()})")
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(path_and_arg: str | os.PathLike) -> ml_collections.ConfigDict:
    """`get_config()` of the file PATH, or `get_config(ARG)` for PATH:ARG (config_flags' form)."""
    path, sep, arg = os.fspath(path_and_arg).partition(":")
    get_config = load_module(path).get_config
    return get_config(arg) if sep else get_config()
