"""What a benchmark cell leaves on disk (the layout: `benchmarks.cell_files`), and when a stored cell still counts
as finished.

A stored cell is reused only while its fingerprint equals the one the current settings give (`load_finished`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Sequence

import keras
import numpy as np

from benchmarks.cell_files import CURVE_DIR, PER_EXAMPLE_FILE, RESULT_FILE, curve_path
from benchmarks.cells import BenchmarkConfig, Cell, adds_components, stage_epochs
from tf_rmvae.choices import RECURSIVE_METHODS
from tf_rmvae.config import RunConfig


def curve_point(epoch: int, test: dict) -> dict:
    """The summary of one evaluation (`evaluation.evaluate`'s dict) stored as a point of a cell's curve."""
    return dict(
        epoch=epoch, test_elbo=test["elbo_mean"], test_elbo_se=test["elbo_se"],
        test_log_likelihood=test["log_likelihood_mean"], test_log_likelihood_se=test["log_likelihood_se"],
        test_inference_gap=test["log_likelihood_mean"] - test["elbo_mean"],
    )


class CurveEvaluation(keras.callbacks.Callback):
    """Evaluates the model on the test digits after each epoch in `epochs` (1-based) and stores the per-example
    arrays and a summary in `<cell_dir>/curve/epoch_NNN.{npz,json}`; epochs stored by an interrupted run are not
    redone."""

    def __init__(self, epochs: Sequence[int], evaluate: Callable[[keras.Model], dict], cell_dir: str):
        super().__init__()
        self.epochs, self.evaluate, self.cell_dir = set(epochs), evaluate, cell_dir

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        path = curve_path(self.cell_dir, done)
        if done not in self.epochs or os.path.exists(path + ".json"):
            return
        test = self.evaluate(self.model)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(path + ".npz", elbo=test["elbo"], log_likelihood=test["log_likelihood"])
        with open(path + ".json.tmp", "w") as f:  # renamed into place: a kill never leaves half a point
            json.dump(curve_point(done, test), f, indent=1)
        os.replace(path + ".json.tmp", path + ".json")


def load_curve(cell_dir: str) -> list[dict]:
    """The stored `CurveEvaluation` summaries of a cell, by epoch."""
    curve_dir = os.path.join(cell_dir, CURVE_DIR)
    names = sorted(n for n in os.listdir(curve_dir) if n.endswith(".json")) if os.path.isdir(curve_dir) else []
    points = []
    for name in names:
        with open(os.path.join(curve_dir, name)) as f:
            points.append(json.load(f))
    return points


def fingerprint(config: BenchmarkConfig, cell: Cell) -> dict:
    """What a finished cell's result depends on (a changed config retrains the cell on resume).

    Settings added after results were committed enter only when they differ from the old behaviour, so the
    committed cells still match: `eval_epochs` when non-empty, the cell's bound when not "elbo"; SA-VAE's steps
    as the old scalar `savae_steps`.
    """
    skip = {"methods", "lambdas", "num_components", "schedules", "seeds", "output_dir", "run_name", "table_name",
            "resume", "verbose", "eval_batch_size", "jit_compile", "bounds", "savae_steps", "schedule_in_label",
            "encoder_gradients"}
    values = {k: v for k, v in config.to_json().items() if k not in skip}
    if not config.eval_epochs:
        del values["eval_epochs"]
    for option in ("shared_trunk", "per_example_proportions"):
        if not values[option]:
            del values[option]
    # A cell's own fields record these (component_bound: rme's; num_samples: the mixture methods'); the other
    # methods do not depend on them.
    del values["component_bounds"], values["num_samples"]
    # Added after results were committed, and their old behaviour:
    new_fields = {"bound": "elbo", "refine_steps": None, "shared_trunk": False, "per_example_proportions": False,
                  "component_bound": "elbo", "num_samples": 1, "encoder_gradient": "reparam", "joins": True}
    # The cell's epochs_per_component only names it (the run's value above is what trained it).
    values["cell"] = {k: v for k, v in dataclasses.asdict(cell).items()
                      if k not in new_fields and k != "epochs_per_component"}
    values["cell"].update({k: getattr(cell, k) for k, old in new_fields.items()
                           if k != "refine_steps" and getattr(cell, k) != old})
    if cell.method == "savae":
        values["savae_steps"] = cell.refine_steps
    else:
        values = {k: v for k, v in values.items() if not k.startswith("savae")}
    if cell.method not in RECURSIVE_METHODS:
        values = {k: v for k, v in values.items() if not k.startswith("rme_")}
    return read_by_cell(json.loads(json.dumps(values)), cell)


def read_by_cell(fingerprint: dict, cell: Cell) -> dict:
    """`fingerprint` without the run settings that `cell` does not read: the component schedule where no component
    joins later, the run's `shared_trunk` and `per_example_proportions` where the cell has neither (the cell's own
    fields record them). Applied to stored fingerprints too, so a finished cell (e.g. IWAE) counts as finished in
    any run that differs only there, including cells stored before this rule. The schedule is read as the epochs
    per stage it gives (`epochs_per_component = 0`, the spread, as `epochs // M`): two runs that train a cell alike
    share it, whichever way they spelled its schedule."""
    unread = {"shared_trunk", "per_example_proportions"}
    if not adds_components(cell):
        unread.add("epochs_per_component")
    unread = {k for k in unread if not getattr(cell, k, False)}  # the cell's own option stays where it is on
    read = {k: v for k, v in fingerprint.items() if k not in unread}
    if "epochs_per_component" in read and "epochs" in read:
        read["epochs_per_component"] = stage_epochs(read["epochs_per_component"], read["epochs"], cell.num_components)
    return read


def load_finished(config: BenchmarkConfig, cell: Cell, cell_dir: str) -> tuple[dict, dict] | None:
    """The stored row and per-example arrays of `cell`, or None when it is not finished under `config`'s settings."""
    path = os.path.join(cell_dir, RESULT_FILE)
    arrays_path = os.path.join(cell_dir, PER_EXAMPLE_FILE)
    if not (os.path.exists(path) and os.path.exists(arrays_path)):
        return None
    with open(path) as f:
        stored = json.load(f)
    if read_by_cell(stored.get("fingerprint") or {}, cell) != fingerprint(config, cell):
        return None
    with np.load(arrays_path) as arrays:
        # Named as the cell is now: a cell stored under another label (e.g. before `schedule_in_label`) keeps its
        # result under the name the run gives it.
        return dict(stored["row"], label=cell.label), {k: arrays[k] for k in arrays.files}


def save_finished(config: BenchmarkConfig, cell: Cell, cell_dir: str, row: dict, arrays: dict,
                  run: RunConfig | None = None) -> None:
    """Stores a finished cell: its per-example arrays, then its row with the fingerprint (the file that marks it
    finished, written last) and, where given, the run configuration that trained it (`run_config`, resolved) with
    its identity (`RunConfig.identity`) beside the readable label."""
    np.savez(os.path.join(cell_dir, PER_EXAMPLE_FILE), **arrays)
    stored = dict(fingerprint=fingerprint(config, cell), row=row)
    if run is not None:
        run = run.resolved()
        stored.update(run_identity=run.identity(), run_config=json.loads(json.dumps(run.to_dict())))
    with open(os.path.join(cell_dir, RESULT_FILE), "w") as f:
        json.dump(stored, f, indent=1)
