"""Publishes an exported model for serving: copies a version directory into a served base directory.

    python -m trainers.publish runs/quick/export/rmvae_mnist_rme/1                 # -> saved_models/rmvae_mnist_rme/N
    python -m trainers.publish runs/quick/export/rmvae_mnist_rme/1 --base_dir /srv/models --name rmvae_mnist

The trainer exports into its run directory only; this deliberate step makes a model the newest version that a
TF Serving watching `<base_dir>/<name>` serves. The copy is atomic (a hidden temporary directory renamed into place)
and never overwrites a version; publishing a model already served there copies nothing and names its version. A
relative `--base_dir` (the default `saved_models` included) is taken from the current directory; the program prints
the absolute path it published to. Exit status 2 with one line on stderr if the source is not an exported version.
TensorFlow's C++ logs are off unless `--tf_log_level` asks for them (`trainers.quiet`), as in the other programs.
"""

from __future__ import annotations

import os
import sys

from trainers import cli, quiet

with quiet.quiet_imports(sys.argv):  # first: TensorFlow reads its log level when it is imported
    from absl import flags

    from tf_rmvae.export import existing_versions, publish, read_metadata

flags.adopt_module_key_flags(quiet)  # --tf_log_level in --help

flags.DEFINE_string("base_dir", "saved_models", "Served base directory (one directory per model name); a relative "
                    "path is taken from the current directory.")
flags.DEFINE_string("name", "", "Served model name ('' = the name the model was exported under).")

FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        cli.fail("pass one exported version directory, e.g. runs/quick/export/rmvae_mnist_rme/1.")
    quiet.quiet_python_logs()

    try:
        before = _published_versions(argv[1])
        path = os.path.abspath(publish(argv[1], FLAGS.base_dir, FLAGS.name or None))
    except (OSError, ValueError, KeyError) as e:
        cli.fail(f"cannot publish {argv[1]}: {e}")
    if int(os.path.basename(path)) in before:
        print(f"{argv[1]} is already published as {path} (identical model); nothing copied")
    else:
        print(f"published {argv[1]} as {path}")


def _published_versions(version_dir: str) -> list[int]:
    """The versions already in the served directory that `version_dir` would be published to."""
    name = FLAGS.name or read_metadata(version_dir)["name"]
    return existing_versions(os.path.join(FLAGS.base_dir, name))


def run() -> None:
    """Console-script entry point (`rmvae-publish`)."""
    cli.run(main, sys.modules[__name__])


if __name__ == "__main__":
    run()
