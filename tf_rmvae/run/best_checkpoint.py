"""The best-validation weights of a run, kept as their own checkpoint, and early stopping on them; both survive resume.

    callback = BestCheckpoint("runs/quick/checkpoints", monitor="val_loss", mode="min", patience=5)
    model.fit(..., validation_data=..., callbacks=[callback, ...])
    best = load_best(model, "runs/quick/checkpoints")
    # {"epoch": 8, "value": 91.2, "monitor": "val_loss", "mode": "min"}

After every epoch whose `monitor` is better than the best so far, the weights (model, recursion state and optimizer
variables) are written to `best.weights.h5` and then the record `{"epoch", "value", "monitor", "mode"}` to
`best.json`, each atomically (a temporary file renamed into place). The record is the whole state: a resumed run
reads it back, and early stopping is a function of it alone (stop once `patience` epochs passed without a better
value), so an interrupted and resumed run keeps its best value and epoch and stops where the uninterrupted run would
have.

The record names its monitor and mode: a resumed run keeps comparing what its first epochs compared, even where
the default monitor has changed since (runs on the importance-weighted bound monitored `val_elbo` before they
monitored `val_loss`).

A kill between the two renames leaves `best.weights.h5` one epoch ahead of `best.json`; that epoch's resume state was
not saved yet (the resume backup is written after this callback), so the resumed run trains it again, reaches the
same weights and value (resumption is exact), and rewrites both files.
"""

from __future__ import annotations

import math
import os

import keras

from tf_rmvae.files import DamagedFileError, fsync, read_json_object, write_json_atomic

BEST_WEIGHTS_FILE = "best.weights.h5"
BEST_STATE_FILE = "best.json"


MODES = ("max", "min")
#: Modes of the monitors of records written before records named their mode (the trainer's monitor then).
LEGACY_MODES = {"val_elbo": "max"}


def read_best(directory: str) -> dict | None:
    """The record `{"epoch" (0-based, as in history.csv), "value", "monitor", "mode"}` in `directory`, or None.

    A record written before records named their mode has none unless its monitor is in `LEGACY_MODES`. A damaged
    record (empty, truncated, edited) raises `DamagedFileError` naming the file, what is intact and what to do."""
    path = os.path.join(directory, BEST_STATE_FILE)
    if not os.path.exists(path):
        return None
    try:
        return _checked_record(read_json_object(path))
    except ValueError as error:
        raise DamagedFileError(
            f"{path} is damaged ({error}); the resume state is intact. Delete {BEST_STATE_FILE} and "
            f"{BEST_WEIGHTS_FILE} in {directory} to resume without the best-epoch record (the next validated epoch "
            "becomes the best), or use a new --model_dir."
        ) from None


def _checked_record(best: dict) -> dict:
    """`best` with its mode filled in; `ValueError` naming the first entry that a record cannot hold."""
    epoch, value, monitor = best.get("epoch"), best.get("value"), best.get("monitor")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch {epoch!r} is not a count of epochs")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"value {value!r} is not a finite number")
    if not isinstance(monitor, str):
        raise ValueError(f"monitor {monitor!r} is not a metric name")
    mode = best.get("mode", LEGACY_MODES.get(monitor))
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode {mode!r} is not 'max' or 'min'")
    return best if mode is None else dict(best, mode=mode)


def stop_reached(best: dict | None, epochs_completed: int, patience: int) -> bool:
    """Whether early stopping ends training after `epochs_completed` epochs: `patience` > 0 epochs have passed since
    the best epoch of the record `best` (none if there is no record)."""
    if patience <= 0 or best is None or epochs_completed <= 0:
        return False
    return (epochs_completed - 1) - int(best["epoch"]) >= patience


def load_best(model: keras.Model, directory: str) -> dict | None:
    """Loads `directory/best.weights.h5` into `model` and returns its record; None (model untouched) if none."""
    best = read_best(directory)
    weights = os.path.join(directory, BEST_WEIGHTS_FILE)
    if best is None or not os.path.exists(weights):
        return None
    model.load_weights(weights)
    return best


class BestCheckpoint(keras.callbacks.Callback):
    """Keeps the weights of the epoch with the best `monitor` in `best.weights.h5`; optionally stops early.

    Args:
      directory: where the best checkpoint and its record are read from (on resume).
      monitor: the epoch log to compare (default `val_elbo`, the validation ELBO; the trainer passes
        `choices.resolve_best_monitor`'s). A record already in `directory` with another monitor keeps its own (with
        its mode): a resumed run compares like with like.
      mode: "max" (higher is better, default) or "min".
      patience: stop training once this many epochs passed without a better value (0: never stop early).
      write_directory: where they are written (default `directory`). Non-chief workers of a multi-worker run read the
        chief's record but write to a private directory, so that every worker takes the same early-stopping decision
        without racing the chief's files.
    """

    def __init__(self, directory: str, monitor: str = "val_elbo", mode: str = "max", patience: int = 0,
                 write_directory: str | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be 'max' or 'min'; got {mode!r}.")
        if patience < 0:
            raise ValueError(f"patience must be >= 0; got {patience}.")
        self.directory = directory
        self.write_directory = write_directory or directory
        self.monitor = monitor
        self.mode = mode
        self.patience = int(patience)
        self.best: dict | None = None
        self.stopped_epoch: int | None = None

    def on_train_begin(self, logs=None):
        self.best = read_best(self.directory)
        self.stopped_epoch = None
        if self.best is not None:  # the run's own monitor, whatever this callback was built with
            monitor, mode = self.best["monitor"], self.best.get("mode")
            if mode is None and monitor != self.monitor:
                raise ValueError(
                    f"{os.path.join(self.directory, BEST_STATE_FILE)} records monitor {monitor!r} without its mode, "
                    f"and this run monitors {self.monitor!r}: add \"mode\" (\"max\" or \"min\") to the record.")
            self.monitor, self.mode = monitor, mode or self.mode

    def _improves(self, value: float) -> bool:
        if self.best is None:
            return True
        best = float(self.best["value"])
        return value > best if self.mode == "max" else value < best

    def _save(self, epoch: int, value: float) -> None:
        os.makedirs(self.write_directory, exist_ok=True)
        tmp = os.path.join(self.write_directory, f"tmp_{BEST_WEIGHTS_FILE}")
        self.model.save_weights(tmp, overwrite=True)
        fsync(tmp)
        os.replace(tmp, os.path.join(self.write_directory, BEST_WEIGHTS_FILE))
        self.best = {"epoch": int(epoch), "value": float(value), "monitor": self.monitor, "mode": self.mode}
        write_json_atomic(os.path.join(self.write_directory, BEST_STATE_FILE), self.best)

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            raise KeyError(f"BestCheckpoint monitors {self.monitor!r}, which the epoch logs lack "
                           f"(they have {sorted(logs or {})}); give fit validation data.")
        value = float(value)
        if math.isfinite(value) and self._improves(value):
            self._save(epoch, value)
        if stop_reached(self.best, epoch + 1, self.patience):
            self.stopped_epoch = epoch
            self.model.stop_training = True
