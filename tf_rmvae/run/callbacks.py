"""The callbacks of one training run, in the order that keeps its directory consistent (`make_callbacks`).

    callbacks = make_callbacks(config, initial_epoch=resumed_from, validation=True, preview=x_validation[:16])
    model.fit(..., initial_epoch=resumed_from, callbacks=callbacks)

History (`ResumableCSVLogger`), TensorBoard (`tf_rmvae.run.summaries`), the divergence and input guards, the
component schedule (`tf_rmvae.models.callbacks`), the best checkpoint (`tf_rmvae.run.best_checkpoint`) and, last, the
resume state (`tf_rmvae.run.directory.SaveState`).
"""

from __future__ import annotations

import os
import time

import keras
import numpy as np

from tf_rmvae.choices import resolve_best_monitor
from tf_rmvae.config import RunConfig
from tf_rmvae.models.callbacks import ComponentSchedule, NonFiniteInputGuard
from tf_rmvae.run import directory as run_dir
from tf_rmvae.run.best_checkpoint import BestCheckpoint
from tf_rmvae.run.guards import DivergenceGuard
from tf_rmvae.run.summaries import GroupedTensorBoard, ImageSummaries


class ResumableCSVLogger(keras.callbacks.CSVLogger):
    """`CSVLogger` in append mode that first drops rows of epochs the resumed run will train again.

    A run killed after writing an epoch's row but before saving that epoch's state redoes the epoch; the rows kept
    are those of the `initial_epoch` epochs restored, so every epoch appears exactly once.
    """

    def __init__(self, filename: str, initial_epoch: int):
        super().__init__(filename, append=True)
        self.initial_epoch = int(initial_epoch)

    def on_train_begin(self, logs=None):
        run_dir.truncate_history(self.filename, self.initial_epoch)
        super().on_train_begin(logs)


class BatchSleep(keras.callbacks.Callback):
    """Sleeps `seconds` after every training batch (tests slow epochs down to interrupt them mid-epoch)."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = float(seconds)

    def on_train_batch_end(self, batch, logs=None):
        time.sleep(self.seconds)


def make_callbacks(
    config: RunConfig, worker_dir: str | None = None, initial_epoch: int = 0, *, validation: bool = False,
    preview: np.ndarray | None = None, extra: tuple[keras.callbacks.Callback, ...] = (),
) -> list[keras.callbacks.Callback]:
    """The callbacks of a run in `config.model_dir` that resumes after `initial_epoch` completed epochs.

    `validation`: `fit` gets validation data: keep the best-validation checkpoint (and stop early if asked), on the
    validation value of the bound the run trains (`choices.resolve_best_monitor`).
    `preview`: a few images whose reconstructions TensorBoard shows every `config.image_every_epochs` epochs.
    `extra`: the caller's callbacks (e.g. the benchmark's curve evaluation), run before the state is saved.

    The state is saved last (`run_dir.SaveState`: checkpoint, then backup) so that at the end of an epoch it is saved
    after the history row and the best checkpoint are written: an epoch whose state was saved always has them, and a
    row without saved state is dropped on resume (`ResumableCSVLogger`). `DivergenceGuard` stops at a non-finite
    loss before any of that.

    `worker_dir`: on a non-chief worker of a multi-worker run, a private directory: the worker writes its backup and
    checkpoints there (it restored from the chief's backup) and writes no history or TensorBoard logs, so it does the
    same work at the same points as the chief (as `tf.keras` did with its per-worker temporary directories) without
    racing the chief's files.
    """
    write_dir = config.model_dir if worker_dir is None else worker_dir
    callbacks: list[keras.callbacks.Callback] = []
    if worker_dir is None:
        callbacks += [
            ResumableCSVLogger(os.path.join(config.model_dir, run_dir.HISTORY_FILE), initial_epoch),
            GroupedTensorBoard(os.path.join(config.model_dir, run_dir.LOG_DIR), write_graph=False),
        ]
        if preview is not None and config.image_every_epochs:
            callbacks.append(ImageSummaries(os.path.join(config.model_dir, run_dir.LOG_DIR), preview,
                                            config.image_every_epochs, seed=config.seed))
    callbacks.append(DivergenceGuard())
    if config.nonfinite_inputs == "raise":
        callbacks.append(NonFiniteInputGuard())  # names the batch of NaN/Inf inputs even under XLA
    if config.adds_components:
        callbacks.append(ComponentSchedule(epochs_per_component=config.resolved_epochs_per_component))
    if config.debug_batch_sleep > 0:
        callbacks.append(BatchSleep(config.debug_batch_sleep))
    if validation:  # before the state: an epoch whose state is saved has its best checkpoint saved
        monitor, mode = resolve_best_monitor(config.method, config.bound)
        callbacks.append(BestCheckpoint(
            os.path.join(config.model_dir, run_dir.CHECKPOINT_DIR), monitor=monitor, mode=mode,
            patience=config.early_stopping_patience,
            write_directory=None if worker_dir is None else os.path.join(worker_dir, run_dir.CHECKPOINT_DIR)))
    callbacks += list(extra)
    callbacks.append(run_dir.SaveState(
        os.path.join(write_dir, run_dir.BACKUP_DIR), os.path.join(write_dir, run_dir.CHECKPOINT_DIR),
        keep=config.keep_checkpoints if worker_dir is None else 1,
    ))
    return callbacks
