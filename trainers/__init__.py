"""Command-line programs over the tf_rmvae library (absl flags; `python -m trainers.train --help`)."""
