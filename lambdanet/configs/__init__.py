"""Experiment configs, shipped with the package: one `get_config([arg])` file per experiment.

A config is named on the command line by its file name in this folder, or by a path to any
config file; an argument follows ':' (ml_collections' `config_flags` form):

    --config=demo                          # lambdanet/configs/demo.py
    --config=lambda_resnet:depth=152,size=256
    --config=path/to/my_config.py:ARG      # a file of your own (contains '/' or ends in .py)

`load_config` does the same in Python (the tools and the tests use it):

    config = load_config("imagenette:resnet50")  # imagenette.get_config("resnet50")

A config's model is `config.model_name` (a registry name, lambdanet.models.list_models()) and
`config.model = model_config(NAME, **changes)`: every architecture setting of that model, so
that `--config.model.X=V` reaches any of them (`--print_config` lists them) and the trainer builds
`ResNet(**config.model)`.
"""

import dataclasses
import importlib.util
import os
import types
from typing import Any

import ml_collections

from lambdanet.layers.lambda_layer import LambdaLayer
from lambdanet.models import ResNet, model_kwargs

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


def _nullable(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if "None" in str(f.type)}


# Settings whose value may be None (e.g. the lambda layer's global scope, scope_size=None): typed
# `object` in the config, so that the command line parses both --config.model.X=None and =9.
_NULLABLE = {"": _nullable(ResNet), "lambda_layer": _nullable(LambdaLayer)}


def model_config(name: str, **changes: Any) -> ml_collections.ConfigDict:
    """`config.model` for the registered model `name`: `lambdanet.models.model_kwargs(name,
    **changes)` (every architecture setting, plain data) as a ConfigDict."""
    kwargs = model_kwargs(name, **changes)
    for scope, names in _NULLABLE.items():
        settings = kwargs[scope] if scope else kwargs
        for key in names & set(settings):
            settings[key] = ml_collections.FieldReference(settings[key], field_type=object)
    return ml_collections.ConfigDict(kwargs)


def list_configs() -> list[str]:
    """Names of the configs shipped with lambdanet (the files of this folder)."""
    return sorted(
        name[:-3]
        for name in os.listdir(CONFIG_DIR)
        if name.endswith(".py") and not name.startswith("_")
    )


def config_path(name_or_path: str | os.PathLike) -> str:
    """The file of a config `NAME` or `PATH` (the part before any ':ARG'), with ':ARG' kept.

    A value holding a path separator or ending in .py is a path (relative to the working
    directory); anything else names a shipped config. Raises FileNotFoundError naming both
    forms and the shipped configs when neither exists.
    """
    spec = os.fspath(name_or_path)
    name, sep, arg = spec.partition(":")
    if os.sep in name or "/" in name or name.endswith(".py"):
        path = os.path.abspath(name)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"No config file {name} (from the working directory {os.getcwd()}); name a "
                f"shipped config instead ({', '.join(list_configs())}) or a path to a .py file."
            )
    else:
        path = os.path.join(CONFIG_DIR, f"{name}.py")
        if name.startswith("_") or not os.path.isfile(path):
            raise FileNotFoundError(
                f"No config named {name!r}; the configs shipped with lambdanet are "
                f"{', '.join(list_configs())} (or give a path to a .py file)."
            )
    return path + sep + arg


def load_module(path: str | os.PathLike) -> types.ModuleType:
    """The config file at `path` (not a name) as a fresh module, as config_flags loads it."""
    path = os.path.abspath(path)
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(name_or_path: str | os.PathLike) -> ml_collections.ConfigDict:
    """`get_config()` of a config NAME or PATH, or `get_config(ARG)` for NAME:ARG / PATH:ARG."""
    path, sep, arg = config_path(name_or_path).partition(":")
    get_config = load_module(path).get_config
    return get_config(arg) if sep else get_config()
