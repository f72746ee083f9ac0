"""Decoders `p(x | z)`: Keras layers that map latents `[..., D]` to TFP image distributions.

Each decoder splits "network makes parameters" (`compute_parameters`) from "parameters make a distribution"
(`make_distribution`, a static method), as TFP's own distribution layers do.
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tf_rmvae.choices import ARCHITECTURES
from tf_rmvae.config import DEFAULTS

tfd = tfp.distributions



class ImageDecoder(keras.layers.Layer):
    """Shared trunk of the image decoders: latents `[..., D]` -> per-pixel parameters `[..., H, W, C * P]`.

    Args:
      image_shape: `(H, W, C)` of the data.
      architecture: "dense" (MLP) or "conv" (dense to `[H/4, W/4, F0]`, two stride-2 transposed convolutions, then a
        3x3 convolution to the output channels; H and W must be divisible by 4).
      hidden_units: dense layer widths ("dense") or the width of the first dense layer ("conv").
      conv_filters: filters of the two transposed convolutions ("conv").
      activation: hidden activation.

    The architecture, widths and filters default to the configuration's (`config.DEFAULTS`; the filters mirror the
    encoder's, as `factory.build_networks` mirrors them).
    """

    params_per_pixel = 1

    def __init__(
        self,
        image_shape: Sequence[int],
        architecture: str = DEFAULTS.architecture,
        hidden_units: Sequence[int] = DEFAULTS.hidden_units,
        conv_filters: Sequence[int] = tuple(reversed(DEFAULTS.conv_filters)),
        activation: str = "relu",
        **kwargs,
    ):
        super().__init__(**kwargs)
        image_shape = tuple(int(d) for d in image_shape)
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (H, W, C) with positive sizes; got {image_shape}.")
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}; got {architecture!r}.")
        if architecture == "conv" and (image_shape[0] % 4 or image_shape[1] % 4):
            raise ValueError(f"architecture='conv' needs H and W divisible by 4; got {image_shape}.")
        if architecture == "conv" and len(conv_filters) != 2:
            raise ValueError(f"conv_filters must have 2 entries for the conv decoder; got {conv_filters}.")
        self.image_shape = image_shape
        self.architecture = architecture
        self.hidden_units = tuple(int(u) for u in hidden_units)
        self.conv_filters = tuple(int(f) for f in conv_filters)
        self._activation_name = activation if isinstance(activation, str) else keras.activations.serialize(activation)
        height, width, channels = image_shape
        out_channels = channels * self.params_per_pixel
        if architecture == "dense":
            self.hidden = [keras.layers.Dense(u, activation=activation) for u in self.hidden_units]
            self.head = keras.layers.Dense(height * width * out_channels)
        else:
            f0, f1 = self.conv_filters
            self.hidden = [keras.layers.Dense(u, activation=activation) for u in self.hidden_units] + [
                keras.layers.Dense((height // 4) * (width // 4) * f0, activation=activation),
                keras.layers.Reshape((height // 4, width // 4, f0)),
                keras.layers.Conv2DTranspose(f0, 3, strides=2, padding="same", activation=activation),
                keras.layers.Conv2DTranspose(f1, 3, strides=2, padding="same", activation=activation),
            ]
            self.head = keras.layers.Conv2D(out_channels, 3, padding="same")

    def build(self, input_shape):
        shape = (None, int(input_shape[-1]))
        for layer in self.hidden:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
        self.head.build(shape)

    def compute_parameters(self, z):
        """`z [..., D]` -> `[..., H, W, C * params_per_pixel]` in float32."""
        z = tf.convert_to_tensor(z)
        leading = tf.shape(z)[:-1]
        h = tf.reshape(z, [-1, int(z.shape[-1])])
        for layer in self.hidden:
            h = layer(h)
        h = self.head(h)
        height, width, channels = self.image_shape
        out_shape = tf.concat([leading, [height, width, channels * self.params_per_pixel]], axis=0)
        return tf.cast(tf.reshape(h, out_shape), tf.float32)

    def call(self, z):
        return self.make_distribution(self.compute_parameters(z))

    def get_config(self):
        config = super().get_config()
        config.update(
            image_shape=list(self.image_shape),
            architecture=self.architecture,
            hidden_units=list(self.hidden_units),
            conv_filters=list(self.conv_filters),
            activation=self._activation_name,
        )
        return config


@keras.saving.register_keras_serializable(package="tf_rmvae")
class BernoulliDecoder(ImageDecoder):
    """`p(x | z) = prod_pixels Bernoulli(logits)` for binarized images; `call(z [..., D])` returns
    `Independent(Bernoulli)` with batch shape `[...]` and event shape `[H, W, C]`. Its `mean()` is the image."""

    @staticmethod
    def make_distribution(logits):
        return tfd.Independent(tfd.Bernoulli(logits=logits, dtype=tf.float32), reinterpreted_batch_ndims=3)


@keras.saving.register_keras_serializable(package="tf_rmvae")
class GaussianDecoder(ImageDecoder):
    """`p(x | z) = prod_pixels Normal(sigmoid(a), softplus(b) + min_scale)` for continuous images in [0, 1]
    (SVHN, CelebA). Note: densities of continuous data are not comparable with Bernoulli log-likelihoods."""

    params_per_pixel = 2
    min_scale = 1e-3

    @staticmethod
    def make_distribution(params):
        raw_loc, raw_scale = tf.split(params, 2, axis=-1)
        return tfd.Independent(
            tfd.Normal(loc=tf.sigmoid(raw_loc), scale=tf.nn.softplus(raw_scale) + GaussianDecoder.min_scale),
            reinterpreted_batch_ndims=3,
        )


DECODERS = {"bernoulli": BernoulliDecoder, "gaussian": GaussianDecoder}


def make_decoder(likelihood: str, image_shape, **kwargs) -> ImageDecoder:
    """Decoder by likelihood name ("bernoulli" or "gaussian")."""
    if likelihood not in DECODERS:
        raise ValueError(f"likelihood must be one of {sorted(DECODERS)}; got {likelihood!r}.")
    return DECODERS[likelihood](image_shape, **kwargs)
