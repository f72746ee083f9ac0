"""Small files of a run written whole or not at all, and values made JSON-ready with one NaN policy.

    write_json_atomic("runs/quick/metrics.json", metrics)     # config.json, metrics.json, best.json
    write_text_atomic("runs/quick/history.csv", text)          # a rewritten history
    json_ready({"elbo": np.float32(-98.1), "se": float("nan")})  # {"elbo": -98.1..., "se": None}

NaN policy: a non-finite float (NaN, +-Infinity, also inside NumPy arrays and scalars) becomes JSON `null`.
Strict JSON has no NaN or Infinity, and `null` reads back as "no value" in every JSON reader, so every file
stays valid JSON; finite values are written unchanged. NumPy scalars and arrays become Python numbers and
lists, tuples become lists, dict keys become strings, and any other object its `str`.

Atomic: the text goes to `<path>.tmp`, flushed to disk (`fsync`), which is then renamed over `path` (`os.replace`)
and the rename itself flushed, so a reader (or a rerun after a kill or a power cut) sees the old file or the new one,
never half of one. `read_json_object` reads such a file back and says what is wrong with a damaged one. This module
imports no TensorFlow.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np


class RunError(RuntimeError):
    """A run cannot go on (diverged, disk full, no intact state...); the message says what is intact and what to do."""


class DamagedFileError(RunError):
    """A file a run wrote cannot be read back; the message names it, what is intact and what to do."""


def json_ready(value: Any) -> Any:
    """`value` as plain JSON types, every non-finite float as None (see the module docstring)."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (np.generic, np.ndarray)):
        return json_ready(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def fsync(path: str | os.PathLike) -> None:
    """Flushes the file or directory `path` to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` (UTF-8, newlines as given) through `<path>.tmp`, flushed to disk and renamed into
    place."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(os.path.dirname(path) or ".")


def read_json_object(path: str | os.PathLike) -> dict:
    """The JSON object in `path`; `ValueError` saying what is wrong if the file holds none (empty, truncated, not
    UTF-8, another JSON value)."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except UnicodeDecodeError as error:
        raise ValueError(f"not UTF-8 text ({error.reason})") from None
    except json.JSONDecodeError as error:
        raise ValueError("empty" if not error.doc.strip() else f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"a JSON {type(value).__name__}, not an object")
    return value


def json_text(value: Any, *, sort_keys: bool = False) -> str:
    """`json_ready(value)` as JSON indented by 2 (no trailing newline)."""
    return json.dumps(json_ready(value), indent=2, sort_keys=sort_keys, allow_nan=False)


def write_json_atomic(path: str | os.PathLike, value: Any, *, sort_keys: bool = False) -> None:
    """Writes `json_text(value)` and a newline to `path` atomically."""
    write_text_atomic(path, json_text(value, sort_keys=sort_keys) + "\n")
