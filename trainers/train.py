"""Trains a Recursive Mixture Estimation VAE (or a baseline) and writes its run directory; resumable.

    python -m trainers.train --model_dir runs/quick                     # quick default: MNIST, RME, 3 heads on a trunk
    python -m trainers.train --model_dir runs/vae --method vae          # baseline VAE (1 component)
    rmvae-train --model_dir runs/conv --architecture conv --epochs 20   # console script (setup.py)

    python -m trainers.train --model_dir runs/gpus --strategy mirrored --batch_size 400   # every local GPU
    TF_CONFIG='{"cluster": {"worker": ["host0:2222", "host1:2222"]}, "task": {"type": "worker", "index": 0}}' \
        python -m trainers.train --model_dir /shared/runs/big --strategy multi_worker_mirrored   # on each host

Rerun the same command after an interruption to resume it; rerunning a finished run only reports its metrics.
The model is exported into the run directory (`<model_dir>/export/<name>/<version>`); publish it for serving with
`python -m trainers.publish <version_dir>`. A user error exits with status 2 and one line on stderr before anything is
written (flag errors included); a failed run (diverged, broken model, disk full, a damaged file of the run) exits with
status 1 and one line saying what is intact and what to do; Ctrl-C exits with status 130 saying how to resume.
`--batch_size` is the global batch (split over the replicas). With `multi_worker_mirrored`, `--model_dir` must be on a
filesystem every worker sees (the chief writes it; all workers restore from it); restart all workers after a failure.
See `tf_rmvae.run.training` for the layout of `--model_dir`. TensorFlow's C++ logs are off unless `--tf_log_level` asks
for them (`trainers.quiet`); the program prints one line per stage (data, training, evaluation, figures, export).
"""

from __future__ import annotations

import errno
import sys

from trainers import cli, config_flags, quiet

with quiet.quiet_imports(sys.argv):  # first: TensorFlow reads its log level when it is imported
    from absl import flags

    from tf_rmvae.config import ConfigError, RunConfig
    from tf_rmvae.run.directory import RunError

flags.adopt_module_key_flags(quiet)  # --tf_log_level in --help

INTERRUPTED = 130  # the shell's status for a program stopped by Ctrl-C (128 + SIGINT)

config_flags.define_flags()  # one flag per RunConfig field (trainers.config_flags)
flags.adopt_module_key_flags(config_flags)
FLAGS = flags.FLAGS


def config_from_flags() -> RunConfig:
    """The validated `RunConfig` of the flags given, over the `--preset` and the method's own defaults
    (`RunConfig.from_preset`: e.g. one component for `--method=vae`) where their flags were not given."""
    values = config_flags.settings_from_flags(name for name in config_flags.FIELDS if name != "preset")
    return RunConfig.from_preset(FLAGS.preset, **values).validate()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {' '.join(argv[1:])!r}: every setting is a flag (--help lists them).")
    quiet.quiet_python_logs()
    try:
        config = config_from_flags()
        # Imported after the flags are parsed: it pulls in tensorflow_datasets, which defines absl flags of
        # its own (e.g. --tfds_debug_list_dir) that are no flags of this program.
        from tf_rmvae.run.training import train

        metrics = train(config)
    except ConfigError as e:  # the user's mistake, found before anything was written
        cli.fail(str(e))
    except RunError as e:  # the run failed; the message says what is intact and what to do
        cli.fail(str(e), 1)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        cli.fail(f"{e}. Free some space and rerun the same command: the last saved epoch is intact.", 1)
    except KeyboardInterrupt:
        cli.fail(f"interrupted: {FLAGS.model_dir} keeps every completed epoch; rerun the same command to resume.",
                 INTERRUPTED)
    _report(config, metrics)


def _report(config: RunConfig, metrics: dict) -> None:
    if not metrics.get("chief", True):
        print(f"{config.model_dir}: worker finished {metrics['epochs_completed']} epochs; "
              "the chief writes the metrics.")
        return
    test = metrics["test"]
    status = _skipped_reason(config, metrics) if metrics.get("skipped") else f"{metrics['wall_time_s']:.0f} s"
    print(
        f"{config.model_dir}: {metrics['epochs_completed']} epochs ({status}). Test ELBO {test['elbo_mean']:.2f} "
        f"± {test['elbo_se']:.2f}, IWAE log-likelihood (K={test['iwae_samples']}) {test['log_likelihood_mean']:.2f} "
        f"± {test['log_likelihood_se']:.2f} nats on {test['examples']} examples."
    )
    for kind, path in metrics.get("exports", {}).items():
        print(f"exported {kind}: {path}")


def _skipped_reason(config: RunConfig, metrics: dict) -> str:
    """Why a rerun trained nothing: the run finished its epochs, or early stopping ended it (which more --epochs
    do not undo)."""
    if metrics.get("stopped_early") and metrics["epochs_completed"] < config.epochs:
        return (f"already finished: stopped early, no better validation bound in the last "
                f"--early_stopping_patience={config.early_stopping_patience} epochs; raise it to train on; "
                "nothing trained")
    return "already finished; nothing trained"


def run() -> None:
    """Console-script entry point (`rmvae-train`)."""
    cli.run(main, sys.modules[__name__])


if __name__ == "__main__":
    run()
