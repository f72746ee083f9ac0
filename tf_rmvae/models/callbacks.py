"""Keras callbacks that drive the recursion."""

from __future__ import annotations

import keras


class ComponentSchedule(keras.callbacks.Callback):
    """Adds mixture components on a fixed schedule (stage-wise RME).

    The target number of active components is a function of the epoch (or step) alone,
    `min(M, 1 + epoch // epochs_per_component)`, so a run resumed from a checkpoint (whose weights already hold the
    active count) continues the same schedule. Exactly one of the two arguments must be given.

    Args:
      epochs_per_component: epochs spent on each stage (component 1 alone first).
      steps_per_component: optimizer steps spent on each stage.
    """

    def __init__(self, epochs_per_component: int | None = None, steps_per_component: int | None = None):
        super().__init__()
        if (epochs_per_component is None) == (steps_per_component is None):
            raise ValueError("Give exactly one of epochs_per_component and steps_per_component.")
        for value in (epochs_per_component, steps_per_component):
            if value is not None and int(value) < 1:
                raise ValueError(f"The stage length must be >= 1; got {value}.")
        self.epochs_per_component = epochs_per_component
        self.steps_per_component = steps_per_component

    def _advance_to(self, stage: int):
        encoder = self.model.encoder
        target = min(encoder.max_components, 1 + stage)
        if not encoder.built:
            if target > 1:
                raise RuntimeError("Build the model (call it on a batch) before resuming a later stage.")
            return  # stage 0 needs nothing; the model is built by its first training step
        while int(keras.ops.convert_to_numpy(encoder.num_active_components)) < target:
            self.model.add_component()

    def on_epoch_begin(self, epoch, logs=None):
        if self.epochs_per_component is not None:
            self._advance_to(epoch // self.epochs_per_component)

    def on_train_batch_begin(self, batch, logs=None):
        if self.steps_per_component is not None:
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            self._advance_to(step // self.steps_per_component)


class NonFiniteInputGuard(keras.callbacks.Callback):
    """Stops training with an error that names the epoch and batch whose inputs held NaN/Inf values.

    `RecursiveMixtureVAE` zeroes such examples and gives them zero weight (they never reach the weights) and counts
    them in the `nonfinite_examples` metric; with `nonfinite_inputs="raise"` it also asserts in-graph, but XLA
    (`jit_compile=True`) drops assertions, so this callback raises after the batch instead.
    """

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        count = float((logs or {}).get("nonfinite_examples", 0.0))
        if count > 0:
            raise RuntimeError(
                f"Batch {batch} of epoch {getattr(self, '_epoch', 0)} had NaN/Inf inputs "
                f"({count:g} example(s) so far this epoch; they were skipped, the weights are intact). "
                "Clean the data, or build the model with nonfinite_inputs='skip' and drop this callback."
            )
