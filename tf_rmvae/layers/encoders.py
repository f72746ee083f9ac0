"""Encoders that emit TFP distributions: `RecursiveMixtureEncoder` (the recursive mixture posterior) and
`GaussianEncoder` (one Gaussian, e.g. for SA-VAE).

Both run their networks as `ComponentNetworks` (batched `[M, ...]` weights, one pass for all components); the
mixture encoder adds `RecursiveMixingWeights` (the proportions and the count of active components). The number
of active components is a variable, so activating a component changes values, never shapes or traces.
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tf_rmvae.choices import uses_shared_trunk
from tf_rmvae.config import DEFAULTS
from tf_rmvae.layers.component_networks import ARCHITECTURES, ComponentNetworks
from tf_rmvae.layers.mixing_weights import RecursiveMixingWeights

tfd = tfp.distributions

__all__ = ["ARCHITECTURES", "GaussianEncoder", "RecursiveMixtureEncoder", "make_mixture"]

OUTPUT_MODES = ("distribution", "parameters")
NEW_COMPONENT_INITS = ("copy", "random")
# The offset head's initialiser seed is the encoder's seed plus this, apart from the networks' `seed + i`.
OFFSET_HEAD_SEED_OFFSET = 10_000
# Arguments that an encoder config saved before the defaults were the configuration's (`config.DEFAULTS`) may lack,
# with the behaviour of then: M independent networks.
LEGACY_ARGUMENTS = {"shared_trunk": False}


def build_eagerly(layer: keras.layers.Layer, input_shape) -> None:
    """Builds `layer` for `input_shape` once, as `__call__` would; eagerly, so also from inside a traced function."""
    if not layer.built:
        with tf.init_scope():
            layer.build(tuple(input_shape))
        layer._build_shapes_dict = {"input_shape": tuple(input_shape)}
        layer.built = True


def make_mixture(
    log_weights: tf.Tensor, loc: tf.Tensor, scale: tf.Tensor, reparameterize: bool = True
) -> tfd.MixtureSameFamily:
    """Builds the mixture posterior from tensors (the inverse of `output_mode="parameters"`).

    Args:
      log_weights: `[B, M]` (or `[M]`) mixture log-weights; inactive slots are `mixing.INACTIVE_LOG_WEIGHT`.
      loc, scale: `[B, M, D]` component means and standard deviations.

    Returns:
      `MixtureSameFamily` with batch shape `[B]`, event shape `[D]`, `Independent(Normal)` components and
      `reparameterize=True` (so `sample()` carries gradients into `loc`, `scale` and the weights; pass False
      for evaluation, where TFP's implicit reparameterisation gradient machinery only costs time).
    """
    return tfd.MixtureSameFamily(
        mixture_distribution=tfd.Categorical(logits=log_weights),
        components_distribution=tfd.Independent(
            tfd.Normal(loc=loc, scale=scale), reinterpreted_batch_ndims=1),
        reparameterize=reparameterize,
    )


@keras.saving.register_keras_serializable(package="tf_rmvae")
class RecursiveMixtureEncoder(keras.layers.Layer):
    """Mixture-of-Gaussians encoder `q(z|x) = sum_m w_m N(mu_m(x), diag sigma_m(x)^2)` with recursive weights.

    Weights follow `q_m = (1 - eps_m) q_{m-1} + eps_m h_m` (see `tf_rmvae.mixing`); only the first
    `num_active_components` slots have non-zero weight. The networks are a `ComponentNetworks` layer
    (`networks`), the recursion state a `RecursiveMixingWeights` layer (`mixing`).

    Example (inside any Keras VAE; `tf_rmvae.models.recursion.RecursiveMixtureTrainer` trains it by RME):

        encoder = RecursiveMixtureEncoder(latent_dim=32, max_components=4)   # 4 heads on one trunk
        q = encoder(images)          # MixtureSameFamily, batch [B], event [32]
        z = q.sample()               # [B, 32], reparameterised
        kl_mc = q.log_prob(z) - prior.log_prob(z)

    The defaults of the networks are the recommended model's (`config.DEFAULTS`): D = 32, three heads on one
    200-200 dense trunk.

    Args:
      latent_dim: D.
      max_components: M >= 1 component slots (fixed shapes).
      architecture: "dense" (MLP on flattened inputs) or "conv" (stride-2 3x3 convolutions, then dense layers;
        inputs `[B, H, W, C]`).
      hidden_units: dense layer widths (after the convolutions for "conv").
      conv_filters: filters of each stride-2 convolution ("conv" only).
      activation: hidden activation.
      shared_trunk: if True (default), one trunk feeds M per-component heads (fewer parameters; with stage-wise
        training earlier components are then no longer exactly frozen). False: M independent networks. With one
        component, one network either way (`shared_trunk` then reads False).
      min_scale: floor added to the softplus scale.
      initial_active_components: active components at construction (1 for RME; M for a jointly trained
        mixture).
      learn_mixing_proportions: whether `mixing_logits` is trainable (True for a jointly trained mixture; RME
        sets proportions by line search instead). A training method may override both (`configure_mixing`).
      new_component_init: "copy" (default: `add_component` starts the new component as a copy of the newest
        one plus relative noise `init_noise`) or "random" (keep its own random initialisation).
      init_noise: relative standard deviation of the noise added to a copied component.
      output_mode: "distribution" (default, returns the `MixtureSameFamily`) or "parameters" (returns the
        tensors `(log_weights [B, M], loc [B, M, D], scale [B, M, D])` for Keras functional models; rebuild
        the distribution with `make_mixture`).
      validate_inputs: check shapes and finiteness of inputs (clear errors instead of NaN posteriors).
      seed: seed for initialisers (the networks' and the per-example proportions' head) and the noise of copied
        components.
      per_example_proportions: per-example mixing proportions `eps_m(x)`: the shared logits plus a small
        amortized head's bounded offsets (see `RecursiveMixingWeights`), trained on the mixture's bound;
        default False (shared proportions, as in the paper).
    """

    def __init__(
        self,
        latent_dim: int = DEFAULTS.latent_dim,
        max_components: int = DEFAULTS.num_components,
        architecture: str = DEFAULTS.architecture,
        hidden_units: Sequence[int] = DEFAULTS.hidden_units,
        conv_filters: Sequence[int] = DEFAULTS.conv_filters,
        activation: str = "relu",
        shared_trunk: bool = DEFAULTS.shared_trunk,
        min_scale: float = 1e-4,
        initial_active_components: int = 1,
        learn_mixing_proportions: bool = False,
        new_component_init: str = "copy",
        init_noise: float = 0.1,
        output_mode: str = "distribution",
        validate_inputs: bool = True,
        seed: int | None = None,
        per_example_proportions: bool = DEFAULTS.per_example_proportions,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if int(max_components) < 1:
            raise ValueError(f"max_components must be >= 1; got {max_components}.")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}; got {output_mode!r}.")
        if new_component_init not in NEW_COMPONENT_INITS:
            raise ValueError(
                f"new_component_init must be one of {NEW_COMPONENT_INITS}; got {new_component_init!r}.")
        self.networks = ComponentNetworks(
            max_components, latent_dim, architecture=architecture, hidden_units=hidden_units,
            conv_filters=conv_filters, activation=activation, min_scale=min_scale,
            shared_trunk=uses_shared_trunk(shared_trunk, int(max_components)),
            validate_inputs=validate_inputs, seed=seed, dtype=self.dtype_policy, name="networks",
        )
        self.mixing = RecursiveMixingWeights(
            max_components, initial_active_components, learn_mixing_proportions,
            per_example=per_example_proportions, dtype=self.dtype_policy, name="mixing",
            seed=None if seed is None else int(seed) + OFFSET_HEAD_SEED_OFFSET,
        )
        self.new_component_init = new_component_init
        self.init_noise = float(init_noise)
        self.output_mode = output_mode

    # The settings held by the sub-layers, read where they live (`networks`, `mixing`).
    latent_dim = property(lambda self: self.networks.latent_dim)
    max_components = property(lambda self: self.networks.num_components)
    architecture = property(lambda self: self.networks.architecture)
    hidden_units = property(lambda self: self.networks.hidden_units)
    conv_filters = property(lambda self: self.networks.conv_filters)
    shared_trunk = property(lambda self: self.networks.shared_trunk)
    min_scale = property(lambda self: self.networks.min_scale)
    validate_inputs = property(lambda self: self.networks.validate_inputs)
    seed = property(lambda self: self.networks.seed)
    initial_active_components = property(lambda self: self.mixing.initial_active_components)
    learn_mixing_proportions = property(lambda self: self.mixing.learn_mixing_proportions)
    per_example_proportions = property(lambda self: self.mixing.per_example)

    # ------------------------------------------------------------------ construction
    def build(self, input_shape):
        # The networks' variables first, as before (unseeded initialisers draw their seeds in creation order).
        self.networks.build(tuple(input_shape))
        self.mixing.build(tuple(input_shape))

    def ensure_built(self, input_shape) -> None:
        """Builds the layer for `input_shape` if needed (methods other than `__call__` may come first)."""
        build_eagerly(self, input_shape)

    def configure_mixing(self, *, all_active: bool, learn_proportions: bool) -> None:
        """Sets how a training method uses the mixing weights (see `RecursiveMixingWeights.configure`): all M
        components active from the start (else as constructed), proportions learned by gradient (else set by
        `add_component`, `set_mixing_proportion` or a line search). Works before and after the build."""
        self.mixing.configure(all_active=all_active, learn_proportions=learn_proportions)

    @property
    def mixing_logits(self):
        """`[M]` variable: logits of the mixing proportions eps_m (slot 0 ignored)."""
        return self.mixing.mixing_logits

    @property
    def num_active_components(self):
        """int32 scalar variable: the number of active component slots."""
        return self.mixing.num_active_components

    @property
    def component_variables(self) -> list:
        """Variables with a leading component axis `[M, ...]` (one slice per component network)."""
        return self.networks.component_variables

    # ------------------------------------------------------------------ forward pass
    def mixture_log_weights(self) -> tf.Tensor:
        """`[M]` current log-weights (inactive slots at `mixing.INACTIVE_LOG_WEIGHT`)."""
        return self.mixing.log_weights()

    def compute_parameters(self, x, return_logit_offsets: bool = False):
        """`x [B, ...]` -> `(log_weights [B, M], loc [B, M, D], scale [B, M, D])`, and the per-example logit
        offsets `[B, M]` (zeros for shared proportions) if `return_logit_offsets`."""
        x = tf.cast(tf.convert_to_tensor(x), self.compute_dtype)
        self.ensure_built(x.shape)
        loc, scale = self.networks.compute_parameters(x)
        if self.per_example_proportions:
            offsets = self.mixing.logit_offsets(x)
            log_weights = self.mixing.log_weights(offsets)
        else:
            offsets = None
            log_weights = tf.broadcast_to(self.mixture_log_weights(), tf.shape(loc)[:2])
        if not return_logit_offsets:
            return log_weights, loc, scale
        return log_weights, loc, scale, tf.zeros(tf.shape(loc)[:2]) if offsets is None else offsets

    def call(self, inputs):
        params = self.compute_parameters(inputs)
        if self.output_mode == "parameters":
            return params
        return make_mixture(*params)

    def compute_output_spec(self, inputs):
        if self.output_mode != "parameters":
            raise ValueError(
                "A layer that returns a distribution cannot be used on symbolic Keras tensors (functional "
                "API). Use RecursiveMixtureEncoder(..., output_mode='parameters') and "
                "tf_rmvae.make_mixture(*outputs)."
            )
        batch = inputs.shape[0]
        m, d = self.max_components, self.latent_dim
        return (
            keras.KerasTensor((batch, m), dtype="float32"),
            keras.KerasTensor((batch, m, d), dtype="float32"),
            keras.KerasTensor((batch, m, d), dtype="float32"),
        )

    # ------------------------------------------------------------------ recursion
    def add_component(self, mixing_proportion: float = 0.0) -> int:
        """Activates the next component slot (eagerly, between training steps); returns the new active count.

        The new component starts as a copy of the newest active one plus relative noise (`new_component_init=
        "copy"`) or from its own random initialisation ("random"). Its proportion eps starts at
        `mixing_proportion` (default 0: the mixture, and hence the ELBO, is unchanged until a line search or
        the optimizer moves eps). Raises `ValueError` when all `max_components` are active.
        """
        if not self.built:
            raise RuntimeError(f"{self.name}: build the encoder (call it once) before adding components.")
        active = self.mixing.active_count()
        if active >= self.max_components:
            raise ValueError(
                f"{self.name}: all max_components={self.max_components} components are already active; "
                "construct the encoder with a larger max_components to add more."
            )
        if self.new_component_init == "copy":
            seed = None if self.seed is None else [int(self.seed), active]
            self.networks.copy_component(active - 1, active, self.init_noise, seed)
        return self.mixing.activate_next(mixing_proportion)

    def set_mixing_proportion(self, index: int, mixing_proportion: float) -> None:
        """Sets eps of component slot `index` (>= 1)."""
        self.mixing.set_mixing_proportion(index, mixing_proportion)

    def get_config(self):
        config = super().get_config()
        networks, mixing_weights = self.networks.get_config(), self.mixing.get_config()
        config.update({key: networks[key] for key in (
            "latent_dim", "architecture", "hidden_units", "conv_filters", "activation", "shared_trunk", "min_scale",
            "validate_inputs", "seed")})
        config.update(
            max_components=networks["num_components"],
            initial_active_components=mixing_weights["initial_active_components"],
            learn_mixing_proportions=mixing_weights["learn_mixing_proportions"],
            per_example_proportions=mixing_weights["per_example"],
            new_component_init=self.new_component_init,
            init_noise=self.init_noise,
            output_mode=self.output_mode,
        )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**{**LEGACY_ARGUMENTS, **config})


@keras.saving.register_keras_serializable(package="tf_rmvae")
class GaussianEncoder(keras.layers.Layer):
    """Gaussian encoder `q(z|x) = N(mu(x), diag sigma(x)^2)`: one network of `ComponentNetworks`.

    With the same arguments and seed its weights equal those of a one-component `RecursiveMixtureEncoder`.

    Example:

        encoder = GaussianEncoder(latent_dim=32, hidden_units=(200, 200), seed=0)
        q = encoder(images)                        # Independent(Normal), batch [B], event [32]
        loc, scale = encoder.compute_parameters(images)   # [B, 32] each

    Args:
      latent_dim, architecture, hidden_units, conv_filters, activation, min_scale, validate_inputs, seed: as
        for `RecursiveMixtureEncoder`.
    """

    def __init__(
        self,
        latent_dim: int = DEFAULTS.latent_dim,
        architecture: str = DEFAULTS.architecture,
        hidden_units: Sequence[int] = DEFAULTS.hidden_units,
        conv_filters: Sequence[int] = DEFAULTS.conv_filters,
        activation: str = "relu",
        min_scale: float = 1e-4,
        validate_inputs: bool = True,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.networks = ComponentNetworks(
            1, latent_dim, architecture=architecture, hidden_units=hidden_units, conv_filters=conv_filters,
            activation=activation, min_scale=min_scale, validate_inputs=validate_inputs, seed=seed,
            dtype=self.dtype_policy, name="networks",
        )
        self.latent_dim = self.networks.latent_dim
        self.architecture = architecture
        self.seed = seed

    def build(self, input_shape):
        self.networks.build(tuple(input_shape))

    def ensure_built(self, input_shape) -> None:
        """Builds the layer for `input_shape` if needed (methods other than `__call__` may come first)."""
        build_eagerly(self, input_shape)

    def compute_parameters(self, x):
        """`x [B, ...]` -> `(loc [B, D], scale [B, D])`."""
        x = tf.cast(tf.convert_to_tensor(x), self.compute_dtype)
        self.ensure_built(x.shape)
        loc, scale = self.networks.compute_parameters(x)
        return loc[:, 0], scale[:, 0]

    def call(self, inputs):
        loc, scale = self.compute_parameters(inputs)
        return tfd.Independent(tfd.Normal(loc, scale), reinterpreted_batch_ndims=1)

    def compute_output_spec(self, inputs):
        raise ValueError(
            "A layer that returns a distribution cannot be used on symbolic Keras tensors (functional API); "
            "call GaussianEncoder.compute_parameters in a custom layer instead."
        )

    def get_config(self):
        config = super().get_config()
        networks = self.networks.get_config()
        config.update({key: networks[key] for key in (
            "latent_dim", "architecture", "hidden_units", "conv_filters", "activation", "min_scale",
            "validate_inputs", "seed")})
        return config
