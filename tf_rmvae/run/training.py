"""One training run, start to finish: data, model, `fit` with resumable callbacks, test metrics, figures, export.

    from tf_rmvae.config import RunConfig
    from tf_rmvae.run.training import train

    metrics = train(RunConfig(model_dir="runs/quick"))      # rerunning the same call resumes or reports
    metrics["test"]["elbo_mean"], metrics["test"]["log_likelihood_mean"]
    fitted = fit(config, callbacks=[...])                    # the same training, evaluated by the caller
    fitted.model, fitted.history                             # (the benchmark's cells)

Layout of `model_dir`:

    .lock                  held (`fcntl.flock`) by the trainer using the directory; records its pid and host
    config.json            the run's `RunConfig` (a rerun with different settings that matter is refused)
    history.csv            one row per completed epoch (Keras `CSVLogger`; appended to on resume)
    backup/                the resume state `latest.weights.h5`: model weights, recursion state, optimizer variables
                           and the completed-epoch count in one file, replaced atomically after every epoch
    checkpoints/           `epoch_NNN.weights.h5` after every epoch (the last `keep_checkpoints`), same format; with
                           validation, `best.weights.h5` (the epoch with the best validation bound, the one trained:
                           the weights evaluated and exported) and `best.json` (its epoch, value and monitor; see
                           `tf_rmvae.run.best_checkpoint`)
    logs/                  TensorBoard event files: `train/` and `validation/` scalars (per-component metrics grouped
                           as `mixture/...`, a custom-scalars layout), reconstructions and samples as images
                           (`tf_rmvae.run.summaries`)
    metrics.json           final test ELBO / IWAE log-likelihood (mean, s.e.), mixture weights, component
                           entropies, timing, per-epoch history, the best checkpoint's record (`validation.best`:
                           its value is its monitor's, `val_loss` = the negative bound on --bound=iw);
                           `"completed": true` marks a finished run
    export/                the TF-Serving export `<name>/<version>/` (default `--export_dir`)
    reconstructions.png, samples.png, mixture_weights.png

Resumption: the `.weights.h5` file that `Model.save_weights` writes holds every model variable, including the
recursion state (`num_active_components`, `mixing_logits`, the line-search accumulators), and the optimizer's
variables (`iterations`, Adam's moments); `tf_rmvae.run.directory` adds the epoch count to the same file, writes it
atomically and, on resume, loads the newest state that passes its checks (optimizer step = epochs x steps per
epoch), falling back to the per-epoch checkpoints. The training data of epoch e is a function of (seed, e)
(`tf_rmvae.data.pipeline.load_epochs`) and the training noise of step t of (noise seed, t), so a run killed and
resumed ends with the weights of an uninterrupted run (up to float reduction order); not so with
`data_order="reshuffled"` (how the benchmark's cells train), whose resumed epochs see other batches.

Validation (`validation_examples`): the last examples of the training split are held out (`holdout_splits`) and
evaluated after every epoch (`val_*` columns of `history.csv`). The validation noise is keyed by the step counter, so
validation is exact on resume too, and the best epoch, kept in `checkpoints/best.*` (`BestCheckpoint`), with early
stopping derived from it, survives an interruption.

What can go wrong (each fault refused with a clear error, nothing half-written): see "Failure modes" in README.md.

The pieces, one module each: the model (`tf_rmvae.run.factory`; with `decoder_from`, a trained model's decoder
frozen, `tf_rmvae.run.frozen_decoder`), the callbacks (`tf_rmvae.run.callbacks`),
the run directory's files, lock and resume state (`tf_rmvae.run.directory`), test metrics, figures and export
(`tf_rmvae.run.final_evaluation`), strategies (`tf_rmvae.run.strategies`); this module runs them in order.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from typing import Any, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_rmvae.config import ConfigError, RunConfig
from tf_rmvae.data import (
    DatasetSpec,
    DatasetUnavailableError,
    get_dataset_spec,
    holdout_splits,
    load_dataset,
    load_numpy,
)
from tf_rmvae.data.pipeline import load_epochs, split_size
from tf_rmvae.files import json_ready, write_json_atomic
from tf_rmvae.run import directory as run_dir
from tf_rmvae.run import final_evaluation as run_evaluation
from tf_rmvae.run import frozen_decoder, report
from tf_rmvae.run import strategies as distribute
from tf_rmvae.run.best_checkpoint import load_best
from tf_rmvae.run.callbacks import make_callbacks
from tf_rmvae.run.factory import (
    build_compiled_model,
    build_model,
    build_networks,
    check_frozen_decoder,
    equal_parameter_hidden_units,
    load_trained_model,
)

# The model factory's names are re-exported for the callers of `tf_rmvae.run.training` from before the split.
__all__ = [
    "build_compiled_model",
    "build_model",
    "build_networks",
    "check_before_writing",
    "equal_parameter_hidden_units",
    "fit",
    "FitResult",
    "load_trained_model",
    "train",
]


def train(config: RunConfig) -> dict[str, Any]:
    """Trains, evaluates, plots and exports the run that `config` describes; resumes an interrupted run.

    Rerunning the same config after an interruption continues from the last completed epoch (weights, recursion
    stage and optimizer state); rerunning a finished run returns its saved metrics without training. A
    `model_dir` holding a run with different settings raises `ConfigError`.

    The model, optimizer and datasets are built in the scope of `config.strategy` (made first: a multi-worker
    strategy must exist before TensorFlow runs any op); `config.batch_size` is the global batch. On a non-chief
    worker of a multi-worker run nothing is written to `model_dir` and no evaluation is done: the returned dict
    holds `"chief": False` and the training summary only.

    User errors raise `ConfigError` before anything is written (`check_before_writing`); a second trainer on the
    same `model_dir` gets `run_dir.RunDirLocked`. Failures of the run itself raise `run_dir.RunError` with what is
    intact and how to recover: `guards.TrainingDiverged` (non-finite loss), `guards.ExportRefused` (non-finite test
    metrics, or a test ELBO below chance), `run_dir.DiskFullError`, `run_dir.ResumeStateError`.

    Returns:
      The metrics written to `model_dir/metrics.json`, its file paths as the run directory was given (plus
      `"skipped": True` for an already finished run).
    """
    return _run(config, evaluate=True, callbacks=())


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What `fit` returns: the trained model (the last epoch's weights), the `History` of the epochs this call
    trained, the epoch it resumed after (0: a fresh start) and its training time."""

    model: keras.Model
    history: keras.callbacks.History
    resumed_from: int
    train_time_s: float


def fit(config: RunConfig, callbacks: Sequence[keras.callbacks.Callback] = ()) -> FitResult:
    """Trains the run that `config` describes into `config.model_dir` as `train` does (the same checks, lock, model,
    data, callbacks and checked resume state), and returns the model without evaluating, drawing or exporting it:
    for callers that evaluate it their own way (the benchmark's cells).

    `callbacks` run at every epoch's end before the resume state is saved (an epoch whose state is saved has their
    work done). Rerunning after an interruption resumes; rerunning a finished run trains no epoch and returns its
    saved weights. A `model_dir` holding a run with different settings raises `ConfigError`.
    """
    return _run(config, evaluate=False, callbacks=tuple(callbacks))


def _run(config: RunConfig, evaluate: bool, callbacks: tuple) -> dict[str, Any] | FitResult:
    start = time.perf_counter()
    # The run's files (config.json, metrics.json) name the bound, samples and schedule it trains with, never "auto":
    # a later default cannot change what a resumed run trains.
    config = config.validate().resolved(saved=run_dir.saved_config(config.model_dir))
    # Which decoder a frozen-decoder run trains against: its weights file's digest, saved and compared on resume.
    config = frozen_decoder.pinned(config)
    strategy = _make_strategy(config)
    chief = distribute.is_chief(strategy)
    check_before_writing(config, chief)
    if not chief:  # workers write nothing to model_dir: the chief holds its lock
        return _train_locked(config, strategy, chief, start, evaluate, callbacks)
    os.makedirs(config.model_dir, exist_ok=True)
    with run_dir.RunLock(config.model_dir):
        run_dir.remove_stale_temporaries(config.model_dir)
        return _train_locked(config, strategy, chief, start, evaluate, callbacks)


def _make_strategy(config: RunConfig) -> tf.distribute.Strategy:
    """`config.strategy`; `ConfigError` if it cannot be made here or if its replicas do not divide the global
    batch."""
    try:
        strategy = distribute.make_strategy(config.strategy)
    except distribute.StrategyError as e:
        raise ConfigError(str(e)) from e
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ConfigError(f"--batch_size={config.batch_size} is the global batch: it must be a multiple of the "
                          f"{replicas} replicas of --strategy={config.strategy}.")
    return strategy


def check_before_writing(config: RunConfig, chief: bool = True) -> None:
    """User errors that must stop a run before it writes anything (`ConfigError`): a dataset that is unknown or
    unavailable, a split of it that leaves no training step (`_RunData.of`), a `decoder_from` whose weights this
    run's decoder cannot take, a `model_dir` or export directory that cannot be written."""
    try:
        spec = get_dataset_spec(config.dataset)
        load_numpy(config.dataset, spec.test_split, take=1, data_dir=config.data_dir or None)  # prepares if needed
    except (ValueError, DatasetUnavailableError) as error:
        raise ConfigError(f"--dataset={config.dataset}: {error}") from None
    _RunData.of(config)
    check_frozen_decoder(config, spec.image_shape, spec.binary)
    if chief:
        run_dir.check_writable(config.model_dir, "model_dir")
        if config.resolved_export_dir:
            run_dir.check_writable(config.resolved_export_dir, "export_dir")


def _train_locked(config: RunConfig, strategy, chief: bool, start: float, evaluate: bool,
                  callbacks: tuple) -> dict[str, Any] | FitResult:
    finished = run_dir.check_run_dir(config)
    if finished is not None and evaluate:
        logging.info("%s already finished (%d epochs); nothing to train.", config.model_dir,
                     finished["epochs_completed"])
        return dict(finished, skipped=True)
    if chief:
        config.save(os.path.join(config.model_dir, run_dir.CONFIG_FILE))
    if config.adds_components and config.epochs < 1 + (config.num_components - 1) * config.epochs_per_component:
        logging.warning("With --epochs=%d and --epochs_per_component=%d only %d of %d components will be active.",
                        config.epochs, config.epochs_per_component, config.active_components_at(config.epochs - 1),
                        config.num_components)
    previous_policy = distribute.set_precision(config.mixed_precision)
    worker_dir = None if chief else tempfile.mkdtemp(prefix="rmvae_worker_")
    try:
        if not evaluate:
            return _fit_in_strategy(config, strategy, chief, worker_dir, callbacks).result
        return _train_in_strategy(config, strategy, chief, worker_dir, start)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
        if worker_dir is not None:
            shutil.rmtree(worker_dir, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class _Fitted:
    result: FitResult
    data: _RunData
    x_validation: np.ndarray | None
    train_end: float


def _fit_in_strategy(config: RunConfig, strategy, chief: bool, worker_dir: str | None,
                     callbacks: tuple = ()) -> _Fitted:
    """Builds the model, restores the run's state and trains the remaining epochs."""
    keras.utils.set_random_seed(config.seed)
    data = _RunData.of(config)
    with strategy.scope():
        model = build_compiled_model(config, data.spec.image_shape, data.spec.binary)
        resumed_from = run_dir.restore(model, config.model_dir, data.steps_per_epoch)
    if resumed_from:
        logging.info("Resuming %s after epoch %d of %d.", config.model_dir, resumed_from, config.epochs)
    fit_start = time.perf_counter()
    x_validation, history = _fit(model, config, data, chief, worker_dir, resumed_from, callbacks)
    train_end = time.perf_counter()
    return _Fitted(FitResult(model, history, resumed_from, train_end - fit_start), data, x_validation, train_end)


def _train_in_strategy(config: RunConfig, strategy, chief: bool, worker_dir: str | None, start: float) -> dict:
    fitted = _fit_in_strategy(config, strategy, chief, worker_dir)
    model, resumed_from = fitted.result.model, fitted.result.resumed_from
    data, x_validation, train_end = fitted.data, fitted.x_validation, fitted.train_end
    # The backup may be older than the state resumed from (a checkpoint, after a failed backup save).
    epochs_completed = max(resumed_from, run_dir.saved_epoch(config.model_dir))
    stopped_early = epochs_completed < config.epochs and run_dir.early_stop_reached(config, epochs_completed)
    summary = dict(
        dataset=config.dataset, method=config.method, epochs_completed=epochs_completed,
        optimizer_iterations=int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        strategy=config.strategy, replicas=int(strategy.num_replicas_in_sync), mixed_precision=config.mixed_precision,
        stopped_early=stopped_early,
    )
    if not chief:
        return dict(summary, chief=False, resumed_from_epoch=resumed_from, train_time_s=train_end - start)

    # The weights evaluated, drawn and exported: the best validation epoch's (the resume state keeps the last).
    checkpoints = os.path.join(config.model_dir, run_dir.CHECKPOINT_DIR)
    best = load_best(model, checkpoints) if x_validation is not None else None
    report.stage("training", report.training_line(
        epochs_completed, config.epochs, resumed_from, train_end - start, best, stopped_early,
        config.early_stopping_patience), enabled=config.verbose > 0)
    if x_validation is not None:
        summary["validation"] = dict(split=data.validation_split, examples=len(x_validation), best=best)
    return _evaluate_and_publish(model, config, data, summary, best, resumed_from, start, train_end)


@dataclasses.dataclass(frozen=True)
class _RunData:
    """The run's dataset, its training and validation splits, the steps of one epoch (no batch loaded)."""

    spec: DatasetSpec
    train_split: str
    validation_split: str | None
    steps_per_epoch: int

    @classmethod
    def of(cls, config: RunConfig) -> _RunData:
        spec = get_dataset_spec(config.dataset)
        try:
            train_split, validation_split = holdout_splits(config.dataset, config.validation_examples,
                                                           data_dir=config.data_dir or None)
        except ValueError as e:
            raise ConfigError(f"--validation_examples: {e}") from e
        examples = _training_examples(config, train_split)
        _, steps_per_epoch = _epochs(config, train_split, config.epochs, config.epochs)  # the count only
        if steps_per_epoch < 1:
            raise ConfigError(f"--batch_size={config.batch_size} is larger than the {examples} training examples "
                              f"({train_split}): an epoch would have no step.")
        return cls(spec, train_split, validation_split, steps_per_epoch)


def _training_examples(config: RunConfig, train_split: str) -> int:
    """The examples an epoch trains on; `ConfigError` if `--train_examples` asks for more than the hold-out leaves."""
    available = split_size(config.dataset, train_split, data_dir=config.data_dir or None)
    if config.train_examples > available:
        raise ConfigError(
            f"--train_examples={config.train_examples} is more than the {available} training examples "
            f"({train_split}) left after the validation hold-out (--validation_examples="
            f"{config.validation_examples}): use at most {available}, or hold out fewer.")
    return config.train_examples or available


def _epochs(config: RunConfig, train_split: str, first_epoch: int, last_epoch: int):
    """`(tf.data of the batches of epochs [first_epoch, last_epoch), steps per epoch)`.

    Epoch e's batches are a function of (seed, e): a resumed run sees the data the uninterrupted run saw. Every
    step has the full global batch (the last incomplete batch of an epoch is dropped) on any strategy.
    """
    if config.data_order == "reshuffled" and first_epoch < last_epoch:
        # One epoch of batches, reshuffled by tf.data on every pass of `fit` (no `steps_per_epoch`: Keras then starts
        # a new pass each epoch); its steps are those of the epoch-keyed pipeline (same examples, same batch).
        _, steps = load_epochs(config.dataset, train_split, config.batch_size, 0, 0, seed=config.seed,
                               data_dir=config.data_dir or None, take=config.train_examples or None)
        return load_dataset(
            config.dataset, train_split, config.batch_size, seed=config.seed, take=config.train_examples or None,
            data_dir=config.data_dir or None, drop_remainder=True), steps
    return load_epochs(
        config.dataset, train_split, config.batch_size, first_epoch, last_epoch,
        seed=config.seed, data_dir=config.data_dir or None, take=config.train_examples or None,
        drop_remainder=True,
    )


def _fit(model, config: RunConfig, data: _RunData, chief: bool, worker_dir: str | None,
         resumed_from: int, extra_callbacks: tuple = ()) -> tuple[np.ndarray | None, keras.callbacks.History]:
    """Trains the epochs after `resumed_from` with the run's callbacks (and `extra_callbacks`, before the state is
    saved); returns the validation images or None, and the `History` of the epochs trained."""
    # Early stopping decided after the saved epochs (a run killed after it stopped): train no further epoch.
    epochs = resumed_from if run_dir.early_stop_reached(config, resumed_from) else config.epochs
    train_data, _ = _epochs(config, data.train_split, min(resumed_from, epochs), epochs)
    options = tf.data.Options()
    # Every worker reads the same pipeline and keeps its share of each global batch (the split of one device's batch).
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train_data = train_data.with_options(options)
    x_validation, validation_data = _validation_data(config, data.validation_split, options)
    split_count = split_size(config.dataset, data.train_split, data_dir=config.data_dir or None)
    report.stage("data", report.data_line(
        config.dataset, data.train_split, split_count, min(split_count, config.train_examples or split_count),
        data.steps_per_epoch, config.batch_size, data.validation_split,
        0 if x_validation is None else len(x_validation),
    ), enabled=chief and config.verbose > 0)
    preview = _preview_images(config, x_validation, data.train_split) if chief else None
    callbacks = make_callbacks(config, worker_dir, resumed_from, validation=validation_data is not None,
                               preview=preview, extra=extra_callbacks)
    # The reshuffled pipeline holds one epoch, which `fit` iterates anew each epoch (`_epochs`).
    steps = None if config.data_order == "reshuffled" else data.steps_per_epoch
    # shuffle=False: the dataset is shuffled already (per epoch, see load_epochs); Keras warns about the default.
    history = model.fit(train_data, epochs=epochs, steps_per_epoch=steps,
                        initial_epoch=min(resumed_from, epochs), shuffle=False, validation_data=validation_data,
                        callbacks=callbacks, verbose=config.verbose if chief else 0)
    return x_validation, history


def _validation_data(config: RunConfig, split: str | None, options: tf.data.Options):
    """`(x [N, H, W, C], batched tf.data for fit)` of the validation split (fixed binarization), or `(None, None)`."""
    if split is None:
        return None, None
    x = load_numpy(config.dataset, split, data_dir=config.data_dir or None)
    return x, tf.data.Dataset.from_tensor_slices(x).batch(config.batch_size).with_options(options)


def _preview_images(config: RunConfig, x_validation: np.ndarray | None, train_split: str) -> np.ndarray:
    """16 fixed digits for TensorBoard's reconstructions: validation digits, else the first training digits."""
    if x_validation is not None:
        return x_validation[:16]
    return load_numpy(config.dataset, train_split, take=16, data_dir=config.data_dir or None)


def _evaluate_and_publish(model, config: RunConfig, data: _RunData, summary: dict, best: dict | None,
                          resumed_from: int, start: float, train_end: float) -> dict[str, Any]:
    """Test metrics (checked before anything marks the run finished or serves it), figures, export, then
    `metrics.json`, which marks the run finished; returns the metrics."""
    x_test = load_numpy(config.dataset, data.spec.test_split, take=config.eval_examples or None,
                        data_dir=config.data_dir or None)
    test = run_evaluation.evaluate_run(model, x_test, config)
    run_evaluation.check_test_metrics(model, config, test)
    report.stage("evaluation", report.evaluation_line(test, best), enabled=config.verbose > 0)
    history = run_dir.read_history(os.path.join(config.model_dir, run_dir.HISTORY_FILE))
    figures = run_evaluation.save_figures(model, x_test, history, config)
    report.stage("figures", report.figures_line(figures), enabled=config.verbose > 0)
    summary["test"] = test
    exports = run_evaluation.export_run(model, config, json_ready(summary))
    report.stage("export", report.export_line(exports), enabled=config.verbose > 0)
    epochs_completed = summary["epochs_completed"]
    metrics = dict(
        summary, completed=epochs_completed >= config.epochs or summary["stopped_early"],
        resumed_from_epoch=resumed_from, wall_time_s=time.perf_counter() - start,
        train_time_s=train_end - start, figures=figures, exports=exports, config=config.to_dict(),
        history=history,
    )
    metrics = json_ready(metrics)
    write_json_atomic(os.path.join(config.model_dir, run_dir.METRICS_FILE),
                      run_dir.portable_paths(metrics, config.model_dir))
    return metrics
