"""Quiet TensorFlow for the programs: its C++ logs off by default, `--tf_log_level` brings them back.

TensorFlow's C++ side logs at import and at device setup (CUDA stubs, cuInit, CPU features, tf.data) through absl,
filtered by the environment variable `TF_CPP_MIN_LOG_LEVEL`, which must be set before `tensorflow` is imported; the
messages printed while the shared libraries load (before absl's logging is initialised) ignore it. So a program
imports everything that pulls in TensorFlow inside `quiet_imports(sys.argv)`, which sets the variable from the flag
(read from `argv` directly: absl parses flags only after the imports) and, unless everything was asked for, discards
what the libraries print on the stderr file descriptor while they load (replayed if an import fails):

    import sys
    from trainers import quiet

    with quiet.quiet_imports(sys.argv):
        from tf_rmvae.run.training import train

    def main(argv):
        quiet.quiet_python_logs()     # after flag parsing: TensorFlow's and tfds's INFO logs off (unless level 0)

This module must not import TensorFlow (nor anything that does).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterator, Sequence

from absl import flags

FLAG = "tf_log_level"
ENV = "TF_CPP_MIN_LOG_LEVEL"
DEFAULT_LEVEL = 3

flags.DEFINE_enum(
    FLAG, str(DEFAULT_LEVEL), ["0", "1", "2", "3"],
    "TensorFlow's C++ log level (TF_CPP_MIN_LOG_LEVEL): 3 none (default), 2 errors, 1 warnings and errors, "
    "0 everything, including the INFO logs of TensorFlow's and tfds's Python side. An explicit "
    f"{ENV} in the environment is kept unless this flag is given.",
)


def requested_level(argv: Sequence[str], environ: dict | None = None) -> int:
    """The level `argv` asks for (`--tf_log_level=N` or `--tf_log_level N`, the last one wins), else the
    environment's `TF_CPP_MIN_LOG_LEVEL`, else `DEFAULT_LEVEL`."""
    environ = os.environ if environ is None else environ
    level = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{FLAG}="):
            level = arg.split("=", 1)[1]
        elif arg == f"--{FLAG}" and i + 1 < len(argv):
            level = argv[i + 1]
    if level is None:
        level = environ.get(ENV, DEFAULT_LEVEL)
    try:
        return min(max(int(level), 0), 3)
    except ValueError:
        return DEFAULT_LEVEL  # absl rejects the flag with a clear message once it parses it


@contextlib.contextmanager
def quiet_imports(argv: Sequence[str]) -> Iterator[int]:
    """Sets `TF_CPP_MIN_LOG_LEVEL` for the level `argv` asks for and, for levels above 0, discards what is printed
    on stderr's file descriptor inside the block (the C++ libraries' load-time messages); on an exception the
    discarded output is written back before the exception propagates. Yields the level."""
    level = requested_level(argv)
    os.environ[ENV] = str(level)
    if level == 0:
        yield level
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield level
        except BaseException:
            _restore(saved)
            captured.seek(0)
            os.write(2, captured.read())
            raise
        _restore(saved)


def _restore(saved_fd: int) -> None:
    sys.stderr.flush()
    os.dup2(saved_fd, 2)
    os.close(saved_fd)


def quiet_python_logs(level: int | None = None) -> None:
    """Python side, after flags are parsed: WARNING and above only (absl's `app.run` logs INFO, which TensorFlow,
    Keras export and tfds fill), unless the level (default: the one `quiet_imports` set) is 0 or absl's own
    `--verbosity` was given."""
    level = requested_level([]) if level is None else level
    if level == 0 or flags.FLAGS["verbosity"].present:
        return
    from absl import logging

    logging.set_verbosity(logging.WARNING)
