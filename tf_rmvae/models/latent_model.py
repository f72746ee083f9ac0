"""`LatentVariableModel`: what every VAE-style model here shares (RME and its baselines, SA-VAE).

An encoder (`RecursiveMixtureEncoder`, or `GaussianEncoder` for SA-VAE), a decoder `p(x | z)` and the prior
`N(0, I)`; building on first use, batch unpacking, metric trackers, reconstruction, prior samples, the
importance-weighted log-likelihood and Keras serialization of the two sub-layers. Subclasses provide
`posterior_mean(x)`, the importance proposal `proposal(x)` and their own `train_step`/`test_step`.
"""

from __future__ import annotations

import warnings

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tf_rmvae import objectives
from tf_rmvae.layers.encoders import RecursiveMixtureEncoder, build_eagerly
from tf_rmvae.models import inputs as image_inputs
from tf_rmvae.models import legacy_weights

tfd = tfp.distributions


def standard_normal_log_prob(z: tf.Tensor) -> tf.Tensor:
    """`log N(z; 0, I)` summed over the last axis: `[..., D] -> [...]`."""
    return tf.reduce_sum(tfd.Normal(0.0, 1.0).log_prob(z), axis=-1)


def replica_batch_layout(batch: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """`(offset, global_batch)`: where this replica's examples start in the global batch, and its size.

    Replicas may hold unequal batches (e.g. a last partial batch), so the sizes are gathered across replicas.
    """
    batch = tf.convert_to_tensor(batch, tf.int32)
    context = tf.distribute.get_replica_context()
    if context is None or tf.distribute.get_strategy().num_replicas_in_sync == 1:
        return tf.constant(0, tf.int32), batch
    sizes = context.all_gather(tf.reshape(batch, [1]), axis=0)  # [R]
    earlier = tf.range(tf.shape(sizes)[0]) < context.replica_id_in_sync_group
    return tf.reduce_sum(tf.where(earlier, sizes, 0)), tf.reduce_sum(sizes)


class LatentVariableModel(keras.Model):
    """Base of the models: `encoder` (an `encoder_type`), `decoder` (`z [..., D]` -> image distribution)."""

    encoder_type: type = RecursiveMixtureEncoder  # what the subclass's encoder must be
    weights_layout: str = legacy_weights.MIXTURE_LAYOUT  # how a 0.1 weights file maps onto this model

    def __init__(self, encoder: keras.layers.Layer, decoder: keras.layers.Layer, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(encoder, self.encoder_type):
            raise TypeError(f"encoder must be a {self.encoder_type.__name__}; got {type(encoder).__name__}.")
        self.encoder = encoder
        self.decoder = decoder
        self._trackers: dict[str, keras.metrics.Metric] = {}
        self._log_likelihood_fn = None

    # ------------------------------------------------------------------ construction
    def ensure_built(self, input_shape) -> None:
        """Builds the model for `input_shape` (also inside a traced step: variables are created eagerly)."""
        build_eagerly(self, input_shape)

    def build(self, input_shape):
        self.encoder.ensure_built(tuple(input_shape))
        if not self.decoder.built:
            self.decoder.build((None, self.encoder.latent_dim))
            self.decoder.built = True
        self.built = True

    def load_weights(self, filepath, *args, **kwargs):
        """`keras.Model.load_weights`; also reads `.weights.h5` files written by tf-rmvae 0.1 (an interrupted
        run or benchmark cell of that version resumes; see `tf_rmvae.models.legacy_weights`)."""
        with legacy_weights.upgraded_copy(filepath, self.weights_layout) as path:
            return super().load_weights(path, *args, **kwargs)

    @property
    def metrics(self):
        return list(self._trackers.values())

    def _image_shape(self) -> tuple[int, ...] | None:
        """`(H, W, C)` of the decoder's images (None for a decoder that does not say)."""
        shape = getattr(self.decoder, "image_shape", None)
        return None if shape is None else tuple(int(d) for d in shape)

    def _unpack(self, data) -> tf.Tensor:
        """A batch as float32 images `[B, H, W, C]` in [0, 1]: `x`, `(x,)`, `(x, y)` or a tfds-style dict; uint8
        pixels scaled by 1/255; float pixels outside [0, 1], flat or label-only batches refused
        (`tf_rmvae.models.inputs`)."""
        images = image_inputs.as_images(data, self._image_shape())
        self.ensure_built(images.shape)
        return images

    # ------------------------------------------------------------------ Keras entry points
    def _checked_data(self, x):
        """`fit`/`evaluate` data with the pixel-range check outside the step when XLA would drop the in-graph one."""
        if not self.jit_compile:
            return x  # `_unpack`'s in-graph assertion runs
        if isinstance(x, tf.data.Dataset):
            return image_inputs.checked_dataset(x)
        image_inputs.check_array(x)
        return x

    def fit(self, x=None, *args, **kwargs):
        """`keras.Model.fit`; batches as `_unpack` accepts them (see `tf_rmvae.models.inputs`)."""
        return super().fit(self._checked_data(x), *args, **kwargs)

    def evaluate(self, x=None, *args, **kwargs):
        """`keras.Model.evaluate`; batches as `_unpack` accepts them (see `tf_rmvae.models.inputs`)."""
        return super().evaluate(self._checked_data(x), *args, **kwargs)

    # ------------------------------------------------------------------ inference API
    def posterior_mean(self, x) -> tf.Tensor:
        """`[B, D]` mean of the posterior."""
        raise NotImplementedError

    def proposal(self, x) -> tfd.Distribution:
        """The importance proposal `q(z | x)` of `log_likelihood` (batch `[B]`, event `[D]`)."""
        raise NotImplementedError

    def call(self, inputs, training=False):
        """Reconstruction: decoder mean at the posterior mean, `[B, H, W, C]`."""
        return self.decoder(self.posterior_mean(self._unpack(inputs))).mean()

    def generate(self, num_images: int, seed: int | None = None) -> tf.Tensor:
        """Mean images decoded from prior samples, `[num_images, H, W, C]` (stateless in `seed`)."""
        seed = [0, 0 if seed is None else seed]
        z = tf.random.stateless_normal([num_images, self.encoder.latent_dim], seed=seed)
        return self.decoder(z).mean()

    def log_likelihood(self, x, iwae_samples: int = 5000, chunk_size: int = 100, *, num_samples=None) -> tf.Tensor:
        """`[B]` importance-weighted estimate of `log p(x)`: K = `iwae_samples` proposal samples, in chunks.

        `iwae_samples` may be a Python int or an int32 scalar tensor (e.g. a serving input). An empty batch gives an
        empty result. Memory grows with B x `chunk_size` (the decoder runs on `[chunk_size, B, D]` latents): split
        large batches (the exported `log_likelihood` signature does, see `tf_rmvae.export`). `num_samples`: the
        former name of `iwae_samples` (deprecated: `num_samples` names the training samples per component).
        """
        if num_samples is not None:
            warnings.warn("log_likelihood(num_samples=...) is deprecated: the test estimate's K is `iwae_samples`.",
                          DeprecationWarning, stacklevel=2)
            iwae_samples = num_samples
        x = self._unpack(x)
        if x.shape[0] == 0:
            return tf.zeros([0], tf.float32)  # TFP's sampling fails on an empty batch
        if tf.executing_eagerly():  # one compiled graph per (K, chunk) instead of eager sampling op by op
            if self._log_likelihood_fn is None:
                self._log_likelihood_fn = tf.function(self._log_likelihood, reduce_retracing=True)
            return self._log_likelihood_fn(x, iwae_samples, chunk_size)
        return self._log_likelihood(x, iwae_samples, chunk_size)

    def _log_likelihood(self, x, iwae_samples, chunk_size):
        q = self.proposal(x)

        def log_importance_weights(size):  # [C, B]
            z = q.sample(size)
            return self.decoder(z).log_prob(x[None]) + standard_normal_log_prob(z) - q.log_prob(z)

        return objectives.importance_weighted_log_likelihood(log_importance_weights, iwae_samples, chunk_size)

    # ------------------------------------------------------------------ serialization
    def get_config(self):
        config = super().get_config()
        config.update(
            encoder=keras.saving.serialize_keras_object(self.encoder),
            decoder=keras.saving.serialize_keras_object(self.decoder),
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
        config["decoder"] = keras.saving.deserialize_keras_object(config["decoder"])
        return cls(**config)
