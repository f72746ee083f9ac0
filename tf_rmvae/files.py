"""Small files of a run written whole or not at all, and values made JSON-ready with one NaN policy.

    write_json_atomic("runs/quick/metrics.json", metrics)     # config.json, metrics.json, best.json
    write_text_atomic("runs/quick/history.csv", text)          # a rewritten history
    json_ready({"elbo": np.float32(-98.1), "se": float("nan")})  # {"elbo": -98.1..., "se": None}

NaN policy: a non-finite float (NaN, +-Infinity, also inside NumPy arrays and scalars) becomes JSON `null`.
Strict JSON has no NaN or Infinity, and `null` reads back as "no value" in every JSON reader, so every file
stays valid JSON; finite values are written unchanged. NumPy scalars and arrays become Python numbers and
lists, tuples become lists, dict keys become strings, and any other object its `str`.

Atomic: the text goes to `<path>.tmp`, which is then renamed over `path` (`os.replace`), so a reader (or a
rerun after a kill) sees the old file or the new one, never half of one. This module imports no TensorFlow.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np


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


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes `text` to `path` (UTF-8, newlines as given) through `<path>.tmp` renamed into place."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def json_text(value: Any, *, sort_keys: bool = False) -> str:
    """`json_ready(value)` as JSON indented by 2 (no trailing newline)."""
    return json.dumps(json_ready(value), indent=2, sort_keys=sort_keys, allow_nan=False)


def write_json_atomic(path: str | os.PathLike, value: Any, *, sort_keys: bool = False) -> None:
    """Writes `json_text(value)` and a newline to `path` atomically."""
    write_text_atomic(path, json_text(value, sort_keys=sort_keys) + "\n")
