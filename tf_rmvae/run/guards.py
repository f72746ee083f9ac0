"""Guards that keep a broken model from being trained on or served.

* `DivergenceGuard` stops `fit` with `TrainingDiverged` at the first batch whose loss is NaN or infinite, before the
  epoch's state is saved (Keras's `TerminateOnNaN` only stops quietly, and the run would then be evaluated and
  exported as if it had finished).
* `check_exportable` refuses to export a model whose test metrics are non-finite, or whose test ELBO is below
  chance (`chance_log_likelihood`), the latter unless asked to.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from tf_rmvae.layers.decoders import BernoulliDecoder, GaussianDecoder
from tf_rmvae.run.directory import RunError


class TrainingDiverged(RunError):
    """The training loss became NaN or infinite."""


class ExportRefused(RunError):
    """The trained model's test metrics say it is broken: it was not exported."""


class DivergenceGuard(keras.callbacks.Callback):
    """Raises `TrainingDiverged` after the first training batch whose (running mean) loss is not finite.

    Put it before the callbacks that save state: the batch ends before its epoch does, so the state on disk stays
    that of the last completed epoch.
    """

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
            raise TrainingDiverged(
                f"Training diverged: the loss became {float(loss)} at batch {batch} of epoch "
                f"{getattr(self, '_epoch', 0)} (optimizer step {step}). Nothing was exported; the state of the last "
                "completed epoch is intact, but resuming it would diverge again: train in a new --model_dir with a "
                "smaller --learning_rate."
            )


def chance_log_likelihood(decoder: keras.layers.Layer) -> float:
    """Log-likelihood (nats per image) of a model that knows nothing about the images.

    Bernoulli decoder: every pixel Bernoulli(0.5), `-H W C log 2` (-543.4 for MNIST). Gaussian decoder (pixels in
    [0, 1]): the uniform density on `[0, 1]^(H W C)`, 0.
    """
    pixels = int(np.prod(decoder.image_shape))
    if isinstance(decoder, BernoulliDecoder):
        return -pixels * math.log(2.0)
    if isinstance(decoder, GaussianDecoder):
        return 0.0
    raise TypeError(f"No chance level is known for {type(decoder).__name__}.")


def check_exportable(test: dict, chance: float, allow_below_chance: bool = False) -> None:
    """Raises `ExportRefused` unless `test` (`elbo_mean`, `log_likelihood_mean` in nats) describes a servable model.

    A non-finite metric always refuses; a test ELBO below `chance` refuses unless `allow_below_chance`.
    """
    values = {key: test.get(key) for key in ("elbo_mean", "log_likelihood_mean")}
    broken = {key: value for key, value in values.items() if value is None or not math.isfinite(value)}
    if broken:
        raise ExportRefused(
            f"The test metrics are not finite ({', '.join(f'{k}={v}' for k, v in broken.items())}): the model is "
            "broken and was not exported. Train again in a new --model_dir (e.g. with a smaller --learning_rate)."
        )
    if values["elbo_mean"] < chance and not allow_below_chance:
        raise ExportRefused(
            f"The test ELBO {values['elbo_mean']:.2f} nats is below chance ({chance:.2f}, a model that knows nothing "
            "about the images), so the model was not exported. Rerun the same command with --export_below_chance to "
            "export it anyway, or train again (e.g. with a smaller --learning_rate) in a new --model_dir."
        )
