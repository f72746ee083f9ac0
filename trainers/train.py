"""Trains a Recursive Mixture Estimation VAE (or a baseline) and writes its run directory; resumable.

    python -m trainers.train --model_dir runs/quick                     # quick default: MNIST, RME, 4 components
    python -m trainers.train --model_dir runs/vae --method vae          # baseline VAE (1 component)
    rmvae-train --model_dir runs/conv --architecture conv --epochs 20   # console script (setup.py)

    python -m trainers.train --model_dir runs/gpus --strategy mirrored --batch_size 400   # every local GPU
    TF_CONFIG='{"cluster": {"worker": ["host0:2222", "host1:2222"]}, "task": {"type": "worker", "index": 0}}' \
        python -m trainers.train --model_dir /shared/runs/big --strategy multi_worker_mirrored   # on each host

Rerun the same command after an interruption to resume it; rerunning a finished run only reports its metrics.
The model is exported into the run directory (`<model_dir>/export/<name>/<version>`); publish it for serving with
`python -m trainers.publish <version_dir>`. A user error exits with status 2 and one line on stderr before anything is
written; a failed run (diverged, broken model, disk full) exits with status 1 and one line saying what to do.
`--batch_size` is the global batch (split over the replicas). With `multi_worker_mirrored`, `--model_dir` must be on a
filesystem every worker sees (the chief writes it; all workers restore from it); restart all workers after a failure.
See `tf_rmvae.training` for the layout of `--model_dir`. TensorFlow's C++ logs are off unless `--tf_log_level` asks
for them (`trainers.quiet`); the program prints one line per stage (data, training, evaluation, figures, export).
"""

from __future__ import annotations

import errno
import sys

from trainers import quiet

with quiet.quiet_imports(sys.argv):  # first: TensorFlow reads its log level when it is imported
    from absl import app, flags

    from tf_rmvae.config import AUTO_VALIDATION, ConfigError, RunConfig
    from tf_rmvae.distribute import PRECISIONS, STRATEGIES
    from tf_rmvae.encoders import ARCHITECTURES
    from tf_rmvae.models import METHODS, SCHEDULES

_DEFAULTS = RunConfig()
flags.adopt_module_key_flags(quiet)  # --tf_log_level in --help

flags.DEFINE_string("dataset", _DEFAULTS.dataset, "Dataset name (tf_rmvae.data.SUPPORTED_DATASETS).")
flags.DEFINE_string("data_dir", _DEFAULTS.data_dir, "tfds data directory ('' = tfds default).")
flags.DEFINE_integer("train_examples", _DEFAULTS.train_examples,
                     "Use the first N training examples (0 = all those left after the validation hold-out).")
flags.DEFINE_integer("validation_examples", _DEFAULTS.validation_examples,
                     f"Hold out the last N examples of the training split for validation after every epoch "
                     f"({AUTO_VALIDATION} = min(10000, a sixth of the split): 10000 for MNIST; 0 = no validation).")
flags.DEFINE_integer("batch_size", _DEFAULTS.batch_size,
                     "GLOBAL training batch size: split evenly over all replicas (a multiple of their number).")
flags.DEFINE_enum("method", _DEFAULTS.method, list(METHODS),
                  "rme: Recursive Mixture Estimation; vae: single Gaussian; mixture: jointly trained mixture; "
                  "boosting: boosting VI.")
flags.DEFINE_integer("num_components", _DEFAULTS.num_components,
                     "Mixture components M (default 1 for --method=vae, which allows only 1).")
flags.DEFINE_float("lambda_kl", _DEFAULTS.lambda_kl, "RME's KL weight lambda (>= 0; 1 collapses components).")
flags.DEFINE_integer("latent_dim", _DEFAULTS.latent_dim, "Latent dimension D.")
flags.DEFINE_enum("architecture", _DEFAULTS.architecture, list(ARCHITECTURES), "Encoder and decoder networks.")
flags.DEFINE_list("hidden_units", [str(u) for u in _DEFAULTS.hidden_units],
                  "Encoder dense widths (comma list); the decoder mirrors them.")
flags.DEFINE_list("conv_filters", [str(f) for f in _DEFAULTS.conv_filters],
                  "Encoder conv filters for --architecture=conv (2 values); the decoder mirrors them.")
flags.DEFINE_enum("decoder", _DEFAULTS.decoder, ["auto", "bernoulli", "gaussian"],
                  "Likelihood p(x|z); auto: Bernoulli for binary datasets, Gaussian otherwise.")
flags.DEFINE_enum("schedule", _DEFAULTS.schedule, list(SCHEDULES),
                  "stagewise: components join one at a time (RME); sweep: all components every step.")
flags.DEFINE_enum("bound", _DEFAULTS.bound, ["elbo", "iw"],
                  "What the decoder and mixing proportions train on: elbo (stratified ELBO) or iw (stratified "
                  "importance-weighted bound; with --method=vae and --num_samples=k: IWAE).")
flags.DEFINE_integer("num_samples", _DEFAULTS.num_samples, "Reparameterised samples per component per step.")
flags.DEFINE_float("max_log_ratio", _DEFAULTS.max_log_ratio,
                   "Cap of each sample's log h - log q_prev in RME's KL term (< 0: uncapped, which runs off).")
flags.DEFINE_boolean("train_previous", _DEFAULTS.train_previous,
                     "Stage-wise: keep training earlier components on their criteria (false: freeze them).")
flags.DEFINE_enum("nonfinite_inputs", _DEFAULTS.nonfinite_inputs, ["raise", "skip"],
                  "A batch with NaN/Inf pixels: raise (stop, naming the batch) or skip those examples.")
flags.DEFINE_integer("eps_search_every", _DEFAULTS.eps_search_every, "Steps between mixing-proportion line searches.")
flags.DEFINE_integer("epochs", _DEFAULTS.epochs, "Training epochs (a larger value extends a finished or resumed run).")
flags.DEFINE_integer("epochs_per_component", _DEFAULTS.epochs_per_component,
                     "Stage-wise RME/boosting: epochs before the next component joins.")
flags.DEFINE_integer("early_stopping_patience", _DEFAULTS.early_stopping_patience,
                     "Stop after this many epochs without a better validation ELBO (0 = train every epoch).")
flags.DEFINE_float("learning_rate", _DEFAULTS.learning_rate, "Adam learning rate.")
flags.DEFINE_integer("seed", _DEFAULTS.seed, "Seed of initialisation, shuffling and binarization.")
flags.DEFINE_boolean("jit_compile", _DEFAULTS.jit_compile, "Compile the train step with XLA.")
flags.DEFINE_integer("verbose", _DEFAULTS.verbose, "Keras progress: 0 silent, 1 progress bar, 2 one line per epoch.")
flags.DEFINE_integer("eval_examples", _DEFAULTS.eval_examples, "Test examples evaluated (0 = the whole test split).")
flags.DEFINE_integer("iwae_samples", _DEFAULTS.iwae_samples, "Importance samples K of the test log-likelihood.")
flags.DEFINE_integer("eval_chunk_size", _DEFAULTS.eval_chunk_size, "Importance samples drawn at once.")
flags.DEFINE_string("model_dir", None, "Run directory: config, checkpoints, logs, metrics, figures. Required.")
flags.DEFINE_string("export_dir", _DEFAULTS.export_dir,
                    "Base directory of TF-Serving exports, inside the run directory by default ('' disables export). "
                    "Publish an export for serving with `python -m trainers.publish`.")
flags.DEFINE_string("export_name", _DEFAULTS.export_name, "Served model name ('' = <dataset>_<method>).")
flags.DEFINE_boolean("export_encoder", _DEFAULTS.export_encoder, "Also export the encoder alone (<name>_encoder).")
flags.DEFINE_boolean("export_below_chance", _DEFAULTS.export_below_chance,
                     "Export even a model whose test ELBO is below chance (refused by default).")
flags.DEFINE_integer("keep_checkpoints", _DEFAULTS.keep_checkpoints, "Per-epoch checkpoints kept (0 = all).")
flags.DEFINE_integer("image_every_epochs", _DEFAULTS.image_every_epochs,
                     "TensorBoard reconstructions and samples every N epochs and after the last (0 = none).")
flags.DEFINE_enum("strategy", _DEFAULTS.strategy, list(STRATEGIES),
                  "tf.distribute strategy: default (one device), mirrored (all GPUs of this host), "
                  "multi_worker_mirrored (the cluster in TF_CONFIG), tpu. May change when resuming a run.")
flags.DEFINE_enum("mixed_precision", _DEFAULTS.mixed_precision, list(PRECISIONS),
                  "Keras dtype policy; distributions are always computed in float32.")
flags.DEFINE_float("debug_batch_sleep", 0.0, "Testing only: seconds to sleep after every training batch.")

FLAGS = flags.FLAGS


def _int_list(values: list[str], name: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in values)
    except ValueError:
        raise ConfigError(f"--{name} must be a comma-separated list of integers; got {','.join(values)!r}.") from None


def config_from_flags() -> RunConfig:
    """The validated `RunConfig` of the parsed flags (`--method=vae` defaults to one component)."""
    num_components = FLAGS.num_components
    if FLAGS.method == "vae" and not FLAGS["num_components"].present:
        num_components = 1
    config = RunConfig(
        dataset=FLAGS.dataset, data_dir=FLAGS.data_dir, train_examples=FLAGS.train_examples,
        validation_examples=FLAGS.validation_examples, early_stopping_patience=FLAGS.early_stopping_patience,
        image_every_epochs=FLAGS.image_every_epochs,
        batch_size=FLAGS.batch_size, method=FLAGS.method, num_components=num_components, latent_dim=FLAGS.latent_dim,
        architecture=FLAGS.architecture, hidden_units=_int_list(FLAGS.hidden_units, "hidden_units"),
        conv_filters=_int_list(FLAGS.conv_filters, "conv_filters"), decoder=FLAGS.decoder,
        lambda_kl=FLAGS.lambda_kl, max_log_ratio=FLAGS.max_log_ratio, train_previous=FLAGS.train_previous,
        nonfinite_inputs=FLAGS.nonfinite_inputs,
        schedule=FLAGS.schedule, bound=FLAGS.bound, num_samples=FLAGS.num_samples,
        eps_search_every=FLAGS.eps_search_every,
        epochs=FLAGS.epochs, epochs_per_component=FLAGS.epochs_per_component, learning_rate=FLAGS.learning_rate,
        seed=FLAGS.seed, jit_compile=FLAGS.jit_compile, verbose=FLAGS.verbose, eval_examples=FLAGS.eval_examples,
        iwae_samples=FLAGS.iwae_samples, eval_chunk_size=FLAGS.eval_chunk_size, model_dir=FLAGS.model_dir or "",
        export_dir=FLAGS.export_dir, export_name=FLAGS.export_name, export_encoder=FLAGS.export_encoder,
        export_below_chance=FLAGS.export_below_chance,
        keep_checkpoints=FLAGS.keep_checkpoints, strategy=FLAGS.strategy, mixed_precision=FLAGS.mixed_precision,
        debug_batch_sleep=FLAGS.debug_batch_sleep,
    )
    return config.validate()


def _fail(message: str, status: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    quiet.quiet_python_logs()
    try:
        config = config_from_flags()
        from tf_rmvae.run_dir import RunError
        from tf_rmvae.training import train

        metrics = train(config)
    except ConfigError as e:  # the user's mistake, found before anything was written
        _fail(str(e), 2)
    except RunError as e:  # the run failed; the message says what is intact and what to do
        _fail(str(e), 1)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        _fail(f"{e}. Free some space and rerun the same command: the last saved epoch is intact.", 1)
    if not metrics.get("chief", True):
        print(f"{config.model_dir}: worker finished {metrics['epochs_completed']} epochs; the chief writes the metrics.")
        return
    test = metrics["test"]
    status = "already finished; nothing trained" if metrics.get("skipped") else f"{metrics['wall_time_s']:.0f} s"
    print(
        f"{config.model_dir}: {metrics['epochs_completed']} epochs ({status}). Test ELBO {test['elbo_mean']:.2f} "
        f"± {test['elbo_se']:.2f}, IWAE log-likelihood (K={test['iwae_samples']}) {test['log_likelihood_mean']:.2f} "
        f"± {test['log_likelihood_se']:.2f} nats on {test['examples']} examples."
    )
    for kind, path in metrics.get("exports", {}).items():
        print(f"exported {kind}: {path}")


def run() -> None:
    """Console-script entry point (`rmvae-train`)."""
    flags.mark_flag_as_required("model_dir")
    app.run(main)


if __name__ == "__main__":
    run()
