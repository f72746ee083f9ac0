"""`RecursiveMixtureEncoder`: a Keras layer that emits the recursive mixture posterior as a TFP distribution.

All `max_components` component networks live in batched weights with a leading component axis `M` and run in one
pass (batched matmuls for dense layers, grouped convolution for conv layers): no Python loop over components at run time.
The number of active components is a variable, so activating a component changes values, never shapes or traces.
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tf_rmvae import mixing

tfd = tfp.distributions

ARCHITECTURES = ("dense", "conv")
OUTPUT_MODES = ("distribution", "parameters")
NEW_COMPONENT_INITS = ("copy", "random")


def make_mixture(
    log_weights: tf.Tensor, loc: tf.Tensor, scale: tf.Tensor, reparameterize: bool = True
) -> tfd.MixtureSameFamily:
    """Builds the mixture posterior from tensors (the inverse of `output_mode="parameters"`).

    Args:
      log_weights: `[B, M]` (or `[M]`) mixture log-weights; inactive slots are `mixing.INACTIVE_LOG_WEIGHT`.
      loc, scale: `[B, M, D]` component means and standard deviations.

    Returns:
      `MixtureSameFamily` with batch shape `[B]`, event shape `[D]`, `Independent(Normal)` components and
      `reparameterize=True` (so `sample()` carries gradients into `loc`, `scale` and the weights; pass False for
      evaluation, where TFP's implicit reparameterisation gradient machinery only costs time).
    """
    return tfd.MixtureSameFamily(
        mixture_distribution=tfd.Categorical(logits=log_weights),
        components_distribution=tfd.Independent(tfd.Normal(loc=loc, scale=scale), reinterpreted_batch_ndims=1),
        reparameterize=reparameterize,
    )


def _uniform_init(fan_in: int, fan_out: int, seed):
    """Glorot-uniform limits from the per-component fans (Keras's own would count the component axis as fan)."""
    limit = float(np.sqrt(6.0 / (fan_in + fan_out)))
    return keras.initializers.RandomUniform(-limit, limit, seed=seed)


@keras.saving.register_keras_serializable(package="tf_rmvae")
class RecursiveMixtureEncoder(keras.layers.Layer):
    """Mixture-of-Gaussians encoder `q(z|x) = sum_m w_m N(mu_m(x), diag sigma_m(x)^2)` with recursive weights.

    Weights follow `q_m = (1 - eps_m) q_{m-1} + eps_m h_m` (see `tf_rmvae.mixing`); only the first
    `num_active_components` slots have non-zero weight.

    Example (inside any Keras VAE):

        encoder = RecursiveMixtureEncoder(latent_dim=32, max_components=4)
        q = encoder(images)          # MixtureSameFamily, batch [B], event [32]
        z = q.sample()               # [B, 32], reparameterised
        kl_mc = q.log_prob(z) - prior.log_prob(z)

    Args:
      latent_dim: D.
      max_components: M >= 1 component slots (fixed shapes).
      architecture: "dense" (MLP on flattened inputs) or "conv" (stride-2 3x3 convolutions, then dense layers;
        inputs `[B, H, W, C]`).
      hidden_units: dense layer widths (after the convolutions for "conv").
      conv_filters: filters of each stride-2 convolution ("conv" only).
      activation: hidden activation.
      shared_trunk: if True, one trunk feeds M per-component heads (fewer parameters; with stage-wise training
        earlier components are then no longer exactly frozen). Default False: M independent networks.
      min_scale: floor added to the softplus scale.
      initial_active_components: active components at construction (1 for RME; M for a jointly trained mixture).
      learn_mixing_proportions: whether `mixing_logits` is trainable (True for a jointly trained mixture; RME sets
        proportions by line search instead).
      new_component_init: "copy" (default: `add_component` starts the new component as a copy of the newest one
        plus relative noise `init_noise`) or "random" (keep its own random initialisation).
      init_noise: relative standard deviation of the noise added to a copied component.
      output_mode: "distribution" (default, returns the `MixtureSameFamily`) or "parameters" (returns the tensors
        `(log_weights [B, M], loc [B, M, D], scale [B, M, D])` for Keras functional models; rebuild the
        distribution with `make_mixture`).
      validate_inputs: check shapes and finiteness of inputs (clear errors instead of NaN posteriors).
      seed: seed for initialisers and the noise of copied components.
    """

    def __init__(
        self,
        latent_dim: int,
        max_components: int,
        architecture: str = "dense",
        hidden_units: Sequence[int] = (500, 500),
        conv_filters: Sequence[int] = (32, 64),
        activation: str = "relu",
        shared_trunk: bool = False,
        min_scale: float = 1e-4,
        initial_active_components: int = 1,
        learn_mixing_proportions: bool = False,
        new_component_init: str = "copy",
        init_noise: float = 0.1,
        output_mode: str = "distribution",
        validate_inputs: bool = True,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if int(latent_dim) < 1:
            raise ValueError(f"latent_dim must be >= 1; got {latent_dim}.")
        if int(max_components) < 1:
            raise ValueError(f"max_components must be >= 1; got {max_components}.")
        if not 1 <= int(initial_active_components) <= int(max_components):
            raise ValueError(
                f"initial_active_components must lie in [1, max_components={max_components}]; "
                f"got {initial_active_components}."
            )
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}; got {architecture!r}.")
        if output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {OUTPUT_MODES}; got {output_mode!r}.")
        if new_component_init not in NEW_COMPONENT_INITS:
            raise ValueError(f"new_component_init must be one of {NEW_COMPONENT_INITS}; got {new_component_init!r}.")
        if min_scale <= 0:
            raise ValueError(f"min_scale must be > 0; got {min_scale}.")
        self.latent_dim = int(latent_dim)
        self.max_components = int(max_components)
        self.architecture = architecture
        self.hidden_units = tuple(int(u) for u in hidden_units)
        self.conv_filters = tuple(int(f) for f in conv_filters)
        self.activation = keras.activations.get(activation)
        self._activation_name = activation if isinstance(activation, str) else keras.activations.serialize(activation)
        self.shared_trunk = bool(shared_trunk)
        self.min_scale = float(min_scale)
        self.initial_active_components = int(initial_active_components)
        self.learn_mixing_proportions = bool(learn_mixing_proportions)
        self.new_component_init = new_component_init
        self.init_noise = float(init_noise)
        self.output_mode = output_mode
        self.validate_inputs = bool(validate_inputs)
        self.seed = seed
        self._input_feature_shape = None

    # ------------------------------------------------------------------ construction
    def _seed(self, offset: int):
        return None if self.seed is None else int(self.seed) + offset

    def _component_weight(self, name: str, shape, fan_in: int, fan_out: int, offset: int, per_component: bool):
        full_shape = ((self.max_components,) if per_component else ()) + tuple(shape)
        # aggregation="mean": stage-wise training restores frozen slices with an assign in replica context.
        return self.add_weight(
            name=name, shape=full_shape, initializer=_uniform_init(fan_in, fan_out, self._seed(offset)),
            aggregation="mean",
        )

    def _bias(self, name: str, size: int, per_component: bool):
        shape = (self.max_components, size) if per_component else (size,)
        return self.add_weight(name=name, shape=shape, initializer="zeros", aggregation="mean")

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) < 2:
            raise ValueError(f"RecursiveMixtureEncoder needs inputs of rank >= 2 ([B, ...]); got shape {input_shape}.")
        if any(d is None for d in input_shape[1:]):
            raise ValueError(f"All non-batch input dimensions must be known; got {input_shape}.")
        if self.architecture == "conv" and len(input_shape) != 4:
            raise ValueError(f"architecture='conv' needs images [B, H, W, C]; got shape {input_shape}.")
        self._input_feature_shape = tuple(int(d) for d in input_shape[1:])
        per = not self.shared_trunk
        offset = 0
        self.conv_kernels, self.conv_biases = [], []
        if self.architecture == "conv":
            height, width, channels = self._input_feature_shape
            for i, filters in enumerate(self.conv_filters):
                self.conv_kernels.append(
                    self._component_weight(
                        f"conv{i}_kernel", (3, 3, channels, filters), 9 * channels, 9 * filters, offset, per
                    )
                )
                self.conv_biases.append(self._bias(f"conv{i}_bias", filters, per))
                offset += 1
                height, width, channels = -(-height // 2), -(-width // 2), filters
            features = height * width * channels
        else:
            features = int(np.prod(self._input_feature_shape))
        self.dense_kernels, self.dense_biases = [], []
        for i, units in enumerate(self.hidden_units):
            self.dense_kernels.append(
                self._component_weight(f"dense{i}_kernel", (features, units), features, units, offset, per)
            )
            self.dense_biases.append(self._bias(f"dense{i}_bias", units, per))
            offset += 1
            features = units
        d = self.latent_dim
        self.loc_kernel = self._component_weight("loc_kernel", (features, d), features, d, offset, True)
        self.loc_bias = self._bias("loc_bias", d, True)
        self.scale_kernel = self._component_weight("scale_kernel", (features, d), features, d, offset + 1, True)
        self.scale_bias = self._bias("scale_bias", d, True)
        self.mixing_logits = self.add_weight(
            name="mixing_logits",
            shape=(self.max_components,),
            initializer=lambda shape, dtype=None: tf.constant(mixing.uniform_mixing_logits(shape[0])),
            trainable=self.learn_mixing_proportions,
            autocast=False,  # the weights stay float32 under a mixed-precision policy
            aggregation="only_first_replica",
        )
        self.num_active_components = self.add_weight(
            name="num_active_components",
            shape=(),
            dtype="int32",
            initializer=keras.initializers.Constant(self.initial_active_components),
            trainable=False,
            aggregation="only_first_replica",
        )

    def ensure_built(self, input_shape) -> None:
        """Builds the layer for `input_shape` if needed (for direct calls of methods other than `__call__`)."""
        if not self.built:
            with tf.init_scope():
                self.build(tuple(input_shape))
            self._build_shapes_dict = {"input_shape": tuple(input_shape)}
            self.built = True

    @property
    def component_variables(self) -> list:
        """Variables with a leading component axis `[M, ...]` (one slice per component network)."""
        trunk = [] if self.shared_trunk else self.conv_kernels + self.conv_biases + self.dense_kernels + self.dense_biases
        return trunk + [self.loc_kernel, self.loc_bias, self.scale_kernel, self.scale_bias]

    # ------------------------------------------------------------------ forward pass
    def _check_inputs(self, x):
        shape = tuple(x.shape)
        expected = self._input_feature_shape
        if len(shape) != len(expected) + 1 or any(
            s is not None and s != e for s, e in zip(shape[1:], expected)
        ):
            raise ValueError(
                f"{self.name}: expected inputs of shape (batch,) + {expected}, got {shape}."
            )
        if not self.validate_inputs:
            return x
        if tf.executing_eagerly():
            if not bool(tf.reduce_all(tf.math.is_finite(x))):
                raise ValueError(f"{self.name}: inputs contain NaN or Inf values.")
            return x
        return tf.debugging.assert_all_finite(x, f"{self.name}: inputs contain NaN or Inf values.")

    def _param(self, variable):
        """A variable's value in the compute dtype (explicit: methods other than `__call__` get no autocast)."""
        return tf.cast(tf.convert_to_tensor(variable), self.compute_dtype)

    def _trunk(self, x):
        """`[B, ...]` -> features `[M, B, F]` (independent trunks) or `[B, F]` (shared trunk)."""
        act = self.activation
        per = not self.shared_trunk
        m = self.max_components
        h = x
        if self.architecture == "conv":
            kernels = [self._param(k) for k in self.conv_kernels]
            biases = [self._param(b) for b in self.conv_biases]

            def convolutions(h, component=None):  # [B, H, W, C] -> [B, h*w*F]
                for kernel, bias in zip(kernels, biases):
                    if component is not None:
                        kernel, bias = kernel[component], bias[component]
                    h = act(tf.nn.conv2d(h, kernel, strides=2, padding="SAME") + bias)
                return tf.reshape(h, [tf.shape(h)[0], int(np.prod(h.shape[1:]))])

            # One convolution stack per component, not one grouped convolution: TensorFlow has no CPU gradient for
            # grouped convolutions ("Gradients for grouped convolutions are not supported on CPU").
            h = tf.stack([convolutions(h, c) for c in range(m)]) if per else convolutions(h)  # [M, B, F] / [B, F]
        else:
            h = tf.reshape(h, [tf.shape(h)[0], int(np.prod(self._input_feature_shape))])
        for kernel, bias in zip(self.dense_kernels, self.dense_biases):
            kernel, bias = self._param(kernel), self._param(bias)
            if per:  # batched matmul: [1 or M, B, I] x [M, I, O] -> [M, B, O] (cheaper than einsum's transposes)
                h = act(tf.matmul(h if h.shape.rank == 3 else h[None], kernel) + bias[:, None, :])
            else:
                h = act(tf.matmul(h, kernel) + bias)
        return h

    def mixture_log_weights(self) -> tf.Tensor:
        """`[M]` current log-weights (inactive slots at `mixing.INACTIVE_LOG_WEIGHT`)."""
        return mixing.recursive_log_weights(self.mixing_logits, self.num_active_components)

    def compute_parameters(self, x):
        """`x [B, ...]` -> `(log_weights [B, M], loc [B, M, D], scale [B, M, D])`."""
        x = tf.cast(tf.convert_to_tensor(x), self.compute_dtype)
        self.ensure_built(x.shape)
        x = self._check_inputs(x)
        features = self._trunk(x)
        if features.shape.rank == 2:
            features = features[None]  # shared trunk: broadcast over the M heads

        def head(kernel, bias):  # [M, B, F] x [M, F, D] -> [B, M, D]
            out = tf.matmul(features, self._param(kernel)) + self._param(bias)[:, None, :]
            return tf.transpose(out, [1, 0, 2])

        loc = head(self.loc_kernel, self.loc_bias)
        raw_scale = head(self.scale_kernel, self.scale_bias)
        # Distributions are computed in float32 even under a mixed-precision policy.
        loc = tf.cast(loc, tf.float32)
        scale = tf.nn.softplus(tf.cast(raw_scale, tf.float32)) + self.min_scale
        log_weights = tf.broadcast_to(self.mixture_log_weights(), tf.shape(loc)[:2])
        return log_weights, loc, scale

    def call(self, inputs):
        params = self.compute_parameters(inputs)
        if self.output_mode == "parameters":
            return params
        return make_mixture(*params)

    def compute_output_spec(self, inputs):
        if self.output_mode != "parameters":
            raise ValueError(
                "A layer that returns a distribution cannot be used on symbolic Keras tensors (functional API). "
                "Use RecursiveMixtureEncoder(..., output_mode='parameters') and tf_rmvae.make_mixture(*outputs)."
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
        `mixing_proportion` (default 0: the mixture, and hence the ELBO, is unchanged until a line search or the
        optimizer moves eps). Raises `ValueError` when all `max_components` are active.
        """
        if not self.built:
            raise RuntimeError(f"{self.name}: build the encoder (call it once) before adding components.")
        active = int(keras.ops.convert_to_numpy(self.num_active_components))
        if active >= self.max_components:
            raise ValueError(
                f"{self.name}: all max_components={self.max_components} components are already active; "
                "construct the encoder with a larger max_components to add more."
            )
        if self.new_component_init == "copy":
            rng = np.random.default_rng(None if self.seed is None else [int(self.seed), active])
            for variable in self.component_variables:
                values = keras.ops.convert_to_numpy(variable)
                source = values[active - 1]
                noise = rng.standard_normal(source.shape) * self.init_noise * (np.std(source) + 1e-8)
                values[active] = source + noise.astype(values.dtype)
                variable.assign(values)
        logits = keras.ops.convert_to_numpy(self.mixing_logits).copy()
        logits[active] = mixing.eps_to_logit(mixing_proportion)
        self.mixing_logits.assign(logits)
        self.num_active_components.assign(active + 1)
        return active + 1

    def set_mixing_proportion(self, index: int, mixing_proportion: float) -> None:
        """Sets eps of component slot `index` (>= 1)."""
        if not 1 <= index < self.max_components:
            raise ValueError(f"index must lie in [1, {self.max_components - 1}]; got {index}.")
        logits = keras.ops.convert_to_numpy(self.mixing_logits).copy()
        logits[index] = mixing.eps_to_logit(mixing_proportion)
        self.mixing_logits.assign(logits)

    def get_config(self):
        config = super().get_config()
        config.update(
            latent_dim=self.latent_dim,
            max_components=self.max_components,
            architecture=self.architecture,
            hidden_units=list(self.hidden_units),
            conv_filters=list(self.conv_filters),
            activation=self._activation_name,
            shared_trunk=self.shared_trunk,
            min_scale=self.min_scale,
            initial_active_components=self.initial_active_components,
            learn_mixing_proportions=self.learn_mixing_proportions,
            new_component_init=self.new_component_init,
            init_noise=self.init_noise,
            output_mode=self.output_mode,
            validate_inputs=self.validate_inputs,
            seed=self.seed,
        )
        return config
