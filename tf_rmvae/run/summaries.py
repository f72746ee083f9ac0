"""TensorBoard beyond Keras's scalars: the mixture's per-component metrics grouped, and pictures every few epochs.

    callbacks = [GroupedTensorBoard("runs/quick/logs"),
                 ImageSummaries("runs/quick/logs", x_validation[:16], every_epochs=2)]

`GroupedTensorBoard` is Keras's `TensorBoard` callback except for the per-component metrics `weight_m` and
`entropy_m`: they are written as `mixture/weight_m` and `mixture/entropy_m` (one group in the Scalars dashboard), and a
custom-scalars layout (`MIXTURE_LAYOUT`) draws every component's weight in one chart and every component's entropy in
another, so the recursion (components joining, their weights moving) shows at a glance. The validation entropies go to
the `validation` run under the same tags; the mixture weights are parameters, the same on both, so only the training
ones (epoch means) are written.

`ImageSummaries` writes `reconstructions` (validation digits in odd rows, their reconstructions in even rows) and
`samples` (decoder means at fixed prior samples) to the `train` run every `every_epochs` epochs and after the last.

Steps are Keras's: the 0-based epoch.
"""

from __future__ import annotations

import os
import re

import keras
import numpy as np
import tensorflow as tf
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.custom_scalar import summary as custom_scalar_summary

from tf_rmvae.run import figures as plots

#: `weight_3`, `entropy_0`, `val_entropy_2`: the per-component metrics of `RecursiveMixtureVAE`.
COMPONENT_METRIC = re.compile(r"^(val_)?(weight|entropy)_(\d+)$")
TRAIN_RUN = "train"
VALIDATION_RUN = "validation"


def _layout() -> layout_pb2.Layout:
    def chart(title: str, pattern: str) -> layout_pb2.Chart:
        return layout_pb2.Chart(title=title, multiline=layout_pb2.MultilineChartContent(tag=[pattern]))

    return layout_pb2.Layout(category=[
        layout_pb2.Category(title="mixture", chart=[
            chart("mixture weight of every component", r"^mixture/weight_\d+$"),
            chart("entropy of every component (nats)", r"^mixture/entropy_\d+$"),
        ]),
        layout_pb2.Category(title="ELBO", chart=[
            chart("training and validation ELBO", r"^epoch_elbo$"),
            chart("training and validation loss (the negative bound trained)", r"^epoch_loss$"),
        ]),
    ])


#: The custom-scalars layout written at the start of training (TensorBoard's "Custom Scalars" dashboard).
MIXTURE_LAYOUT = _layout()


def grouped_name(metric: str) -> tuple[str, str] | None:
    """`(run, tag)` of a per-component metric (`"val_entropy_2"` -> `("validation", "mixture/entropy_2")`), or None
    for other metrics and for `val_weight_m` (the weights are parameters: the training run has them)."""
    match = COMPONENT_METRIC.match(metric)
    if match is None:
        return None
    validation, kind, index = match.groups()
    if validation and kind == "weight":
        return None
    return (VALIDATION_RUN if validation else TRAIN_RUN), f"mixture/{kind}_{index}"


def _split_component_logs(logs) -> tuple[dict, dict]:
    """`(other metrics, per-component metrics)` of `logs`, as new dicts: the other callbacks (history.csv) keep every
    metric under its own name."""
    logs = dict(logs or {})
    component_logs = {name: logs.pop(name) for name in list(logs) if COMPONENT_METRIC.match(name)}
    return logs, component_logs


class GroupedTensorBoard(keras.callbacks.TensorBoard):
    """`keras.callbacks.TensorBoard` writing the per-component metrics as `mixture/weight_m`, `mixture/entropy_m`
    (see the module docstring) and the custom-scalars layout `MIXTURE_LAYOUT`. Arguments are Keras's."""

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._mixture_writers: dict[str, tf.summary.SummaryWriter] = {}
        with self._mixture_writer(TRAIN_RUN).as_default():
            tf.summary.experimental.write_raw_pb(
                custom_scalar_summary.pb(MIXTURE_LAYOUT).SerializeToString(), step=0)

    def _mixture_writer(self, run: str) -> tf.summary.SummaryWriter:
        if run not in self._mixture_writers:
            self._mixture_writers[run] = tf.summary.create_file_writer(os.path.join(self.log_dir, run))
        return self._mixture_writers[run]

    def on_test_end(self, logs=None):
        # Keras also writes each validation pass as `evaluation_<metric>_vs_iterations`: the per-component ones are
        # in the `mixture/` group already.
        super().on_test_end(_split_component_logs(logs)[0])

    def on_epoch_end(self, epoch, logs=None):
        logs, component_logs = _split_component_logs(logs)
        super().on_epoch_end(epoch, logs)
        for name, value in sorted(component_logs.items()):
            target = grouped_name(name)
            if target is not None:
                with self._mixture_writer(target[0]).as_default():
                    tf.summary.scalar(target[1], float(value), step=epoch)
        for writer in self._mixture_writers.values():
            writer.flush()

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        for writer in self._mixture_writers.values():
            writer.close()
        self._mixture_writers = {}


class ImageSummaries(keras.callbacks.Callback):
    """Reconstructions of `images` and samples from the prior as TensorBoard images (see the module docstring).

    Args:
      log_dir: TensorBoard log directory (the images go to its `train` run).
      images: `[N, H, W, C]` in [0, 1], the digits to reconstruct (the same ones every time; a few, e.g. 16).
      every_epochs: write after every this many epochs and after the last epoch (0: never).
      num_images: images sampled from the prior (stateless in `seed`: the same latent points every time).
      seed: seed of the samples.
    """

    def __init__(self, log_dir: str, images: np.ndarray, every_epochs: int = 2, num_images: int = 64,
                 seed: int = 0):
        super().__init__()
        if every_epochs < 0:
            raise ValueError(f"every_epochs must be >= 0; got {every_epochs}.")
        self.log_dir = log_dir
        self.images = np.asarray(images, np.float32)
        self.every_epochs = int(every_epochs)
        self.num_images = int(num_images)
        self.seed = int(seed)
        self._writer = None

    def due(self, epoch: int) -> bool:
        """Whether images are written after 0-based `epoch`."""
        if self.every_epochs == 0:
            return False
        return (epoch + 1) % self.every_epochs == 0 or epoch + 1 == self.params.get("epochs")

    def on_epoch_end(self, epoch, logs=None):
        if not self.due(epoch):
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, TRAIN_RUN))
        reconstructions = plots.reconstruction_grid(self.model, self.images)
        samples = plots.sample_grid(self.model, self.num_images, self.seed)
        with self._writer.as_default():
            tf.summary.image("reconstructions", reconstructions[None], step=epoch,
                             description="data (odd rows) and reconstructions (even rows)")
            tf.summary.image("samples", samples[None], step=epoch, description="decoder means at prior samples")
        self._writer.flush()

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None
