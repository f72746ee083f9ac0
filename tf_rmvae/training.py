"""One training run, start to finish: data, model, `fit` with resumable callbacks, test metrics, figures, export.

    from tf_rmvae.config import RunConfig
    from tf_rmvae.training import train

    metrics = train(RunConfig(model_dir="runs/quick"))      # rerunning the same call resumes or reports
    metrics["test"]["elbo_mean"], metrics["test"]["log_likelihood_mean"]

Layout of `model_dir`:

    config.json            the run's `RunConfig` (a rerun with different settings that matter is refused)
    history.csv            one row per completed epoch (Keras `CSVLogger`; appended to on resume)
    backup/                the resume state: `latest.weights.h5` (model weights, recursion state and optimizer
                           variables) and `training_metadata.json` (completed epochs), written atomically per epoch
    checkpoints/           `epoch_NNN.weights.h5` after every epoch (the last `keep_checkpoints`)
    logs/                  TensorBoard event files
    metrics.json           final test ELBO / IWAE log-likelihood (mean, s.e.), mixture weights, component
                           entropies, timing, per-epoch history; `"completed": true` marks a finished run
    reconstructions.png, samples.png, mixture_weights.png

Resumption rests on `keras.callbacks.BackupAndRestore`: the `.weights.h5` file that `Model.save_weights` writes holds
every model variable, including the recursion state (`num_active_components`, `mixing_logits`, the line-search
accumulators), and the optimizer's variables (`iterations`, Adam's moments). `AtomicBackupAndRestore` only makes
each save atomic, so a kill during a save leaves the previous epoch's state intact. The training data of epoch e is a
function of (seed, e) (`tf_rmvae.data.pipeline.load_epochs`) and the training noise of step t of (seed, t), so a run
killed and resumed ends with the weights of an uninterrupted run (up to float reduction order).
"""

from __future__ import annotations

import csv
import glob
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

from tf_rmvae import distribute, plots
from tf_rmvae.callbacks import ComponentSchedule, NonFiniteInputGuard
from tf_rmvae.config import ConfigError, RunConfig
from tf_rmvae.decoders import make_decoder
from tf_rmvae.encoders import GaussianEncoder, RecursiveMixtureEncoder
from tf_rmvae.models import RecursiveMixtureVAE

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
HISTORY_FILE = "history.csv"
BACKUP_DIR = "backup"
CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"
RECONSTRUCTIONS_FILE = "reconstructions.png"
SAMPLES_FILE = "samples.png"
MIXTURE_WEIGHTS_FILE = "mixture_weights.png"
CHECKPOINT_PATTERN = "epoch_{epoch:03d}.weights.h5"


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
    gaussian: bool = False,
) -> tuple[RecursiveMixtureEncoder | GaussianEncoder, keras.layers.Layer]:
    """Encoder and decoder for images `[H, W, C]` = `image_shape`: the decoder mirrors the encoder's widths and
    filters and is Bernoulli for `binary` data and Gaussian otherwise (unless `likelihood` names one).
    `encoder_hidden_units` gives the encoder other widths than the decoder's mirror (e.g. a wider encoder);
    `gaussian` makes it a plain `GaussianEncoder` (SA-VAE; `num_components` is then ignored)."""
    settings = dict(latent_dim=latent_dim, architecture=architecture,
                    hidden_units=encoder_hidden_units or hidden_units, conv_filters=conv_filters, seed=seed)
    if gaussian:
        encoder = GaussianEncoder(**settings)
    else:
        encoder = RecursiveMixtureEncoder(max_components=num_components, **settings)
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
    if checkpoint is None:
        candidates = [os.path.join(model_dir, BACKUP_DIR, "latest.weights.h5")]
        candidates += sorted(glob.glob(os.path.join(model_dir, CHECKPOINT_DIR, "epoch_*.weights.h5")), reverse=True)
        checkpoint = next((path for path in candidates if os.path.exists(path)), None)
        if checkpoint is None:
            raise FileNotFoundError(f"No weights in {model_dir} ({BACKUP_DIR}/ or {CHECKPOINT_DIR}/).")
    model.optimizer.build(model.trainable_variables)
    model.load_weights(checkpoint)
    return model


# ---------------------------------------------------------------------------------------------- callbacks
class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` whose saves are atomic (temporary files renamed into place), and which
    may write somewhere else than it restores from.

    The state (model weights, recursion state, optimizer variables) and the completed-epoch count are written to
    temporary files first and renamed weights-then-metadata, so a process killed mid-save resumes from the previous
    complete state. The state is kept after training (`delete_checkpoint=False`): a run killed during evaluation
    or export resumes with no epoch left to train.

    Multi-worker training: Keras 3's `BackupAndRestore` has no notion of workers (every process would write the same
    files). Every worker restores from `backup_dir` (the chief's; it must be on a filesystem all workers see), but only
    the chief writes there: the other workers pass their own `write_dir` (a temporary directory), so they do the same
    work at the same points as the chief (as `tf.keras` did with its per-worker temporary directories) without
    racing the chief's files.
    """

    def __init__(self, backup_dir: str, write_dir: str | None = None):
        super().__init__(backup_dir, save_freq="epoch", delete_checkpoint=False)
        self.write_dir = write_dir or backup_dir

    def _save_model(self):
        os.makedirs(self.write_dir, exist_ok=True)
        tmp_weights = os.path.join(self.write_dir, "tmp.weights.h5")
        tmp_metadata = os.path.join(self.write_dir, "tmp_training_metadata.json")
        self.model.save_weights(tmp_weights, overwrite=True)
        with open(tmp_metadata, "w", encoding="utf-8") as f:
            json.dump({"epoch": self._current_epoch, "batch": self._last_batch_seen}, f)
        os.replace(tmp_weights, os.path.join(self.write_dir, os.path.basename(self._weights_path)))
        os.replace(tmp_metadata, os.path.join(self.write_dir, os.path.basename(self._training_metadata_path)))


class ResumableCSVLogger(keras.callbacks.CSVLogger):
    """`CSVLogger` in append mode that first drops rows of epochs the resumed run will train again.

    A run killed after writing an epoch's row but before saving that epoch's state redoes the epoch; the rows kept
    are those of the epochs saved in `backup_dir`, so every epoch appears exactly once.
    """

    def __init__(self, filename: str, backup_dir: str):
        super().__init__(filename, append=True)
        self.backup_dir = backup_dir

    def on_train_begin(self, logs=None):
        truncate_history(self.filename, _saved_epochs(self.backup_dir))
        super().on_train_begin(logs)


class PrunedModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """Weights (with optimizer state) after every epoch as `epoch_NNN.weights.h5`, keeping the newest `keep`."""

    def __init__(self, directory: str, keep: int):
        super().__init__(os.path.join(directory, CHECKPOINT_PATTERN), save_weights_only=True, save_freq="epoch")
        self.directory = directory
        self.keep = int(keep)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self.keep > 0:
            for stale in sorted(glob.glob(os.path.join(self.directory, "epoch_*.weights.h5")))[:-self.keep]:
                os.remove(stale)


class BatchSleep(keras.callbacks.Callback):
    """Sleeps `seconds` after every training batch (tests slow epochs down to interrupt them mid-epoch)."""

    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = float(seconds)

    def on_train_batch_end(self, batch, logs=None):
        time.sleep(self.seconds)


def make_callbacks(config: RunConfig, worker_dir: str | None = None) -> list[keras.callbacks.Callback]:
    """The callbacks of a run in `config.model_dir`.

    The backup comes last so that at the end of an epoch it saves after the history row is written: an epoch whose
    state was saved always has its row, and a row without saved state is dropped on resume (`ResumableCSVLogger`).

    `worker_dir`: on a non-chief worker of a multi-worker run, a private directory: the worker writes its backup and
    checkpoints there (restoring from the chief's backup) and writes no history or TensorBoard logs.
    """
    model_dir = config.model_dir
    backup_dir = os.path.join(model_dir, BACKUP_DIR)
    if worker_dir is None:
        callbacks: list[keras.callbacks.Callback] = [
            ResumableCSVLogger(os.path.join(model_dir, HISTORY_FILE), backup_dir),
            keras.callbacks.TensorBoard(os.path.join(model_dir, LOG_DIR), write_graph=False),
            PrunedModelCheckpoint(os.path.join(model_dir, CHECKPOINT_DIR), config.keep_checkpoints),
        ]
    else:
        callbacks = [PrunedModelCheckpoint(os.path.join(worker_dir, CHECKPOINT_DIR), 1)]
    if config.nonfinite_inputs == "raise":
        callbacks.append(NonFiniteInputGuard())  # names the batch of NaN/Inf inputs even under XLA
    if config.adds_components:
        callbacks.append(ComponentSchedule(epochs_per_component=config.epochs_per_component))
    if config.debug_batch_sleep > 0:
        callbacks.append(BatchSleep(config.debug_batch_sleep))
    callbacks.append(AtomicBackupAndRestore(
        backup_dir, write_dir=None if worker_dir is None else os.path.join(worker_dir, BACKUP_DIR)))
    return callbacks


# ---------------------------------------------------------------------------------------------- run files
def _saved_epochs(backup_dir: str) -> int:
    path = os.path.join(backup_dir, "training_metadata.json")
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        return int(json.load(f)["epoch"])


def completed_epochs(model_dir: str) -> int:
    """Epochs whose state is saved in `model_dir/backup` (0 if none)."""
    return _saved_epochs(os.path.join(model_dir, BACKUP_DIR))


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
        if completed_epochs(config.model_dir) > 0:
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
        if metrics.get("completed") and metrics.get("epochs_completed", 0) >= config.epochs:
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


def export_run(model: RecursiveMixtureVAE, config: RunConfig, metrics: dict) -> dict[str, str]:
    """Exports a TF-Serving SavedModel (and the encoder alone if `config.export_encoder`); `{}` if disabled."""
    if not config.export_dir:
        return {}
    from tf_rmvae import export  # imported lazily: export pulls in the serving signatures only when needed

    name = config.resolved_export_name
    paths = {"model": export.export_model(model, config.export_dir, name, metrics=metrics)}
    if config.export_encoder:
        paths["encoder"] = export.export_encoder(model, config.export_dir, name, metrics=metrics)
    return paths


# ---------------------------------------------------------------------------------------------- the run
def train(config: RunConfig) -> dict[str, Any]:
    """Trains, evaluates, plots and exports the run that `config` describes; resumes an interrupted run.

    Rerunning the same config after an interruption continues from the last completed epoch (weights, recursion
    stage and optimizer state); rerunning a finished run returns its saved metrics without training. A
    `model_dir` holding a run with different settings raises `ConfigError`.

    The model, optimizer and datasets are built in the scope of `config.strategy` (made first: a multi-worker
    strategy must exist before TensorFlow runs any op); `config.batch_size` is the global batch. On a non-chief
    worker of a multi-worker run nothing is written to `model_dir` and no evaluation is done: the returned dict
    holds `"chief": False` and the training summary only.

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
    if chief:
        os.makedirs(config.model_dir, exist_ok=True)
    finished = _check_run_dir(config)
    if finished is not None:
        logging.info("%s already finished (%d epochs); nothing to train.", config.model_dir,
                     finished["epochs_completed"])
        return dict(finished, skipped=True)
    replicas = strategy.num_replicas_in_sync
    if config.batch_size % replicas:
        raise ConfigError(f"--batch_size={config.batch_size} is the global batch: it must be a multiple of the "
                          f"{replicas} replicas of --strategy={config.strategy}.")
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


def _train_in_strategy(config: RunConfig, strategy, chief: bool, worker_dir: str | None, start: float) -> dict:
    from tf_rmvae.data import get_dataset_spec, load_numpy
    from tf_rmvae.data.pipeline import load_epochs

    keras.utils.set_random_seed(config.seed)
    spec = get_dataset_spec(config.dataset)
    data_dir = config.data_dir or None
    resumed_from = completed_epochs(config.model_dir)
    if resumed_from:
        logging.info("Resuming %s after epoch %d of %d.", config.model_dir, resumed_from, config.epochs)
    # Epoch e's batches are a function of (seed, e): a resumed run sees the data the uninterrupted run saw. Every step
    # has the full global batch (the last incomplete batch of an epoch is dropped) on any strategy.
    train_data, steps_per_epoch = load_epochs(
        config.dataset, spec.train_split, config.batch_size, min(resumed_from, config.epochs), config.epochs,
        seed=config.seed, data_dir=data_dir, take=config.train_examples or None, drop_remainder=True,
    )
    if steps_per_epoch < 1:
        raise ConfigError(f"--batch_size={config.batch_size} is larger than the {config.train_examples or 'whole'} "
                          "training examples: an epoch would have no step.")
    options = tf.data.Options()
    # Every worker reads the same pipeline and keeps its share of each global batch (the split of one device's batch).
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    train_data = train_data.with_options(options)
    with strategy.scope():
        model = build_compiled_model(config, spec.image_shape, spec.binary)
    model.fit(train_data, epochs=config.epochs, steps_per_epoch=steps_per_epoch,
              callbacks=make_callbacks(config, worker_dir), verbose=config.verbose if chief else 0)
    train_end = time.perf_counter()
    summary = dict(
        dataset=config.dataset, method=config.method, epochs_completed=completed_epochs(config.model_dir),
        optimizer_iterations=int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        strategy=config.strategy, replicas=int(strategy.num_replicas_in_sync), mixed_precision=config.mixed_precision,
    )
    if not chief:
        return dict(summary, chief=False, resumed_from_epoch=resumed_from, train_time_s=train_end - start)

    x_test = load_numpy(config.dataset, spec.test_split, take=config.eval_examples or None, data_dir=data_dir)
    test = evaluate_run(model, x_test, config)
    history = read_history(os.path.join(config.model_dir, HISTORY_FILE))
    figures = save_figures(model, x_test, history, config)
    summary["test"] = test
    exports = export_run(model, config, _json_ready(summary))
    metrics = dict(
        summary, completed=summary["epochs_completed"] >= config.epochs, resumed_from_epoch=resumed_from,
        wall_time_s=time.perf_counter() - start, train_time_s=train_end - start, figures=figures, exports=exports,
        config=config.to_dict(), history=history,
    )
    metrics = _json_ready(metrics)
    _write_text_atomic(os.path.join(config.model_dir, METRICS_FILE), json.dumps(metrics, indent=2) + "\n")
    logging.info("Test ELBO %.2f ± %.2f, IWAE (K=%d) log-likelihood %.2f ± %.2f nats on %d examples; %.0f s.",
                 test["elbo_mean"], test["elbo_se"], config.iwae_samples, test["log_likelihood_mean"],
                 test["log_likelihood_se"], test["examples"], metrics["wall_time_s"])
    return metrics
