"""The programs' flags of `tf_rmvae.config.RunConfig`'s settings: one flag per field, generated from the field's
`setting` (name, default, help, choices), and the settings the flags give.

    from trainers import config_flags

    config_flags.define_flags()                          # trainers.train: every field, RunConfig's defaults
    config_flags.define_flags(names, base=BASE)          # trainers.benchmark: its fields, its base's defaults
    flags.adopt_module_key_flags(config_flags)           # --help lists them under the program
    settings = config_flags.settings_from_flags(names)   # {name: value} of the flags given, as the field's type

This module must not import TensorFlow (nor anything that does).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Iterable

from absl import flags

from tf_rmvae.config import ConfigError, RunConfig

FIELD_TYPES = typing.get_type_hints(RunConfig)
INT_LIST = tuple[int, ...]
FIELDS = {field.name: field for field in dataclasses.fields(RunConfig)}


def define_flags(names: Iterable[str] | None = None, base: RunConfig | None = None) -> tuple[str, ...]:
    """Defines one flag per `RunConfig` field in `names` (default: every field, in the class's order), with the
    field's name and help; returns the names.

    The default is the field's, or `base`'s value where a program starts from another configuration (the
    benchmark's cells, `benchmarks.cells.BASE`). A field with choices is an enum flag, a tuple of ints a comma list
    (`DEFINE_list`), a required field's flag has no default (`RunConfig.validate` refuses a run without it); bool,
    int, float and str fields get flags of their type.
    """
    define = {bool: flags.DEFINE_boolean, int: flags.DEFINE_integer, float: flags.DEFINE_float,
              str: flags.DEFINE_string}
    names = tuple(FIELDS) if names is None else tuple(names)
    for name in names:
        field = FIELDS[name]
        help_text, choices = field.metadata["help"], field.metadata["choices"]
        default = None if field.metadata["required"] else getattr(base, name, field.default)
        kind = FIELD_TYPES[name]
        if choices:
            flags.DEFINE_enum(name, default, list(choices), help_text)
        elif kind == INT_LIST:
            flags.DEFINE_list(name, None if default is None else [str(v) for v in default], help_text)
        else:
            define[kind](name, default, help_text)
    return names


def flag_value(name: str) -> Any:
    """The value of the flag of field `name` as the field's type (a comma list of ints as a tuple); `ConfigError`
    where a list holds something else."""
    value = flags.FLAGS[name].value
    if FIELD_TYPES[name] != INT_LIST or value is None:
        return value
    try:
        return tuple(int(v) for v in value)
    except ValueError:
        raise ConfigError(f"--{name} must be a comma-separated list of integers; got {','.join(value)!r}.") from None


def settings_from_flags(names: Iterable[str]) -> dict[str, Any]:
    """`{name: value}` of the flags among `names` given on the command line (`flag_value`)."""
    return {name: flag_value(name) for name in names if flags.FLAGS[name].present}
