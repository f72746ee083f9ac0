"""Writes docs/flags.md, the table of `trainers/train.py`'s flags, from `tf_rmvae.config.RunConfig`, and the
benchmark's defaults of the same flags (`benchmarks.cells.BASE_SETTINGS`).

    python -m trainers.flags_doc              # rewrites docs/flags.md
    python -m trainers.flags_doc OTHER.md     # writes elsewhere

Each `RunConfig` field is one flag (`trainers.config_flags.define_flags`): its name, default, choices and help come
from the field's `setting`, and `config.METHOD_DEFAULTS` adds the defaults that depend on `--method`. Rerun after
changing a setting; `tests/test_flags_doc.py` fails while docs/flags.md differs from what this writes.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from benchmarks import cells
from tf_rmvae.config import METHOD_DEFAULTS, RunConfig

COMMAND = "python -m trainers.flags_doc"
DOC_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "flags.md")


def _value(value) -> str:
    """A value as it is written on the command line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if value == "":
        return '""'
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _default(field: dataclasses.Field) -> str:
    if field.metadata["required"]:
        return "(required)"
    text = f"`{_value(field.default)}`"
    by_method = [f"`--method={method}`: `{_value(defaults[field.name])}`"
                 for method, defaults in METHOD_DEFAULTS.items() if field.name in defaults]
    return f"{text} ({'; '.join(by_method)})" if by_method else text


def render() -> str:
    """The whole of docs/flags.md."""
    lines = [
        "# Flags of `python -m trainers.train`",
        "",
        f"Generated from `tf_rmvae.config.RunConfig` by `{COMMAND}`; do not edit by hand. Boolean flags also take",
        "the `--no<flag>` form; `--helpfull` lists these with absl's own flags.",
        "",
        "| flag | default | choices | help |",
        "|---|---|---|---|",
    ]
    for field in dataclasses.fields(RunConfig):
        choices = ", ".join(f"`{c}`" for c in field.metadata["choices"])
        lines.append(f"| `--{field.name}` | {_cell(_default(field))} | {choices} | {_cell(field.metadata['help'])} |")
    return "\n".join(lines + _benchmark_lines()) + "\n"


def _benchmark_lines() -> list[str]:
    """The section on `python -m trainers.benchmark`: which of these flags it has, with which defaults."""
    fields = [f.name for f in dataclasses.fields(RunConfig)]
    per_cell = ", ".join(f"`--{name}`" for name in fields if name in cells.CELL_SETTINGS and name != "jit_compile")
    aliases = ", ".join(f"`--{old}` (`--{new}`)" for new, old in cells.BENCHMARK_NAMES.items())
    defaults = [f"- `--{name}`: `{_value(value)}`" for name, value in cells.BASE_SETTINGS.items()
                if name in cells.FLAG_SETTINGS]
    return [
        "",
        "## The same flags in `python -m trainers.benchmark`",
        "",
        "The benchmark has each of these flags that no cell sets itself, with the same name, type and help",
        "(`trainers.config_flags`). Its defaults differ from the trainer's only here",
        "(`benchmarks.cells.BASE_SETTINGS`):",
        "",
        *defaults,
        "",
        "Each cell sets these itself (the sweep, the method, the cell's directory; the benchmark exports nothing and",
        "trains every cell's decoder: only `benchmarks.amortization` freezes one; a cell's model is its last epoch's:",
        "no validation hold-out, no early stopping), so the benchmark has no such flag:",
        f"{per_cell}. `--jit_compile` is the benchmark's own (`auto`: XLA where a GPU is visible).",
        "",
        f"Earlier names that still work (aliases): {aliases}.",
        "",
        "The sweep and the benchmark's other flags: `python -m trainers.benchmark --help` and",
        "[benchmarks/README.md](../benchmarks/README.md).",
    ]


def main(argv: list[str]) -> int:
    path = argv[1] if len(argv) > 1 else DOC_PATH
    with open(path, "w", encoding="utf-8") as f:
        f.write(render())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
