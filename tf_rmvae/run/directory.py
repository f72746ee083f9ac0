"""Integrity of a run directory: one trainer at a time, the resume state saved as one atomic file and checked when
it is loaded, clear errors for a full disk and for directories that cannot be written.

    with RunLock(model_dir):                                   # a second trainer gets RunDirLocked naming this pid
        epoch = restore(model, model_dir, steps_per_epoch)     # newest intact state (warns about broken ones)
        model.fit(..., initial_epoch=epoch, callbacks=[..., SaveState(model_dir + "/backup", ...)])

The state of a run after `epoch` completed epochs is one `.weights.h5` file (Keras's `save_weights`: model
variables, recursion state, optimizer variables) whose HDF5 root attribute `tf_rmvae_state` holds its metadata as
JSON (`{"format", "epoch", "steps_per_epoch", "optimizer_iterations"}`). It is written to a temporary file, flushed
to disk and renamed over the previous state, so the state on disk is always one complete epoch: weights and
metadata cannot disagree. Loading checks the file against itself and against the run: the optimizer's step counter
must equal `epoch x steps_per_epoch`, so a truncated, half-written or edited state is refused, and the newest
intact state is used instead (by the epoch each state claims, newest first; the backup before a checkpoint of the
same epoch), with a warning.

The run's other files: `config.json` (a rerun with different settings that matter is refused:
`check_run_dir`), `history.csv` (one row per completed epoch; `read_history`, `truncate_history` drops the
rows of epochs a resumed run trains again) and `metrics.json` (`"completed": true` marks a finished run, which
a rerun only reports).
"""

from __future__ import annotations

import csv
import errno
import fcntl
import glob
import json
import os
import re
import socket

import h5py
import keras
import numpy as np
from absl import logging

from tf_rmvae.config import ConfigError, RunConfig
from tf_rmvae.files import RunError, read_json_object, write_text_atomic
from tf_rmvae.files import fsync as _fsync
from tf_rmvae.run.best_checkpoint import read_best, stop_reached

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
PATH_ENTRIES = ("figures", "exports")  # entries of metrics.json that map names to file paths
LOG_DIR = "logs"
BACKUP_DIR = "backup"
CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "latest.weights.h5"
CHECKPOINT_PATTERN = "epoch_{epoch:03d}.weights.h5"
_CHECKPOINT_NAME = re.compile(r"epoch_(\d+)\.weights\.h5")  # CHECKPOINT_PATTERN's names (4+ digits from epoch 1000)
LEGACY_METADATA_FILE = "training_metadata.json"  # metadata beside the weights, before states were one file
METADATA_ATTR = "tf_rmvae_state"
STATE_FORMAT = "tf_rmvae.state/1"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
#: Bytes of path that a run's deepest files take below its directory (an export's temporary variables file).
PATH_RESERVE = 256


class DiskFullError(RunError):
    """The disk filled up while the run saved its state; the previous state is intact."""


class ResumeStateError(RunError):
    """The run directory holds training state, none of it intact."""


class RunDirLocked(ConfigError):
    """Another trainer holds the run directory's lock."""


# ---------------------------------------------------------------------------------------------- directories
def check_writable(path: str, flag: str) -> None:
    """`ConfigError` unless `path` is a writable directory or could be created as one, with room below it for
    the run's files (`check_path_length`); nothing is written."""
    path = os.path.abspath(path)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    check_path_length(path, existing, flag)
    if not os.path.isdir(existing):
        raise ConfigError(f"--{flag}={path} cannot be a directory: {existing} is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"--{flag}={path} is not writable: permission denied on {existing}.")


def check_path_length(path: str, existing: str, flag: str) -> None:
    """`ConfigError` if a component of the absolute `path` is longer than its filesystem allows (`existing`: the
    deepest ancestor that exists), or if `path` leaves fewer than `PATH_RESERVE` bytes for the files below it."""
    name_max = os.pathconf(existing, "PC_NAME_MAX")
    path_max = os.pathconf(existing, "PC_PATH_MAX")
    for part in path.split(os.sep):
        if len(os.fsencode(part)) > name_max:
            raise ConfigError(f"--{flag}: the name {part[:40]}... is {len(os.fsencode(part))} bytes long; this "
                              f"filesystem allows {name_max}: choose a shorter --{flag}.")
    if len(os.fsencode(path)) + PATH_RESERVE > path_max:
        raise ConfigError(f"--{flag} is {len(os.fsencode(path))} bytes long; the files written below it need it "
                          f"under {path_max - PATH_RESERVE} (of {path_max}): choose a shorter --{flag}.")


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` says the disk (or the user's quota) is full."""
    # h5py reports HDF5's write failures as OSError without errno, naming the cause in the message only.
    return getattr(error, "errno", None) in _DISK_FULL or "No space left on device" in str(error)


# ---------------------------------------------------------------------------------------------- lock
class RunLock:
    """Exclusive `fcntl.flock` on `model_dir/.lock`, which records the holder's pid and host.

    The kernel drops the lock when its holder exits, however it dies, so a lock file left by a dead trainer is
    simply taken over. (flock is advisory and, on some network filesystems, local to one host.)
    """

    def __init__(self, model_dir: str):
        self.path = os.path.join(model_dir, LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").split()
            os.close(fd)
            who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "a process that has not written its pid"
            raise RunDirLocked(
                f"{os.path.dirname(self.path)} is in use by another trainer ({who}); wait for it to finish or stop "
                "it, or use another --model_dir."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------- one state file
def state_metadata(epoch: int, steps_per_epoch: int, optimizer_iterations: int) -> dict:
    """The metadata saved with the state after `epoch` completed epochs."""
    return {"format": STATE_FORMAT, "epoch": int(epoch), "steps_per_epoch": int(steps_per_epoch),
            "optimizer_iterations": int(optimizer_iterations)}


def _save_weights(model: keras.Model, path: str) -> None:
    """The one place a state's bytes are written (tests inject faults here)."""
    model.save_weights(path, overwrite=True)


def _state_size(model: keras.Model, path: str) -> int:
    """Bytes a new state file will take: the current one's size, else the variables' bytes plus HDF5 overhead."""
    if os.path.exists(path):
        return os.path.getsize(path)
    variables = list(model.weights) + list(getattr(model.optimizer, "variables", []))
    return sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables) + 2**16


def _disk_full(path: str, epoch, cause: str) -> DiskFullError:
    return DiskFullError(
        f"No space left on device while saving {path} (epoch {epoch}): {cause}; the previously saved state is "
        "intact. Free some space and rerun the same command to resume."
    )


def _check_free_space(model: keras.Model, path: str, epoch) -> None:
    """Refuses a save that cannot fit: HDF5 running out of space mid-write can crash the process (segfault)."""
    needed = int(_state_size(model, path) * 1.1)
    stats = os.statvfs(os.path.dirname(path) or ".")
    free = stats.f_bavail * stats.f_frsize
    if free < needed:
        raise _disk_full(path, epoch, f"it needs about {needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free")


def write_state(model: keras.Model, path: str, metadata: dict) -> None:
    """Writes the model's weights (with the optimizer's) and `metadata` to `path` as one atomic file.

    Raises `DiskFullError` if the state cannot fit on the disk (checked first) or the disk fills up while it is
    written: the temporary file is removed and `path` keeps its previous state.
    """
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".tmp-{os.getpid()}-{os.path.basename(path)}")  # ends in .weights.h5 for Keras
    try:
        os.makedirs(directory, exist_ok=True)
        _check_free_space(model, path, metadata.get("epoch"))
        _save_weights(model, tmp)
        with h5py.File(tmp, "r+") as f:
            f.attrs[METADATA_ATTR] = json.dumps(metadata)
        _fsync(tmp)  # the data reaches the disk before the rename publishes it
        os.replace(tmp, path)
        _fsync(directory)
    except OSError as error:
        if is_disk_full(error):
            raise _disk_full(path, metadata.get("epoch"), str(error).splitlines()[0]) from error
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_metadata(path: str) -> dict:
    """The metadata of a state file; `ValueError` if it cannot be read (truncated, not HDF5, no metadata)."""
    try:
        with h5py.File(path, "r") as f:
            text = f.attrs.get(METADATA_ATTR)
    except OSError as error:  # h5py's "truncated file", "file signature not found", ...
        raise ValueError(f"unreadable ({str(error).splitlines()[0]})") from error
    metadata = json.loads(text) if text is not None else _legacy_metadata(path)
    if not isinstance(metadata, dict) or not isinstance(metadata.get("epoch"), int) or metadata["epoch"] < 0:
        raise ValueError(f"no valid epoch in its metadata ({metadata})")
    return metadata


def _legacy_metadata(path: str) -> dict:
    """Metadata of a state written before states were one file: a JSON beside the backup, the checkpoint's name."""
    match = _CHECKPOINT_NAME.fullmatch(os.path.basename(path))
    if match:
        return {"epoch": int(match.group(1))}
    legacy = os.path.join(os.path.dirname(path), LEGACY_METADATA_FILE)
    if not os.path.exists(legacy):
        raise ValueError("no metadata")
    with open(legacy, encoding="utf-8") as f:
        return {"epoch": int(json.load(f)["epoch"])}


def load_state(model: keras.Model, path: str, steps_per_epoch: int) -> int:
    """Loads a state file into the compiled, built `model` and checks it; returns its completed epochs.

    `ValueError` if the file is unreadable or inconsistent: its optimizer step must equal `epoch x steps_per_epoch`.
    """
    metadata = read_metadata(path)
    epoch = metadata["epoch"]
    if "steps_per_epoch" in metadata and metadata["steps_per_epoch"] != steps_per_epoch:
        raise ValueError(f"saved with {metadata['steps_per_epoch']} steps per epoch, the run has {steps_per_epoch}")
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    try:
        model.load_weights(path)
    except Exception as error:  # noqa: BLE001 - h5py and Keras fail in many ways on a damaged file
        raise ValueError(f"its weights cannot be loaded ({str(error).splitlines()[0]})") from error
    iterations = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    if iterations != epoch * steps_per_epoch:
        raise ValueError(f"it claims {epoch} epochs but its optimizer made {iterations} steps, not {epoch} x "
                         f"{steps_per_epoch}")
    return epoch


def checkpoint_paths(checkpoint_dir: str) -> list[str]:
    """The per-epoch checkpoints in `checkpoint_dir`, oldest first, ordered by the epoch in their names (not as
    text: `epoch_1000` comes after `epoch_999`)."""
    named = []
    for path in glob.glob(os.path.join(checkpoint_dir, "epoch_*.weights.h5")):
        match = _CHECKPOINT_NAME.fullmatch(os.path.basename(path))
        if match:
            named.append((int(match.group(1)), path))
    return [path for _, path in sorted(named)]


def state_candidates(model_dir: str) -> list[str]:
    """Existing state files of a run: the backup, then the per-epoch checkpoints, newest first."""
    backup = os.path.join(model_dir, BACKUP_DIR, STATE_FILE)
    checkpoints = checkpoint_paths(os.path.join(model_dir, CHECKPOINT_DIR))[::-1]
    return [path for path in [backup, *checkpoints] if os.path.exists(path)]


def restore(model: keras.Model, model_dir: str, steps_per_epoch: int) -> int:
    """Loads the newest intact state of `model_dir` into `model` (compiled and built); returns its epoch (0: none).

    States are tried by the epoch they claim, newest first (the backup before a checkpoint of the same epoch);
    each one that is unreadable or inconsistent is skipped with a warning. Raises `ResumeStateError` if the run
    holds states but none is intact (starting over silently would discard its history).
    """
    problems = []
    claimed = []
    for order, path in enumerate(state_candidates(model_dir)):
        try:
            claimed.append((read_metadata(path)["epoch"], -order, path))
        except ValueError as error:
            problems.append(f"{path}: {error}")
    for epoch, _, path in sorted(claimed, reverse=True):
        try:
            load_state(model, path, steps_per_epoch)
        except ValueError as error:
            problems.append(f"{path}: {error}")
            continue
        if problems:
            logging.warning("Resuming from %s (epoch %d); skipped broken state: %s", path, epoch, "; ".join(problems))
        return epoch
    if problems:
        raise ResumeStateError(
            f"{model_dir} holds training state but none of it is intact ({'; '.join(problems)}). Move its "
            f"{BACKUP_DIR}/ and {CHECKPOINT_DIR}/ away to train again from scratch, or use another --model_dir."
        )
    return 0


def remove_stale_temporaries(model_dir: str) -> list[str]:
    """Deletes the temporary state files a killed trainer left in `backup/` and `checkpoints/` (call it only while
    holding the run's lock: another trainer's temporaries are then impossible); returns their paths."""
    stale = [path for directory in (BACKUP_DIR, CHECKPOINT_DIR)
             for path in glob.glob(os.path.join(model_dir, directory, ".tmp-*"))]
    for path in stale:
        os.remove(path)
    return stale


def saved_epoch(model_dir: str) -> int:
    """Completed epochs that `model_dir`'s backup claims (0 if there is none or it is unreadable); not verified."""
    path = os.path.join(model_dir, BACKUP_DIR, STATE_FILE)
    try:
        return read_metadata(path)["epoch"] if os.path.exists(path) else 0
    except ValueError:
        return 0


def has_state(model_dir: str) -> bool:
    """Whether `model_dir` holds any training state (intact or not)."""
    return bool(state_candidates(model_dir))


# ---------------------------------------------------------------------------------------------- the callback
class SaveState(keras.callbacks.Callback):
    """After every epoch: the state to `checkpoint_dir/epoch_NNN.weights.h5` (keeping the newest `keep`; 0 keeps
    all) and then to `backup_dir/latest.weights.h5`, each written by `write_state` (one atomic file).

    Put it last among the callbacks: the epoch's history row is then written before its state, and a row whose
    state was never saved is dropped on resume.
    """

    def __init__(self, backup_dir: str, checkpoint_dir: str | None = None, keep: int = 0):
        super().__init__()
        self.backup_dir = backup_dir
        self.checkpoint_dir = checkpoint_dir
        self.keep = int(keep)

    def on_epoch_end(self, epoch, logs=None):
        iterations = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        metadata = state_metadata(epoch + 1, self.params["steps"], iterations)
        if self.checkpoint_dir is not None:
            write_state(self.model, os.path.join(self.checkpoint_dir, CHECKPOINT_PATTERN.format(epoch=epoch + 1)),
                        metadata)
            self._prune()
        write_state(self.model, os.path.join(self.backup_dir, STATE_FILE), metadata)

    def _prune(self):
        if self.keep > 0:
            for stale in checkpoint_paths(self.checkpoint_dir)[:-self.keep]:
                os.remove(stale)


# ---------------------------------------------------------------------------------------------- the run's files
def read_history(path: str) -> list[dict[str, float]]:
    """Rows of a Keras CSV history (`epoch` 0-based) as dicts of floats; `[]` if the file does not exist."""
    if not os.path.exists(path):
        return []
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    # CSVLogger writes "NA" for metrics an epoch lacks (e.g. the val_* columns of a run without validation).
    return [{key: _to_number(value) for key, value in row.items() if value not in ("", "NA")} for row in rows]


def _to_number(value: str) -> float | int:
    number = float(value)
    return int(number) if number.is_integer() and abs(number) < 2**53 else number


def truncate_history(path: str, epochs: int) -> None:
    """Keeps the header and the rows with `epoch < epochs` of a CSV history (rewritten atomically)."""
    if not os.path.exists(path):
        return
    with open(path, newline="", encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    if not lines:
        return
    kept = [lines[0]] + [line for line in lines[1:] if line.strip() and int(float(line.split(",", 1)[0])) < epochs]
    if epochs == 0:
        kept = []  # a fresh start: let CSVLogger write its header again
    if len(kept) != len(lines):
        write_text_atomic(path, "".join(kept))


def early_stop_reached(config: RunConfig, epochs_completed: int) -> bool:
    """Whether early stopping ended (or ends) the run of `config` after `epochs_completed` epochs."""
    best = read_best(os.path.join(config.model_dir, CHECKPOINT_DIR))
    return stop_reached(best, epochs_completed, config.early_stopping_patience)


def saved_config(model_dir: str) -> RunConfig | None:
    """The config of the run in `model_dir`, or None where none was saved (`ConfigError` if it is unreadable)."""
    path = os.path.join(model_dir, CONFIG_FILE)
    return RunConfig.load(path) if model_dir and os.path.exists(path) else None


def check_run_dir(config: RunConfig) -> dict | None:
    """Refuses a `model_dir` that holds a different run; returns its metrics if that run already finished."""
    saved = saved_config(config.model_dir)
    if saved is None:
        if has_state(config.model_dir):
            raise ConfigError(f"{config.model_dir} holds training state but no {CONFIG_FILE}; use a new --model_dir.")
        return None
    differences = saved.mismatches(config)
    if differences:
        lines = "\n".join(f"  --{name}: saved {old!r}, now {new!r}" for name, (old, new) in sorted(differences.items()))
        raise ConfigError(
            f"{config.model_dir} holds a run with different settings:\n{lines}\n"
            "Rerun with the saved settings to resume it, or choose a new --model_dir."
        )
    read_best(os.path.join(config.model_dir, CHECKPOINT_DIR))  # a damaged record stops the run before any write
    metrics = read_metrics(config.model_dir)
    if metrics is not None and metrics.get("completed"):
        done = metrics.get("epochs_completed", 0)
        if done >= config.epochs or early_stop_reached(config, done):
            return metrics
    done = saved_epoch(config.model_dir)
    if done > config.epochs:
        raise ConfigError(f"{config.model_dir} holds {done} completed epochs, more than --epochs={config.epochs}: "
                          f"rerun with --epochs={done} or more to finish it, or use a new --model_dir.")
    return None


def read_metrics(model_dir: str) -> dict | None:
    """The metrics of the run in `model_dir`, or None where there are none or they are damaged (warned about: the
    run is then evaluated and exported again from its saved state, which rewrites them)."""
    path = os.path.join(model_dir, METRICS_FILE)
    if not os.path.exists(path):
        return None
    try:
        metrics = read_json_object(path)
    except ValueError as error:
        logging.warning("%s is damaged (%s): the run is evaluated again from its saved state.", path, error)
        return None
    return _map_paths(metrics, lambda entry: os.path.join(model_dir, entry))  # an absolute entry stays as it is


def portable_paths(metrics: dict, model_dir: str) -> dict:
    """`metrics` with its file paths (`PATH_ENTRIES`) inside `model_dir` made relative to it, as `metrics.json`
    holds them: a moved or copied run directory still names its own files (`read_metrics` joins them back)."""
    root = os.path.abspath(model_dir)

    def relative(entry: str) -> str:
        absolute = os.path.abspath(entry)
        return os.path.relpath(absolute, root) if absolute.startswith(root + os.sep) else entry

    return _map_paths(metrics, relative)


def _map_paths(metrics: dict, function) -> dict:
    paths = {key: {name: function(entry) for name, entry in metrics[key].items()}
             for key in PATH_ENTRIES if isinstance(metrics.get(key), dict)}
    return dict(metrics, **paths)
