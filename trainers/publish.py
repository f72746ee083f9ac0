"""Publishes an exported model for serving: copies a version directory into a served base directory.

    python -m trainers.publish runs/quick/export/rmvae_mnist_rme/1                 # -> saved_models/rmvae_mnist_rme/N
    python -m trainers.publish runs/quick/export/rmvae_mnist_rme/1 --base_dir /srv/models --name rmvae_mnist

The trainer exports into its run directory only; this deliberate step makes a model the newest version that a
TF Serving watching `<base_dir>/<name>` serves. The copy is atomic (a hidden temporary directory renamed into place)
and never overwrites a version. Exit status 2 with one line on stderr if the source is not an exported version.
TensorFlow's C++ logs are off unless `--tf_log_level` asks for them (`trainers.quiet`), as in the other programs.
"""

from __future__ import annotations

import sys

from trainers import quiet

with quiet.quiet_imports(sys.argv):  # first: TensorFlow reads its log level when it is imported
    from absl import app, flags

    from tf_rmvae.export import publish

flags.adopt_module_key_flags(quiet)  # --tf_log_level in --help

flags.DEFINE_string("base_dir", "saved_models", "Served base directory (one directory per model name).")
flags.DEFINE_string("name", "", "Served model name ('' = the name the model was exported under).")

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise app.UsageError("Pass one exported version directory, e.g. runs/quick/export/rmvae_mnist_rme/1.")
    quiet.quiet_python_logs()

    try:
        path = publish(argv[1], FLAGS.base_dir, FLAGS.name or None)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: cannot publish {argv[1]}: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"published {argv[1]} as {path}")


def run() -> None:
    """Console-script entry point (`rmvae-publish`)."""
    app.run(main)


if __name__ == "__main__":
    run()
