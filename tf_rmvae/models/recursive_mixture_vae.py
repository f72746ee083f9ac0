"""`RecursiveMixtureVAE`: a Keras model that trains a mixture encoder by Recursive Mixture Estimation (RME).

Training (method "rme", schedule "stagewise": the default, the recursion that the method's name describes):

1. Component 1 and the decoder train alone (component 1's criterion is its own importance-weighted bound over the
   samples of every slot, all drawn from it: IWAE; with `component_bound="elbo"` its own ELBO).
2. Components join one at a time (`add_component()`, usually from the `ComponentSchedule` callback). A new
   component `h_k` starts as a copy of `h_{k-1}` plus noise with proportion `eps_k = 0`, so the mixture and
   its bound are unchanged when it joins.
3. Every step, each active component `h_m` trains on its RME criterion
   `ELBO(h_m) + lambda * KL(h_m || q_{m-1})` against the mixture of the components before it, `q_{m-1}`, held
   fixed (no gradient into its parameters; the gradient reaches z only). The KL term is a Monte Carlo estimate
   whose per-sample log-ratio `log h_m(z) - log q_{m-1}(z)` is capped at `max_log_ratio = 5` nats: uncapped,
   the reward is unbounded (`objectives.rme_criterion`) and new components ran off and collapsed in every run
   we tried. `train_previous=False` freezes the earlier components instead (restored after every optimizer
   step, so Adam's momentum cannot move them); they then go stale while the decoder keeps training.
4. `eps_k` is set by a line search: every `eps_search_every` steps, the mixture's bound of `q_k` accumulated
   over those steps for each candidate in `eps_grid` (0 and the current value included) picks the best eps.
   Since eps = 0 reproduces `q_{k-1}`, a new component cannot lower the (batch-estimated) training bound.
5. The decoder trains on the mixture's bound (`bound`). RME's default ("auto" = "iw") is the stratified
   importance-weighted bound `log sum_i v_i p(x, z_i) / q(z_i | x)` over one sample per slot (idle slots draw
   from the active components): above the paper's ELBO in every budget and seed we measured (docs/results.md;
   with the stage-wise schedule and one sample per component). `bound="elbo"` is the paper's stratified ELBO
   `sum_j w_j E_{h_j}[log p(x, z) - log q(z | x)]`, one reparameterised sample per component.

Schedule "sweep" (the option): all `M` components are active from the start and every step trains each
component on its criterion against the mixture of the components before it; the proportions are learned by
gradient ascent on the mixture ELBO. Baselines share everything else: "vae" (one component, ELBO), "mixture"
(MixVAE: all components and learned proportions trained jointly on the mixture ELBO) and "boosting" (as "rme"
but the criterion is boosting VI's residual ELBO `E_h[log p(x, z) - log q_{k-1}(z)] + c * H(h)`).

Note `ELBO(h) + lambda KL(h || q) = E_h[log p] - lambda E_h[log q] + (1 - lambda) H(h)`: at lambda = 1 the
entropy of h drops out and, uncapped, components collapse; the cap stops that (lambda = 1, the default, was
measured best at 100 epochs with one trunk and eight heads; the paper's 0.3 never collapsed with any encoder we
tried, capped or not).

The defaults are the recommended model's, the configuration's "default" preset (`config.DEFAULTS`): RME on the
stratified importance-weighted bound, each component on its own importance-weighted bound with 5 samples per step,
lambda = 1, the cap 5, DReG encoder gradients. `bound="elbo"` alone gives the paper's bound and criteria (one
sample per component); add `lambda_kl=0.3` for its lambda.

The recursion itself (criteria, gradient routing, freezing, line search, component schedule) is
`tf_rmvae.models.recursion.RecursiveMixtureTrainer`, which any Keras VAE can use; this model adds the decoder,
metrics and the non-finite input policy around it.
"""

from __future__ import annotations

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tf_rmvae.choices import NONFINITE_POLICIES, RECURSIVE_METHODS  # noqa: F401  (RECURSIVE_METHODS: re-exported)
from tf_rmvae.config import DEFAULTS
from tf_rmvae.layers.encoders import RecursiveMixtureEncoder, make_mixture
from tf_rmvae.models.latent_model import LatentVariableModel
from tf_rmvae.models.recursion import (  # noqa: F401  (re-exported: the names users import from here)
    BOUNDS,
    LEGACY_ARGUMENTS,
    METHODS,
    SCHEDULES,
    TRAINING_ARGUMENTS,
    JointTraining,
    MixtureTerms,
    RecursiveMixtureTrainer,
    pairwise_log_prob,
)

tfd = tfp.distributions



@keras.saving.register_keras_serializable(package="tf_rmvae")
class RecursiveMixtureVAE(LatentVariableModel):
    """VAE with a `RecursiveMixtureEncoder`, trained by RME or a baseline (see the module docstring).

    Example (the recommended model: three heads on one trunk, each on its importance-weighted bound with five
    samples per step, lambda = 1, DReG gradients; `tf_rmvae.build_model()` builds and compiles the same):

        model = RecursiveMixtureVAE(RecursiveMixtureEncoder(), BernoulliDecoder((28, 28, 1)))
        paper = RecursiveMixtureVAE(RecursiveMixtureEncoder(max_components=4, shared_trunk=False),
                                    BernoulliDecoder((28, 28, 1)), bound="elbo", lambda_kl=0.3)

    Args:
      encoder: a `RecursiveMixtureEncoder`. The method configures its mixing at construction
        (`RecursiveMixtureEncoder.configure_mixing`): "mixture" and schedule "sweep" activate all components
        and learn the proportions; stage-wise methods set them by line search, whatever the encoder was
        constructed with.
      decoder: a layer mapping `z [..., D]` to a distribution over images with event shape `[H, W, C]`
        (e.g. `BernoulliDecoder`).
      nonfinite_inputs: what a training/evaluation batch with NaN/Inf pixels does. Either way such examples
        are replaced by zeros and get zero weight, so they never reach the weights, and are counted in the
        `nonfinite_examples` metric. "raise" (default) also stops with an error naming the optimizer step
        (in-graph; XLA drops assertions, so with `jit_compile=True` add `tf_rmvae.NonFiniteInputGuard` to the
        callbacks, which raises after the batch); "skip" only counts them.
      **settings: the training settings, keyword arguments of `tf_rmvae.RecursiveMixtureTrainer` (which holds
        them and documents each): `method`, `lambda_kl`, `max_log_ratio`, `schedule`, `train_previous`,
        `num_samples`, `bound`, `component_bound`, `encoder_gradient`, `encoder_groups`, `eps_grid`,
        `eps_search_every`, `boosting_entropy_weight`, `noise_seed`; each defaults to the recommended model's
        (`config.DEFAULTS`). Any other keyword argument goes to `keras.Model`. The model reads the settings in
        use as attributes (`model.lambda_kl`, ...), every "auto" resolved.

    Call `fit(dataset_of_images)`: batches are image tensors `[B, H, W, C]` (or `(x,)` / `(x, y)` tuples, y
    ignored). Reported metrics: `loss` (= -mixture bound), `elbo`, `reconstruction`, `kl`, `criterion` (the
    newest component's), `active_components`, `weight_m` and `entropy_m` for every component slot m,
    `nonfinite_examples`.
    """

    encoder_type = RecursiveMixtureEncoder

    def __init__(
        self,
        encoder: RecursiveMixtureEncoder,
        decoder: keras.layers.Layer,
        *,
        nonfinite_inputs: str = DEFAULTS.nonfinite_inputs,
        **settings,
    ):
        training = {name: settings.pop(name) for name in TRAINING_ARGUMENTS if name in settings}
        super().__init__(encoder, decoder, **settings)
        self.rme = RecursiveMixtureTrainer(encoder, **training)
        if nonfinite_inputs not in NONFINITE_POLICIES:
            raise ValueError(
                f"nonfinite_inputs must be one of {NONFINITE_POLICIES}; got {nonfinite_inputs!r}.")
        self.nonfinite_inputs = nonfinite_inputs
        for name in TRAINING_ARGUMENTS:  # the validated settings, to read; the trainer holds those in use
            setattr(self, name, getattr(self.rme, name))
        self._trackers = {
            name: keras.metrics.Mean(name=name)
            for name in ("loss", "elbo", "reconstruction", "kl", "criterion", "active_components")
        }
        self._trackers["nonfinite_examples"] = keras.metrics.Sum(name="nonfinite_examples")
        for m in range(encoder.max_components):
            self._trackers[f"weight_{m}"] = keras.metrics.Mean(name=f"weight_{m}")
            self._trackers[f"entropy_{m}"] = keras.metrics.Mean(name=f"entropy_{m}")

    # ------------------------------------------------------------------ configuration
    @property
    def recursive(self) -> bool:
        """Whether the components train on their own criteria (against the mixture before them)."""
        return self.rme.criterion.recursive

    @property
    def line_search(self) -> bool:
        """Whether components join one at a time with eps set by line search (stage-wise schedule)."""
        return self.rme.component_training.line_search

    @property
    def all_components_from_start(self) -> bool:
        """Whether all M components are active from the first step, proportions learned."""
        return isinstance(self.rme.component_training, JointTraining)

    def build(self, input_shape):
        super().build(tuple(input_shape))
        self.rme.ensure_built()
        self.built = True

    # ------------------------------------------------------------------ inference API
    def posterior(self, x) -> tfd.MixtureSameFamily:
        """`q(z | x)` as a `MixtureSameFamily`, batch `[B]`, event `[D]`."""
        x = tf.cast(x, tf.float32)
        self.ensure_built(x.shape)
        return make_mixture(*self.encoder.compute_parameters(x))

    def posterior_mean(self, x) -> tf.Tensor:
        """`[B, D]` mean of the mixture posterior."""
        x = tf.cast(x, tf.float32)
        self.ensure_built(x.shape)
        log_w, loc, _ = self.encoder.compute_parameters(x)
        return tf.einsum("bm,bmd->bd", tf.exp(log_w), loc)

    def proposal(self, x) -> tfd.MixtureSameFamily:
        """The mixture posterior without reparameterisation machinery (importance sampling needs no
        gradients)."""
        return make_mixture(*self.encoder.compute_parameters(x), reparameterize=False)

    def elbo(self, x, num_samples: int = 1) -> tf.Tensor:
        """`[B]` stratified mixture ELBO with `num_samples` samples per component."""
        return self.terms(self._unpack(x), num_samples).elbo

    def add_component(self) -> int:
        """Activates the next component (eps = 0, copy initialisation) and restarts the line-search
        statistics."""
        return self.rme.add_component()

    # ------------------------------------------------------------------ training
    def terms(self, x, num_samples: int | None = None, noise=None) -> MixtureTerms:
        """Per-example terms of every objective on images `x [B, H, W, C]` (noise: `[S, B, M, D]` or None)."""
        x, example_weight = self._finite_examples(x)
        return self.rme.terms(x, self._decoder_log_prob, num_samples, noise, example_weight)

    def _decoder_log_prob(self, x, z):
        """`log p(x | z)`: images `[B, H, W, C]`, z `[S, B, M, D]` -> `[S, B, M]`."""
        return self.decoder(z).log_prob(x[None, :, None])

    def _finite_examples(self, x):
        """Masks non-finite examples: returns `(x with them zeroed, [B] float weights)` and checks the
        policy."""
        finite = tf.reduce_all(tf.math.is_finite(tf.reshape(x, [tf.shape(x)[0], -1])), axis=1)
        if self.nonfinite_inputs == "raise":
            optimizer = getattr(self, "optimizer", None)
            step = optimizer.iterations if optimizer is not None else -1
            tf.debugging.Assert(
                tf.reduce_all(finite),
                [f"{self.name}: the batch of optimizer step", step, "has NaN/Inf inputs in",
                 tf.reduce_sum(tf.cast(~finite, tf.int32)), "example(s). Clean the data, or pass "
                 "nonfinite_inputs='skip' to skip such examples."],
            )
        mask = tf.reshape(finite, [-1] + [1] * (x.shape.rank - 1))
        return tf.where(mask, x, tf.zeros_like(x)), tf.cast(finite, tf.float32)

    def train_step(self, data):
        x = self._unpack(data)
        with tf.GradientTape(persistent=True) as tape:
            terms = self.terms(x, noise=self.rme.training_noise(x, self.optimizer.iterations))
            losses = self.rme.losses(terms, self.optimizer)
        self.rme.apply_gradients(tape, losses, self.optimizer, self.trainable_variables)
        self.rme.after_step(terms)
        return self._update_metrics(terms)

    def test_step(self, data):
        x = self._unpack(data)
        # Stateless noise keyed by the step counter, as in training: `evaluate` (and Keras's validation after every
        # epoch) is a deterministic function of the weights, so a resumed run validates exactly as the uninterrupted
        # run did (the same best epoch) and successive epochs are compared on common random numbers.
        terms = self.terms(x, noise=self.rme.training_noise(x, self.optimizer.iterations))
        return self._update_metrics(terms)

    def _update_metrics(self, terms: MixtureTerms) -> dict:
        values = dict(
            loss=-terms.bound, elbo=terms.elbo, reconstruction=terms.reconstruction, kl=terms.kl,
            criterion=self.rme.newest(terms.criterion),
        )
        for name, value in values.items():
            self._trackers[name].update_state(value, sample_weight=terms.example_weight)
        self._trackers["nonfinite_examples"].update_state(tf.reduce_sum(1.0 - terms.example_weight))
        self._trackers["active_components"].update_state(
            tf.cast(tf.convert_to_tensor(self.encoder.num_active_components), tf.float32)
        )
        weights = tf.exp(self.encoder.mixture_log_weights())
        if self.encoder.per_example_proportions:  # the batch's mean weights, not the shared logits' weights
            example_weight = terms.example_weight[:, None]
            weights = tf.reduce_sum(tf.exp(terms.log_weights) * example_weight, 0) / tf.maximum(
                tf.reduce_sum(example_weight), 1.0)
        entropy = tf.reduce_mean(terms.entropy, axis=0)
        for m in range(self.encoder.max_components):
            self._trackers[f"weight_{m}"].update_state(weights[m])
            self._trackers[f"entropy_{m}"].update_state(entropy[m])
        return {name: tracker.result() for name, tracker in self._trackers.items()}

    # ------------------------------------------------------------------ serialization
    def get_config(self):
        config = super().get_config()
        training = self.rme.get_config()
        config.update({name: training[name] for name in TRAINING_ARGUMENTS})
        config.update(nonfinite_inputs=self.nonfinite_inputs)
        return config

    @classmethod
    def from_config(cls, config):
        return super().from_config({**LEGACY_ARGUMENTS, **config})
