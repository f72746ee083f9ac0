"""One training run, start to finish: data, model, `fit` with resumable callbacks, test metrics, figures, export.

    from tf_rmvae.config import RunConfig
    from tf_rmvae.training import train

    metrics = train(RunConfig(model_dir="runs/quick"))      # rerunning the same call resumes or reports
    metrics["test"]["elbo_mean"], metrics["test"]["log_likelihood_mean"]

Layout of `model_dir`:

    .lock                  held (`fcntl.flock`) by the trainer using the directory; records its pid and host
    config.json            the run's `RunConfig` (a rerun with different settings that matter is refused)
    history.csv            one row per completed epoch (Keras `CSVLogger`; appended to on resume)
    backup/                the resume state `latest.weights.h5`: model weights, recursion state, optimizer variables
                           and the completed-epoch count in one file, replaced atomically after every epoch
    checkpoints/           `epoch_NNN.weights.h5` after every epoch (the last `keep_checkpoints`), same format; with
                           validation, `best.weights.h5` (the epoch with the best validation ELBO, the weights
                           evaluated and exported) and `best.json` (its epoch and value; see `tf_rmvae.best_checkpoint`)
    logs/                  TensorBoard event files: `train/` and `validation/` scalars (per-component metrics grouped
                           as `mixture/...`, a custom-scalars layout), reconstructions and samples as images
                           (`tf_rmvae.summaries`)
    metrics.json           final test ELBO / IWAE log-likelihood (mean, s.e.), mixture weights, component
                           entropies, timing, per-epoch history; `"completed": true` marks a finished run
    export/                the TF-Serving export `<name>/<version>/` (default `--export_dir`)
    reconstructions.png, samples.png, mixture_weights.png

Resumption: the `.weights.h5` file that `Model.save_weights` writes holds every model variable, including the
recursion state (`num_active_components`, `mixing_logits`, the line-search accumulators), and the optimizer's
variables (`iterations`, Adam's moments); `tf_rmvae.run_dir` adds the epoch count to the same file, writes it
atomically and, on resume, loads the newest state that passes its checks (optimizer step = epochs x steps per
epoch), falling back to the per-epoch checkpoints. The training data of epoch e is a function of (seed, e)
(`tf_rmvae.data.pipeline.load_epochs`) and the training noise of step t of (seed, t), so a run killed and resumed
ends with the weights of an uninterrupted run (up to float reduction order).

Validation (`validation_examples`): the last examples of the training split are held out (`holdout_splits`) and
evaluated after every epoch (`val_*` columns of `history.csv`). The validation noise is keyed by the step counter, so
validation is exact on resume too, and the best epoch, kept in `checkpoints/best.*` (`BestCheckpoint`), with early
stopping derived from it, survives an interruption.

What can go wrong (each fault refused with a clear error, nothing half-written): see "Failure modes" in README.md.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tf_rmvae import distribute, plots, report, run_dir
from tf_rmvae.best_checkpoint import BestCheckpoint, load_best, read_best, stop_reached
from tf_rmvae.callbacks import ComponentSchedule, NonFiniteInputGuard
from tf_rmvae.config import ConfigError, RunConfig
from tf_rmvae.decoders import make_decoder
from tf_rmvae.encoders import GaussianEncoder, RecursiveMixtureEncoder
from tf_rmvae.guards import DivergenceGuard, chance_log_likelihood, check_exportable
from tf_rmvae.models import RecursiveMixtureVAE
from tf_rmvae.summaries import GroupedTensorBoard, ImageSummaries

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
BACKUP_DIR = run_dir.BACKUP_DIR
CHECKPOINT_DIR = run_dir.CHECKPOINT_DIR
LOG_DIR = "logs"
RECONSTRUCTIONS_FILE = "reconstructions.png"
SAMPLES_FILE = "samples.png"
MIXTURE_WEIGHTS_FILE = "mixture_weights.png"


# ---------------------------------------------------------------------------------------------- model
def build_networks(
    image_shape: tuple[int, int, int],
    binary: bool,
    *,
    latent_dim: int,
    num_components: int,
    architecture: str = "dense",
    hidden_units: tuple[int, ...] = (200, 200),
    conv_filters: tuple[int, int] = (32, 64),
    likelihood: str = "auto",
    seed: int | None = None,
    encoder_hidden_units: tuple[int, ...] | None = None,
    shared_trunk: bool = False,
    gaussian: bool = False,
    per_example_proportions: bool = False,
) -> tuple[RecursiveMixtureEncoder | GaussianEncoder, keras.layers.Layer]:
    """Encoder and decoder for images `[H, W, C]` = `image_shape`: the decoder mirrors the encoder's widths and
    filters and is Bernoulli for `binary` data and Gaussian otherwise (unless `likelihood` names one).
    `encoder_hidden_units` gives the encoder other widths than the decoder's mirror (e.g. a wider encoder);
    `shared_trunk` one trunk with a head per component (see `RecursiveMixtureEncoder`); `gaussian` makes it a
    plain `GaussianEncoder` (SA-VAE; `num_components` and `shared_trunk` are then ignored);
    `per_example_proportions` gives the mixture per-example proportions eps_m(x)."""
    settings = dict(latent_dim=latent_dim, architecture=architecture,
                    hidden_units=encoder_hidden_units or hidden_units, conv_filters=conv_filters, seed=seed)
    if gaussian:
        encoder = GaussianEncoder(**settings)
    else:
        encoder = RecursiveMixtureEncoder(
            max_components=num_components, shared_trunk=shared_trunk,
            per_example_proportions=per_example_proportions, **settings)
    likelihood = likelihood if likelihood != "auto" else ("bernoulli" if binary else "gaussian")
    decoder = make_decoder(
        likelihood, image_shape, architecture=architecture, hidden_units=tuple(reversed(hidden_units)),
        conv_filters=tuple(reversed(conv_filters)),
    )
    return encoder, decoder


def encoder_parameter_count(image_shape: tuple[int, int, int], **encoder_kwargs) -> int:
    """Parameters of a `RecursiveMixtureEncoder(**encoder_kwargs)` built for images `[H, W, C]`."""
    encoder = RecursiveMixtureEncoder(**encoder_kwargs)
    encoder.ensure_built((None, *image_shape))
    return int(sum(np.prod(v.shape) for v in encoder.weights if v.dtype != "int32"))


def equal_parameter_hidden_units(
    image_shape: tuple[int, int, int], hidden_units: tuple[int, ...], num_components: int, **encoder_kwargs
) -> tuple[int, ...]:
    """Widths of one Gaussian encoder with about as many parameters as `num_components` encoders of
    `hidden_units` (all widths scaled by one factor, found by bisection; e.g. 200,200 x 4 -> 585,585 on MNIST)."""
    target = encoder_parameter_count(
        image_shape, max_components=num_components, hidden_units=hidden_units, **encoder_kwargs)

    def widths(factor: float) -> tuple[int, ...]:
        return tuple(max(1, round(factor * u)) for u in hidden_units)

    low, high = 1.0, float(num_components) + 1.0  # the count grows at least linearly in the factor
    for _ in range(40):
        middle = 0.5 * (low + high)
        count = encoder_parameter_count(image_shape, max_components=1, hidden_units=widths(middle), **encoder_kwargs)
        low, high = (middle, high) if count < target else (low, middle)
    return min((widths(low), widths(high)), key=lambda w: abs(
        encoder_parameter_count(image_shape, max_components=1, hidden_units=w, **encoder_kwargs) - target))


def build_model(config: RunConfig, image_shape: tuple[int, int, int], binary: bool) -> RecursiveMixtureVAE:
    """The unbuilt `RecursiveMixtureVAE` that `config` describes, for images `[H, W, C]` = `image_shape`."""
    encoder, decoder = build_networks(
        image_shape, binary, latent_dim=config.latent_dim, num_components=config.num_components,
        architecture=config.architecture, hidden_units=config.hidden_units, conv_filters=config.conv_filters,
        likelihood=config.decoder, seed=config.seed,
    )
    return RecursiveMixtureVAE(
        encoder, decoder, method=config.method, lambda_kl=config.lambda_kl, schedule=config.schedule,
        bound=config.bound, num_samples=config.num_samples,
        max_log_ratio=None if config.max_log_ratio < 0 else config.max_log_ratio,
        train_previous=config.train_previous,
        eps_search_every=config.eps_search_every, noise_seed=config.seed, nonfinite_inputs=config.nonfinite_inputs,
    )


def build_compiled_model(config: RunConfig, image_shape, binary: bool) -> RecursiveMixtureVAE:
    """`build_model`, built for `[None, *image_shape]` and compiled with Adam(`learning_rate`) and `jit_compile`."""
    model = build_model(config, tuple(image_shape), binary)
    model.ensure_built((None, *image_shape))
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate), jit_compile=config.jit_compile)
    return model


def load_trained_model(model_dir: str, checkpoint: str | None = None) -> RecursiveMixtureVAE:
    """Rebuilds the model of a run from `model_dir/config.json` and loads `checkpoint` (default: the resume state,
    else the newest per-epoch checkpoint)."""
    config = RunConfig.load(os.path.join(model_dir, CONFIG_FILE))
    from tf_rmvae.data import get_dataset_spec

    spec = get_dataset_spec(config.dataset)
    model = build_compiled_model(config, spec.image_shape, spec.binary)
    model.optimizer.build(model.trainable_variables)
    if checkpoint is not None:
        model.load_weights(checkpoint)
        return model
    problems = []
    for path in run_dir.state_candidates(model_dir):
        try:
            model.load_weights(path)
            return model
        except Exception as error:  # noqa: BLE001 - a damaged file may fail in h5py or in Keras: try the next one
            problems.append(f"{path}: {str(error).splitlines()[0]}")
    raise FileNotFoundError(f"No loadable weights in {model_dir} ({BACKUP_DIR}/ or {CHECKPOINT_DIR}/): {problems}")


# ---------------------------------------------------------------------------------------------- callbacks
class ResumableCSVLogger(keras.callbacks.CSVLogger):
    """`CSVLogger` in append mode that first drops rows of epochs the resumed run will train again.

    A run killed after writing an epoch's row but before saving that epoch's state redoes the epoch; the rows kept
    are those of the `initial_epoch` epochs restored, so every epoch appears exactly once.
    """

    def __init__(self, filename: str, initial_epoch: int):
        super().__init__(filename, append=True)
        self.initial_epoch = int(initial_epoch)

    def on_train_begin(self, logs=None):
        truncate_history(self.filename, self.initial_epoch)
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
    preview: np.ndarray | None = None,
) -> list[keras.callbacks.Callback]:
    """The callbacks of a run in `config.model_dir` that resumes after `initial_epoch` completed epochs.

    `validation`: `fit` gets validation data: keep the best-validation checkpoint (and stop early if asked).
    `preview`: a few images whose reconstructions TensorBoard shows every `config.image_every_epochs` epochs.

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
            ResumableCSVLogger(os.path.join(config.model_dir, HISTORY_FILE), initial_epoch),
            GroupedTensorBoard(os.path.join(config.model_dir, LOG_DIR), write_graph=False),
        ]
        if preview is not None and config.image_every_epochs:
            callbacks.append(ImageSummaries(os.path.join(config.model_dir, LOG_DIR), preview,
                                            config.image_every_epochs, seed=config.seed))
    callbacks.append(DivergenceGuard())
    if config.nonfinite_inputs == "raise":
        callbacks.append(NonFiniteInputGuard())  # names the batch of NaN/Inf inputs even under XLA
    if config.adds_components:
        callbacks.append(ComponentSchedule(epochs_per_component=config.epochs_per_component))
    if config.debug_batch_sleep > 0:
        callbacks.append(BatchSleep(config.debug_batch_sleep))
    if validation:  # before the state: an epoch whose state is saved has its best checkpoint saved
        callbacks.append(BestCheckpoint(
            os.path.join(config.model_dir, CHECKPOINT_DIR), patience=config.early_stopping_patience,
            write_directory=None if worker_dir is None else os.path.join(worker_dir, CHECKPOINT_DIR)))
    callbacks.append(run_dir.SaveState(
        os.path.join(write_dir, BACKUP_DIR), os.path.join(write_dir, CHECKPOINT_DIR),
        keep=config.keep_checkpoints if worker_dir is None else 1,
    ))
    return callbacks


# ---------------------------------------------------------------------------------------------- run files
def completed_epochs(model_dir: str) -> int:
    """Epochs whose state is saved in `model_dir/backup` (0 if none)."""
    return run_dir.saved_epoch(model_dir)


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
        _write_text_atomic(path, "".join(kept))


def _write_text_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def _json_ready(value):
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    return value


def _check_run_dir(config: RunConfig) -> dict | None:
    """Refuses a `model_dir` that holds a different run; returns its metrics if that run already finished."""
    config_path = os.path.join(config.model_dir, CONFIG_FILE)
    if not os.path.exists(config_path):
        if run_dir.has_state(config.model_dir):
            raise ConfigError(f"{config.model_dir} holds training state but no {CONFIG_FILE}; use a new --model_dir.")
        return None
    saved = RunConfig.load(config_path)
    differences = saved.mismatches(config)
    if differences:
        lines = "\n".join(f"  --{name}: saved {old!r}, now {new!r}" for name, (old, new) in sorted(differences.items()))
        raise ConfigError(
            f"{config.model_dir} holds a run with different settings:\n{lines}\n"
            "Rerun with the saved settings to resume it, or choose a new --model_dir."
        )
    metrics_path = os.path.join(config.model_dir, METRICS_FILE)
    if os.path.exists(metrics_path):
        with open(metrics_path, encoding="utf-8") as f:
            metrics = json.load(f)
        done = metrics.get("epochs_completed", 0)
        if metrics.get("completed") and (done >= config.epochs or _early_stop_reached(config, done)):
            return metrics
    return None


# ---------------------------------------------------------------------------------------------- evaluation
def component_entropies(model: RecursiveMixtureVAE, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """`[M]` mean over `x [N, H, W, C]` of each component's entropy `H(h_m(z | x))` (nats)."""
    total = np.zeros([model.encoder.max_components], np.float64)
    for start in range(0, len(x), batch_size):
        _, _, scale = model.encoder.compute_parameters(tf.constant(x[start:start + batch_size]))
        dim = scale.shape[-1]
        entropy = tf.reduce_sum(tf.math.log(scale), -1) + 0.5 * dim * math.log(2 * math.pi * math.e)  # [B, M]
        total += np.sum(entropy.numpy(), axis=0)
    return total / max(len(x), 1)


def evaluate_run(model: RecursiveMixtureVAE, x_test: np.ndarray, config: RunConfig) -> dict[str, Any]:
    """Test metrics: ELBO and IWAE log-likelihood (mean, s.e.), mixture weights and component entropies."""
    from tf_rmvae.evaluation import evaluate

    result = evaluate(model, x_test, iwae_samples=config.iwae_samples, chunk_size=config.eval_chunk_size,
                      seed=config.seed)
    active = int(keras.ops.convert_to_numpy(model.encoder.num_active_components))
    weights = np.exp(keras.ops.convert_to_numpy(model.encoder.mixture_log_weights()))
    entropies = component_entropies(model, x_test)
    return dict(
        examples=int(len(x_test)),
        elbo_mean=result["elbo_mean"], elbo_se=result["elbo_se"],
        log_likelihood_mean=result["log_likelihood_mean"], log_likelihood_se=result["log_likelihood_se"],
        iwae_samples=int(config.iwae_samples), eval_time_s=result["eval_time_s"],
        active_components=active,
        mixture_weights=[float(w) for w in weights],
        component_entropy=[float(h) if m < active else None for m, h in enumerate(entropies)],
    )


def save_figures(model: RecursiveMixtureVAE, x_test: np.ndarray, history: list[dict], config: RunConfig) -> dict:
    """Writes the three PNGs into `config.model_dir`; returns `{figure: path}`."""
    paths = {name: os.path.join(config.model_dir, name)
             for name in (RECONSTRUCTIONS_FILE, SAMPLES_FILE, MIXTURE_WEIGHTS_FILE)}
    plots.save_reconstructions(model, x_test[:16], paths[RECONSTRUCTIONS_FILE])
    plots.save_samples(model, paths[SAMPLES_FILE], num_images=64, seed=config.seed)
    plots.save_mixture_weights(history, paths[MIXTURE_WEIGHTS_FILE], config.num_components)
    return paths


def check_test_metrics(model: RecursiveMixtureVAE, config: RunConfig, test: dict) -> None:
    """Refuses (`guards.ExportRefused`) test metrics that are not finite, or a test ELBO below chance when the run
    exports and `config.export_below_chance` is off: the run is then neither exported nor marked finished."""
    allow_below_chance = config.export_below_chance or not config.resolved_export_dir
    check_exportable(test, chance_log_likelihood(model.decoder), allow_below_chance)


def export_run(model: RecursiveMixtureVAE, config: RunConfig, metrics: dict) -> dict[str, str]:
    """Exports a TF-Serving SavedModel (and the encoder alone if `config.export_encoder`) into
    `config.resolved_export_dir` (default `<model_dir>/export`); `{}` if disabled."""
    export_dir = config.resolved_export_dir
    if not export_dir:
        return {}
    from tf_rmvae import export  # imported lazily: export pulls in the serving signatures only when needed

    name = config.resolved_export_name
    paths = {"model": export.export_model(model, export_dir, name, metrics=metrics)}
    if config.export_encoder:
        paths["encoder"] = export.export_encoder(model, export_dir, name, metrics=metrics)
    return paths


# ---------------------------------------------------------------------------------------------- the run
def check_before_writing(config: RunConfig, chief: bool = True) -> None:
    """User errors that must stop a run before it writes anything (`ConfigError`): a dataset that is unknown or
    unavailable, a `model_dir` or export directory that cannot be written."""
    from tf_rmvae.data import DatasetUnavailableError, get_dataset_spec, load_numpy

    try:
        spec = get_dataset_spec(config.dataset)
        load_numpy(config.dataset, spec.test_split, take=1, data_dir=config.data_dir or None)  # prepares if needed
    except (ValueError, DatasetUnavailableError) as error:
        raise ConfigError(f"--dataset={config.dataset}: {error}") from None
    if chief:
        run_dir.check_writable(config.model_dir, "model_dir")
        if config.resolved_export_dir:
            run_dir.check_writable(config.resolved_export_dir, "export_dir")


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
      The metrics written to `model_dir/metrics.json` (plus `"skipped": True` for an already finished run).
    """
    start = time.perf_counter()
    config.validate()
    try:
        strategy = distribute.make_strategy(config.strategy)
    except distribute.StrategyError as e:
        raise ConfigError(str(e)) from e
    chief = distribute.is_chief(strategy)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ConfigError(f"--batch_size={config.batch_size} is the global batch: it must be a multiple of the "
                          f"{replicas} replicas of --strategy={config.strategy}.")
    check_before_writing(config, chief)
    if not chief:  # workers write nothing to model_dir: the chief holds its lock
        return _train_locked(config, strategy, chief, start)
    os.makedirs(config.model_dir, exist_ok=True)
    with run_dir.RunLock(config.model_dir):
        run_dir.remove_stale_temporaries(config.model_dir)
        return _train_locked(config, strategy, chief, start)


def _train_locked(config: RunConfig, strategy, chief: bool, start: float) -> dict[str, Any]:
    finished = _check_run_dir(config)
    if finished is not None:
        logging.info("%s already finished (%d epochs); nothing to train.", config.model_dir,
                     finished["epochs_completed"])
        return dict(finished, skipped=True)
    if chief:
        config.save(os.path.join(config.model_dir, CONFIG_FILE))
    if config.adds_components and config.epochs < 1 + (config.num_components - 1) * config.epochs_per_component:
        logging.warning("With --epochs=%d and --epochs_per_component=%d only %d of %d components will be active.",
                        config.epochs, config.epochs_per_component, config.active_components_at(config.epochs - 1),
                        config.num_components)
    previous_policy = distribute.set_precision(config.mixed_precision)
    worker_dir = None if chief else tempfile.mkdtemp(prefix="rmvae_worker_")
    try:
        return _train_in_strategy(config, strategy, chief, worker_dir, start)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
        if worker_dir is not None:
            shutil.rmtree(worker_dir, ignore_errors=True)


def _early_stop_reached(config: RunConfig, epochs_completed: int) -> bool:
    """Whether early stopping ended (or ends) the run of `config` after `epochs_completed` epochs."""
    best = read_best(os.path.join(config.model_dir, CHECKPOINT_DIR))
    return stop_reached(best, epochs_completed, config.early_stopping_patience)


def _validation_data(config: RunConfig, split: str | None, options: tf.data.Options):
    """`(x [N, H, W, C], batched tf.data for fit)` of the validation split (fixed binarization), or `(None, None)`."""
    from tf_rmvae.data import load_numpy

    if split is None:
        return None, None
    x = load_numpy(config.dataset, split, data_dir=config.data_dir or None)
    return x, tf.data.Dataset.from_tensor_slices(x).batch(config.batch_size).with_options(options)


def _preview_images(config: RunConfig, x_validation: np.ndarray | None, train_split: str) -> np.ndarray:
    """16 fixed digits for TensorBoard's reconstructions: validation digits, else the first training digits."""
    from tf_rmvae.data import load_numpy

    if x_validation is not None:
        return x_validation[:16]
    return load_numpy(config.dataset, train_split, take=16, data_dir=config.data_dir or None)


def _train_in_strategy(config: RunConfig, strategy, chief: bool, worker_dir: str | None, start: float) -> dict:
    from tf_rmvae.data import get_dataset_spec, holdout_splits, load_numpy
    from tf_rmvae.data.pipeline import load_epochs, split_size

    keras.utils.set_random_seed(config.seed)
    spec = get_dataset_spec(config.dataset)
    data_dir = config.data_dir or None
    try:
        train_split, validation_split = holdout_splits(config.dataset, config.validation_examples, data_dir=data_dir)
    except ValueError as e:
        raise ConfigError(f"--validation_examples: {e}") from e

    def epochs_from(first_epoch: int, last_epoch: int):
        # Epoch e's batches are a function of (seed, e): a resumed run sees the data the uninterrupted run saw. Every
        # step has the full global batch (the last incomplete batch of an epoch is dropped) on any strategy.
        return load_epochs(
            config.dataset, train_split, config.batch_size, first_epoch, last_epoch,
            seed=config.seed, data_dir=data_dir, take=config.train_examples or None, drop_remainder=True,
        )

    _, steps_per_epoch = epochs_from(config.epochs, config.epochs)  # no batches: the count that checks the state
    if steps_per_epoch < 1:
        raise ConfigError(f"--batch_size={config.batch_size} is larger than the {config.train_examples or 'whole'} "
                          "training examples: an epoch would have no step.")
    with strategy.scope():
        model = build_compiled_model(config, spec.image_shape, spec.binary)
        resumed_from = run_dir.restore(model, config.model_dir, steps_per_epoch)
    if resumed_from:
        logging.info("Resuming %s after epoch %d of %d.", config.model_dir, resumed_from, config.epochs)
    # Early stopping decided after the saved epochs (a run killed after it stopped): train no further epoch.
    epochs = resumed_from if _early_stop_reached(config, resumed_from) else config.epochs
    train_data, _ = epochs_from(min(resumed_from, epochs), epochs)
    options = tf.data.Options()
    # Every worker reads the same pipeline and keeps its share of each global batch (the split of one device's batch).
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train_data = train_data.with_options(options)
    x_validation, validation_data = _validation_data(config, validation_split, options)
    split_count = split_size(config.dataset, train_split, data_dir=data_dir)
    report.stage("data", report.data_line(
        config.dataset, train_split, split_count, min(split_count, config.train_examples or split_count),
        steps_per_epoch, config.batch_size, validation_split, 0 if x_validation is None else len(x_validation),
    ), enabled=chief and config.verbose > 0)
    preview = _preview_images(config, x_validation, train_split) if chief else None
    callbacks = make_callbacks(config, worker_dir, resumed_from, validation=validation_data is not None,
                               preview=preview)
    # shuffle=False: the dataset is shuffled already (per epoch, see load_epochs); Keras warns about the default.
    model.fit(train_data, epochs=epochs, steps_per_epoch=steps_per_epoch, initial_epoch=min(resumed_from, epochs),
              shuffle=False, validation_data=validation_data, callbacks=callbacks,
              verbose=config.verbose if chief else 0)
    train_end = time.perf_counter()
    epochs_completed = max(resumed_from, completed_epochs(config.model_dir))
    stopped_early = epochs_completed < config.epochs and _early_stop_reached(config, epochs_completed)
    summary = dict(
        # The backup may be older than the state resumed from (a checkpoint, after a failed backup save).
        dataset=config.dataset, method=config.method, epochs_completed=epochs_completed,
        optimizer_iterations=int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        strategy=config.strategy, replicas=int(strategy.num_replicas_in_sync), mixed_precision=config.mixed_precision,
        stopped_early=stopped_early,
    )
    if not chief:
        return dict(summary, chief=False, resumed_from_epoch=resumed_from, train_time_s=train_end - start)

    # The weights evaluated, drawn and exported: the best validation epoch's (the resume state keeps the last).
    best = load_best(model, os.path.join(config.model_dir, CHECKPOINT_DIR)) if validation_data is not None else None
    report.stage("training", report.training_line(
        epochs_completed, config.epochs, resumed_from, train_end - start, best, stopped_early,
        config.early_stopping_patience), enabled=config.verbose > 0)
    if validation_data is not None:
        summary["validation"] = dict(split=validation_split, examples=len(x_validation), best=best)
    x_test = load_numpy(config.dataset, spec.test_split, take=config.eval_examples or None, data_dir=data_dir)
    test = evaluate_run(model, x_test, config)
    check_test_metrics(model, config, test)  # before anything marks the run finished or serves it
    report.stage("evaluation", report.evaluation_line(test, best), enabled=config.verbose > 0)
    history = read_history(os.path.join(config.model_dir, HISTORY_FILE))
    figures = save_figures(model, x_test, history, config)
    report.stage("figures", report.figures_line(figures), enabled=config.verbose > 0)
    summary["test"] = test
    exports = export_run(model, config, _json_ready(summary))
    report.stage("export", report.export_line(exports), enabled=config.verbose > 0)
    metrics = dict(
        summary, completed=epochs_completed >= config.epochs or stopped_early, resumed_from_epoch=resumed_from,
        wall_time_s=time.perf_counter() - start, train_time_s=train_end - start, figures=figures, exports=exports,
        config=config.to_dict(), history=history,
    )
    metrics = _json_ready(metrics)
    _write_text_atomic(os.path.join(config.model_dir, METRICS_FILE), json.dumps(metrics, indent=2) + "\n")
    return metrics
