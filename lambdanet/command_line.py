"""The `--config` flag every lambdanet command shares, and its parsing.

`lambdanet-train`, the benchmark, the sweep and the chaos test take the same `--config=NAME[:ARG]`
or `--config=PATH[:ARG]` (a shipped config or a file, `lambdanet.configs`) and the same
`--config.FIELD=VALUE` overrides (ml_collections' `config_flags`):

    _CONFIG = command_line.define_config_flag()
    ...
    app.run(main, flags_parser=command_line.parse_flags)

A config that does not exist, an override of a field the config lacks and `--config.model_name`
(a label: the model is `config.model`) each end the command with one line naming the fix.

A tool that launches runs (the sweep) passes on `config_name(FLAGS["config"])` and
`config_overrides(sys.argv)`; `parse_config(NAME, OVERRIDES)` gives in Python the config such a
run gets, raising ValueError instead of exiting.
"""

import os
import sys
from collections.abc import Sequence

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from lambdanet import configs


def define_config_flag(name: str = "config", **kwargs) -> flags.FlagHolder:
    """`config_flags.DEFINE_config_file(name)` with a help text listing the shipped configs."""
    shipped = ", ".join(configs.list_configs())
    help_text = f"A shipped config NAME[:ARG] (one of {shipped}) or a config file's PATH[:ARG]."
    return config_flags.DEFINE_config_file(name, None, help_text, **kwargs)


def _fail(message: str) -> None:
    sys.exit(f"FATAL Flags parsing error: {message}")


def _resolved(argv: list[str]) -> list[str]:
    """`resolve_config_flag`'s work; raises ValueError where it exits."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg.startswith("--config.model_name"):
            raise ValueError(
                "--config.model_name labels the run, the model is config.model: pick another "
                "model with the config's argument (e.g. --config=default:lambda_resnet50_u4 or "
                "--config=imagenette:all_lambda) or change its settings with "
                "--config.model.FIELD=VALUE."
            )
        if arg == "--config" and i + 1 < len(argv):
            position, value = i + 1, argv[i + 1]
        elif arg.startswith("--config="):
            position, value = i, arg.removeprefix("--config=")
        else:
            continue
        try:
            path = configs.config_path(value)
        except FileNotFoundError as error:
            raise ValueError(f"--config={value}: {error}") from error
        argv[position] = path if position != i else f"--config={path}"
    return argv


def resolve_config_flag(argv: list[str]) -> list[str]:
    """`argv` with the --config value (a shipped config's name or a path) made a file path;
    exits with one line naming the shipped configs when there is no such config, and refuses
    `--config.model_name` (see the module docstring)."""
    try:
        return _resolved(argv)
    except ValueError as error:
        _fail(str(error))


def _unknown_field(field: str, argv: list[str]) -> str:
    """The message for ml_collections' error on an override of a field the config lacks
    (`field`, its name or the error's text): the overrides in `argv` that name it, and the fix
    (or, for a config file without `get_config`, the error as it is)."""
    field = field.strip("\"'")
    if not field.isidentifier():
        return f"--config: {field} (a config file defines get_config())."
    given = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    named = [a for a in given if field in a.split(".")[1:]] or given
    return (
        f"{', '.join(named)}: the config has no field {field!r}, and --config.FIELD "
        "overrides only fields it defines: check the spelling (--print_config lists every "
        "field, the model's settings under model:) or set a new field in a config file of "
        f"your own (`{named[0].lstrip('-')} = VALUE` in a copy of the config)."
    )


def _unknown_top_level_field(error: KeyError, argv: list[str]) -> str:
    """`_unknown_field`'s message for ml_collections' KeyError on an override of a top-level
    field the config lacks ("'modle'" and its "Did you mean" line)."""
    field, *hint = str(error.args[0]).splitlines()
    return " ".join([_unknown_field(field, argv), *hint])


# absl's help flags: each prints the usage and exits with status 1.
_HELP_FLAGS = {"-?", "-h", "-help", "--help", "--helpshort", "--helpfull", "--helpxml"}


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing after `resolve_config_flag`; an override of a field the config lacks
    names it and the fix; --help exits 0."""
    argv = resolve_config_flag(argv)
    try:
        return app.parse_flags_with_usage(argv)
    except AttributeError as error:  # raised by ml_collections while it parses the overrides
        _fail(_unknown_field(str(error), argv))
    except KeyError as error:  # the same, for a top-level field
        _fail(_unknown_top_level_field(error, argv))
    except SystemExit as exit_:
        if exit_.code == 1 and _HELP_FLAGS & set(argv[1:]):
            sys.exit(0)
        raise


def config_overrides(argv: Sequence[str]) -> list[str]:
    """The `--config.FIELD=VALUE` arguments of a command line `argv`, in order: what a tool
    passes on to the runs it launches."""
    return [arg for arg in argv if arg.startswith("--config.")]


def parse_config(config: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config `lambdanet-train --config=CONFIG OVERRIDES...` runs: `config` a NAME[:ARG] or
    PATH[:ARG], `overrides` `--config.FIELD=VALUE` strings, parsed as `parse_flags` parses them
    (on flags of their own, not absl's global ones). Raises ValueError saying what does not
    apply (no such config, a field the config lacks, a value of the wrong type)."""
    argv = _resolved(["", f"--config={config}", *overrides])
    values = flags.FlagValues()
    define_config_flag(flag_values=values, sys_argv=argv)
    try:
        values(argv)
    except AttributeError as error:  # raised by ml_collections while it parses the overrides
        raise ValueError(_unknown_field(str(error), argv)) from error
    except flags.Error as error:
        raise ValueError(str(error)) from error
    return values.config


def config_name(config_flag: flags.Flag) -> str:
    """The config of a parsed `define_config_flag` flag (`FLAGS["config"]`) as `--config` takes
    it: NAME[:ARG] for a shipped config, else its file's absolute PATH[:ARG]."""
    path, sep, arg = config_flag.config_filename.partition(":")
    folder, file = os.path.split(path)
    if folder == configs.CONFIG_DIR:
        return file.removesuffix(".py") + sep + arg
    return path + sep + arg
