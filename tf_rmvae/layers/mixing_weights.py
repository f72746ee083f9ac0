"""`RecursiveMixingWeights`: the state of the recursive mixture `q_k = (1 - eps_k) q_{k-1} + eps_k h_k`.

The layer holds the proportions as logits `mixing_logits [M]` and the number of active components k; the
weights follow from them (`tf_rmvae.mixing.recursive_log_weights`). Activating a component changes values,
never shapes, so compiled steps are not retraced.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tf_rmvae import mixing

# Largest per-example logit offset: the line search's "eps = 0" (logit -30) plus it stays below logit -20,
# eps ~ 2e-9, so a component the search switched off stays off for every example.
MAX_OFFSET = 10.0


@keras.saving.register_keras_serializable(package="tf_rmvae")
class RecursiveMixingWeights(keras.layers.Layer):
    """Mixing proportions of `M` component slots and the count of active components.

    Weights `w_m = eps_m prod_{m < j < k} (1 - eps_j)` for the k active slots, exactly 0 for the others.

    Example:

        weights = RecursiveMixingWeights(max_components=3)
        weights.ensure_built()
        weights.activate_next(0.25)            # 2 active components
        tf.exp(weights.log_weights())          # [0.75, 0.25, 0.0]

    Per-example proportions (`per_example=True`): `logit eps_m(x) = mixing_logits[m] + offset_m(x)`, where a small
    head on the flattened input gives `offset(x) = max_offset * tanh(g(x))`, `[B, M]`. Its last layer starts at
    zero, so a new model's proportions are the shared ones; the bounded offset keeps eps = 0 reachable (the line
    search's eps = 0 is the logit -30, and -30 + `max_offset` still gives eps ~ 1e-11), so a joining component
    can still be switched off and cannot lower the bound.

    Args:
      max_components: M >= 1 slots.
      initial_active_components: active slots at construction, in [1, M].
      learn_mixing_proportions: whether `mixing_logits` is trainable.
      per_example: add the per-example offset head (trained on the mixture's bound).
      offset_units: hidden width of the offset head.
      max_offset: bound of each offset (logit units).
      seed: seed of the offset head's hidden-layer initialiser; None draws from Keras's global seed.
    """

    def __init__(
        self,
        max_components: int,
        initial_active_components: int = 1,
        learn_mixing_proportions: bool = False,
        per_example: bool = False,
        offset_units: int = 64,
        max_offset: float = 5.0,
        seed: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if int(max_components) < 1:
            raise ValueError(f"max_components must be >= 1; got {max_components}.")
        if not 1 <= int(initial_active_components) <= int(max_components):
            raise ValueError(
                f"initial_active_components must lie in [1, max_components={max_components}]; "
                f"got {initial_active_components}."
            )
        self.max_components = int(max_components)
        self.initial_active_components = int(initial_active_components)
        self.learn_mixing_proportions = bool(learn_mixing_proportions)
        if int(offset_units) < 1 or not 0 < float(max_offset) <= MAX_OFFSET:
            raise ValueError(
                f"Need offset_units >= 1 and 0 < max_offset <= {MAX_OFFSET}; got {offset_units}, {max_offset}.")
        self.per_example = bool(per_example)
        self.offset_units = int(offset_units)
        self.max_offset = float(max_offset)
        self.seed = seed
        self.offset_head = None
        # Set by `configure` (a training method's choice, not part of the config).
        self._all_active = False
        self._learned = self.learn_mixing_proportions

    def build(self, input_shape=None):
        """`input_shape`: the encoder's input shape `[B, ...]` (needed only with `per_example`)."""
        self.mixing_logits = self.add_weight(
            name="mixing_logits",
            shape=(self.max_components,),
            initializer=lambda shape, dtype=None: tf.constant(mixing.uniform_mixing_logits(shape[0])),
            trainable=self._learned,
            autocast=False,  # the weights stay float32 under a mixed-precision policy
            aggregation="only_first_replica",
        )
        active = self.max_components if self._all_active else self.initial_active_components
        self.num_active_components = self.add_weight(
            name="num_active_components",
            shape=(),
            dtype="int32",
            initializer=keras.initializers.Constant(active),
            trainable=False,
            aggregation="only_first_replica",
        )
        if self.per_example:  # created last: without it, every other variable is created as before
            if input_shape is None:
                raise ValueError(f"{self.name}: per-example proportions need the input shape to build.")
            features = int(np.prod(input_shape[1:]))
            self.offset_head = keras.Sequential([
                keras.layers.Dense(self.offset_units, activation="relu", name="hidden",
                                   kernel_initializer=keras.initializers.GlorotUniform(seed=self.seed)),
                keras.layers.Dense(self.max_components, kernel_initializer="zeros", name="offsets"),
            ], name="offset_head")
            self.offset_head.build((None, features))

    def ensure_built(self, input_shape=None) -> None:
        """Creates the variables if needed (also from inside a traced function: they are created eagerly)."""
        if not self.built:
            with tf.init_scope():
                self.build(input_shape)
            self.built = True

    def configure(self, *, all_active: bool, learn_proportions: bool) -> None:
        """How a training method uses the weights: all M slots active from the start (else as constructed),
        and proportions learned by gradient (else set explicitly, e.g. by a line search). Applies now if
        built, else when built; it is not part of the config (the model that trains the weights configures
        them again)."""
        self._all_active = bool(all_active)
        self._learned = bool(learn_proportions)
        if self.built:
            with tf.init_scope():  # may run inside a scratch graph (Keras's symbolic build)
                if self._all_active:
                    self.num_active_components.assign(self.max_components)
            self.mixing_logits.trainable = self._learned

    # ------------------------------------------------------------------ weights
    def log_weights(self, logit_offsets: tf.Tensor | None = None) -> tf.Tensor:
        """`[M]` current log-weights (inactive slots at `mixing.INACTIVE_LOG_WEIGHT`); `[B, M]` with
        per-example `logit_offsets [B, M]`."""
        logits = tf.convert_to_tensor(self.mixing_logits)
        if logit_offsets is not None:
            logits = logits + logit_offsets
        return mixing.recursive_log_weights(logits, self.num_active_components)

    def logit_offsets(self, x: tf.Tensor) -> tf.Tensor:
        """`[B, M]` per-example logit offsets for inputs `x [B, ...]` (per-example proportions only)."""
        if not self.per_example:
            raise ValueError(f"{self.name}: constructed without per-example proportions.")
        flat = tf.reshape(tf.cast(x, tf.float32), [tf.shape(x)[0], -1])
        return self.max_offset * tf.tanh(tf.cast(self.offset_head(flat), tf.float32))

    # ------------------------------------------------------------------ recursion
    def set_mixing_proportion(self, index: int, mixing_proportion: float) -> None:
        """Sets eps of slot `index` (>= 1)."""
        if not 1 <= index < self.max_components:
            raise ValueError(f"index must lie in [1, {self.max_components - 1}]; got {index}.")
        slot = tf.range(self.max_components)
        logit = tf.constant(mixing.eps_to_logit(mixing_proportion))
        logits = tf.convert_to_tensor(self.mixing_logits)
        self.mixing_logits.assign(tf.where(tf.equal(slot, index), logit, logits))

    def activate_next(self, mixing_proportion: float = 0.0) -> int:
        """Activates the next slot with proportion eps = `mixing_proportion`; returns the new active count.

        Raises `ValueError` when all `max_components` slots are active.
        """
        active = self.active_count()
        if active >= self.max_components:
            raise ValueError(
                f"{self.name}: all max_components={self.max_components} components are already active; "
                "construct the encoder with a larger max_components to add more."
            )
        self.set_mixing_proportion(active, mixing_proportion)
        self.num_active_components.assign(active + 1)
        return active + 1

    def active_count(self) -> int:
        """The number of active components as a Python int (eager)."""
        return int(keras.ops.convert_to_numpy(self.num_active_components))

    def get_config(self):
        config = super().get_config()
        config.update(
            max_components=self.max_components,
            initial_active_components=self.initial_active_components,
            learn_mixing_proportions=self.learn_mixing_proportions,
            per_example=self.per_example,
            offset_units=self.offset_units,
            max_offset=self.max_offset,
            seed=self.seed,
        )
        return config
