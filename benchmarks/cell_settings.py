"""The settings a finished benchmark cell was trained with, read from what its `result.json` stores (never from its
label, which only names it), without TensorFlow.

A cell trained since cells were run configurations stores its resolved `RunConfig` (`run_config`) and its identity
(`run_identity`) beside its fingerprint (`cell_store.save_finished`); an older cell stores only the fingerprint, from
which the code that trained it rebuilds its run configuration (`cells.run_config` over the `BenchmarkConfig` and
`Cell` the fingerprint was taken of, `from_fingerprint`).

    run = trained_run_config("benchmarks/results/budget100_cells/iwae_k16_seed0")
    run.method, run.resolved_bound, run.resolved_num_samples  # ('vae', 'iw', 16)
"""

from __future__ import annotations

import json
import os

from benchmarks.cell_files import RESULT_FILE
from benchmarks.cells import BenchmarkConfig, Cell, run_config
from tf_rmvae.config import RunConfig


def stored_result(directory: str) -> dict:
    """The `result.json` of the finished cell in `directory` (`FileNotFoundError` while it is unfinished)."""
    path = os.path.join(directory, RESULT_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: the cell in {directory} is not finished (or not here).")
    with open(path) as f:
        return json.load(f)


def from_fingerprint(fingerprint: dict, **overrides) -> tuple[BenchmarkConfig, Cell]:
    """The benchmark settings and the cell that `fingerprint` (`cell_store.fingerprint`) was taken of, with
    `overrides` of settings a fingerprint leaves out (e.g. `jit_compile`).

    A fingerprint keeps every setting the cell's model depends on; the ones it leaves out are the run's sweeps (the
    cell's own fields record its values) and settings added later whose old value it omits, which the dataclasses'
    defaults restore. SA-VAE's refinement steps are its scalar `savae_steps`.
    """
    values = dict(fingerprint)
    cell = dict(values.pop("cell"))
    if cell["method"] == "savae":
        cell["refine_steps"] = int(values["savae_steps"])
    settings = {k: v for k, v in values.items() if k in BenchmarkConfig.__dataclass_fields__}
    return BenchmarkConfig(**{**settings, **overrides}), Cell(**cell)


def trained_run_config(directory: str, jit_compile: bool | str = False, stored: dict | None = None) -> RunConfig:
    """The resolved run configuration that trained the finished cell in `directory`: the one it stores, or the one
    the benchmark's code gives its fingerprint (`from_fingerprint`; `jit_compile` as `BenchmarkConfig.jit_compile`,
    which a fingerprint does not record; "auto" imports TensorFlow), with `directory` as its run directory.
    `stored`: the cell's `stored_result`, when the caller has read it already."""
    stored = stored_result(directory) if stored is None else stored
    if "run_config" in stored:
        return RunConfig.from_dict(stored["run_config"]).replace(model_dir=directory)
    config, cell = from_fingerprint(stored["fingerprint"], jit_compile=jit_compile)
    return run_config(config, cell, directory).resolved()
