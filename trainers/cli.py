"""What the programs share on the command line: flag errors as one `error:` line with exit status 2, `--help`
listing the program's flags however it was started, and user errors reported the same way.

    from trainers import cli

    def run():
        cli.run(main, program_module)     # app.run with cli.parse_flags; --help lists program_module's flags

This module must not import TensorFlow (nor anything that does).
"""

from __future__ import annotations

import sys
import types
from typing import Callable, NoReturn, Sequence

from absl import app, flags

USAGE_ERROR = 2
HELP_ARGUMENTS = ("--help", "-h", "-?", "--helpshort", "--helpfull")


def fail(message: str, status: int = USAGE_ERROR) -> NoReturn:
    """Prints `error: <message>` on stderr and exits with `status`."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing, with a parsing error (unknown flag, bad value) reported as one `error:` line and exit
    status 2 (absl's own parser exits 1 after several lines), and help (`--help`, `--helpfull`) printed on stdout
    with exit status 0 (absl's exits 1)."""
    arguments = list(argv[1:]) if "--" not in argv else list(argv[1:list(argv).index("--")])
    if any(arg in HELP_ARGUMENTS for arg in arguments):
        app.usage(shorthelp="--helpfull" not in arguments, writeto_stdout=True)
        sys.exit(0)
    try:
        return flags.FLAGS(list(argv))
    except flags.Error as error:
        fail(f"{' '.join(str(error).split())} (--help lists the flags).")


def show_in_help(module: types.ModuleType) -> None:
    """Makes `--help` list `module`'s flags (and the flags it adopted) and print its docstring when the program
    was started as a console script, whose main module defines no flag and has no docstring."""
    main = sys.modules["__main__"]
    if main is module:
        return
    for flag in flags.FLAGS.get_key_flags_for_module(module.__name__):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    if not main.__doc__:
        main.__doc__ = module.__doc__


def run(main: Callable[[list[str]], None], module: types.ModuleType) -> None:
    """`app.run(main)` with `parse_flags` and `show_in_help(module)`."""
    show_in_help(module)
    app.run(main, flags_parser=parse_flags)
