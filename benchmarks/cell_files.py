"""Where a benchmark cell's files lie, and reading its per-digit arrays (numpy only: the frontier and the paired
comparisons read cells without TensorFlow).

    <cells_dir>/<label>_seed<seed>/result.json        the finished row, the fingerprint (`cell_store`), the run
                                                      configuration and its identity (cells trained since 0.2)
    <cells_dir>/<label>_seed<seed>/config.json, backup/, checkpoints/, history.csv, logs/   its run directory
                                                      (`tf_rmvae.run.training.fit`; untracked)
    <cells_dir>/<label>_seed<seed>/per_example.npz    per-digit test ELBO and log-likelihood
    <cells_dir>/<label>_seed<seed>/curve/epoch_NNN.*  the same at the run's `eval_epochs` along training
    <cells_dir>/<label>_seed<seed>/final.weights.h5   the trained model's weights, kept by the harness before cells
                                                      stored their run configuration (untracked: .gitignore); since
                                                      then they are the run directory's `backup/latest.weights.h5`
    <cells_dir>/<label>_seed<seed>/scored/<name>.*    the final model scored again (`benchmarks.rescore`, e.g.
                                                      `K5000_N10000`: K = 5000 on all 10000 test digits)
"""

from __future__ import annotations

import json
import os

import numpy as np

RESULT_FILE = "result.json"
PER_EXAMPLE_FILE = "per_example.npz"
CURVE_DIR = "curve"
FINAL_WEIGHTS_FILE = "final.weights.h5"
SCORED_DIR = "scored"


def cell_key(label: str, seed: int | str) -> str:
    """A cell's name within its cells directory (`Cell.key`); `seed=""` gives the prefix of all its seeds."""
    return f"{label}_seed{seed}"


def cell_dir(cells_dir: str, label: str, seed: int) -> str:
    return os.path.join(cells_dir, cell_key(label, seed))


def stored_seeds(cells_dir: str, label: str) -> list[int]:
    """Seeds of `label` with a cell directory under `cells_dir` (finished or not)."""
    prefix = cell_key(label, "")  # "<label>_seed"
    names = os.listdir(cells_dir) if os.path.isdir(cells_dir) else []
    return sorted(int(name[len(prefix):]) for name in names
                  if name.startswith(prefix) and name[len(prefix):].isdigit())


def final_weights_path(directory: str) -> str:
    """The trained model's weights in a cell's `directory`, as the harness kept them before cells stored their run
    configuration (never committed; `benchmarks.rescore.rebuild`)."""
    return os.path.join(directory, FINAL_WEIGHTS_FILE)


def scored_path(directory: str, scoring: str) -> str:
    """`directory/scored/<scoring>` (add `.npz` or `.json`): a cell's final model scored by `benchmarks.rescore`."""
    return os.path.join(directory, SCORED_DIR, scoring)


def curve_path(directory: str, epoch: int) -> str:
    """`directory/curve/epoch_NNN` (add `.npz` or `.json`) of a cell's evaluation after `epoch` (1-based)."""
    return os.path.join(directory, CURVE_DIR, f"epoch_{epoch:03d}")


def curve_epochs(directory: str) -> list[int]:
    """Epochs at which the cell in `directory` stored its per-digit arrays along training (`curve_path`)."""
    curve = os.path.join(directory, CURVE_DIR)
    names = os.listdir(curve) if os.path.isdir(curve) else []
    return sorted(int(name[len("epoch_"):-len(".npz")]) for name in names
                  if name.startswith("epoch_") and name.endswith(".npz"))


def per_example(cells_dir: str, label: str, seed: int, epoch: int | None = None,
                scoring: str | None = None) -> dict[str, np.ndarray] | None:
    """`{"elbo": [N], "log_likelihood": [N]}` (float64) of a cell at the end (`epoch=None`) or after `epoch`, or
    its final model scored again as `scoring` (`scored_path`); None where it was not stored (an unfinished cell,
    an epoch not evaluated, a model not scored so)."""
    directory = cell_dir(cells_dir, label, seed)
    if scoring is not None:
        path = scored_path(directory, scoring) + ".npz"
    else:
        path = os.path.join(directory, PER_EXAMPLE_FILE) if epoch is None else curve_path(directory, epoch) + ".npz"
    if not os.path.exists(path):
        return None
    with np.load(path) as arrays:
        return {k: arrays[k].astype(np.float64) for k in ("elbo", "log_likelihood")}


def final_epoch(cells_dir: str, label: str, seed: int) -> int | None:
    """The epoch count of a finished cell (its stored row's `epochs`); None while it is unfinished."""
    path = os.path.join(cell_dir(cells_dir, label, seed), RESULT_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return int(json.load(f)["row"]["epochs"])


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of the per-digit difference `a - b` and its paired standard error (the same digits in both)."""
    if a.shape != b.shape:
        raise ValueError(f"Paired arrays need the same digits; got shapes {a.shape} and {b.shape}.")
    diff = a - b
    return float(diff.mean()), float(diff.std(ddof=1) / np.sqrt(diff.size))
