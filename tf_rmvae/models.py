"""`RecursiveMixtureVAE`: a Keras model that trains a mixture encoder by Recursive Mixture Estimation (RME).

Training (method "rme", schedule "stagewise": the default, the recursion that the method's name describes):

1. Component 1 and the decoder train as a plain VAE (component 1's criterion is its own ELBO).
2. Components join one at a time (`add_component()`, usually from the `ComponentSchedule` callback). A new
   component `h_k` starts as a copy of `h_{k-1}` plus noise with proportion `eps_k = 0`, so the mixture and its
   ELBO are unchanged when it joins.
3. Every step, each active component `h_m` trains on its RME criterion
   `ELBO(h_m) + lambda * KL(h_m || q_{m-1})` against the mixture of the components before it, `q_{m-1}`, held fixed
   (no gradient into its parameters; the gradient reaches z only). The KL term is a Monte Carlo estimate whose
   per-sample log-ratio `log h_m(z) - log q_{m-1}(z)` is capped at `max_log_ratio = 5` nats: uncapped, the reward
   is unbounded (`objectives.rme_criterion`) and new components ran off and collapsed in every run we tried.
   `train_previous=False` freezes the earlier components instead (restored after every optimizer step, so Adam's
   momentum cannot move them); they then go stale while the decoder keeps training.
4. `eps_k` is set by a line search: every `eps_search_every` steps, the mixture ELBO of `q_k` accumulated over
   those steps for each candidate in `eps_grid` (0 and the current value included) picks the best eps. Since eps = 0
   reproduces `q_{k-1}`, a new component cannot lower the (batch-estimated) training ELBO.
5. The decoder always trains on the stratified ELBO of the current mixture,
   `sum_j w_j E_{h_j}[log p(x, z) - log q(z | x)]`, one reparameterised sample per component.

Schedule "sweep" (the option): all `M` components are active from the start and every step trains each component on
its criterion against the mixture of the components before it; the proportions are learned by gradient ascent on the
mixture ELBO. Baselines share everything else: "vae" (one component, ELBO), "mixture" (MixVAE: all components and
learned proportions trained jointly on the mixture ELBO) and "boosting" (as "rme" but the criterion is boosting VI's
residual ELBO `E_h[log p(x, z) - log q_{k-1}(z)] + c * H(h)`).

Note `ELBO(h) + lambda KL(h || q) = E_h[log p] - lambda E_h[log q] + (1 - lambda) H(h)`: at lambda = 1 the entropy
of h drops out and components collapse, hence the default lambda = 0.3 (< 1).
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tf_rmvae import mixing, objectives
from tf_rmvae.encoders import RecursiveMixtureEncoder, make_mixture
from tf_rmvae.latent_model import LatentVariableModel, replica_batch_layout, standard_normal_log_prob

tfd = tfp.distributions

METHODS = ("rme", "vae", "mixture", "boosting")
SCHEDULES = ("stagewise", "sweep")
BOUNDS = ("elbo", "iw")
RECURSIVE_METHODS = ("rme", "boosting")
NONFINITE_POLICIES = ("raise", "skip")


def pairwise_log_prob(loc: tf.Tensor, scale: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
    """`log h_j(z_i)` for every pair: loc, scale `[B, M, D]`, z `[S, B, M, D]` -> `[S, B, M_i, M_j]`."""
    components = tfd.Independent(tfd.Normal(loc[:, None], scale[:, None]), reinterpreted_batch_ndims=1)
    return components.log_prob(z[..., None, :])


@keras.saving.register_keras_serializable(package="tf_rmvae")
class RecursiveMixtureVAE(LatentVariableModel):
    """VAE with a `RecursiveMixtureEncoder`, trained by RME or one of the baselines (see the module docstring).

    Args:
      encoder: a `RecursiveMixtureEncoder`. The method configures its mixing when the model is built
        (`RecursiveMixtureEncoder.configure_mixing`): "mixture" and schedule "sweep" activate all components and
        make the proportions trainable; stage-wise methods make them non-trainable (set by line search), whatever
        the encoder was constructed with.
      decoder: a layer mapping `z [..., D]` to a distribution over images with event shape `[H, W, C]`
        (e.g. `BernoulliDecoder`).
      method: "rme" (default), "vae", "mixture" or "boosting".
      lambda_kl: RME's KL weight lambda (default 0.3; must be >= 0; lambda = 1 collapses).
      max_log_ratio: cap of each sample's `log h - log q_prev` in the RME criterion's KL term (default 5 nats;
        None: uncapped); boosting's residual ELBO has the same unbounded reward and gets the same cap.
        The uncapped KL reward is unbounded above and lets a new component run off where the decoder is untrained
        (see `objectives.rme_criterion`).
      schedule: "stagewise" (default, the paper's recursion) or "sweep" (all components every step).
      train_previous: stage-wise only: keep training earlier components on their own criteria (default True;
        False freezes them).
      num_samples: reparameterised samples per component per step (S).
      bound: what the decoder and the mixing proportions are trained on (and the line search scores): "elbo"
        (default), the stratified mixture ELBO; or "iw", the stratified importance-weighted bound
        (`objectives.stratified_importance_weighted_bound`) whose inactive slots draw extra samples from the
        active components, so every slot's decoder pass counts (`method="vae"` with `num_samples=k` is IWAE).
        The components' own criteria are unchanged.
      eps_grid: candidate mixing proportions for the line search (stage-wise recursive methods).
      eps_search_every: steps between line searches.
      boosting_entropy_weight: c in boosting's residual ELBO.
      nonfinite_inputs: what a training/evaluation batch with NaN/Inf pixels does. Either way such examples are
        replaced by zeros and get zero weight, so they never reach the weights, and are counted in the
        `nonfinite_examples` metric. "raise" (default) also stops with an error naming the optimizer step (in-graph;
        XLA drops assertions, so with `jit_compile=True` add `tf_rmvae.NonFiniteInputGuard` to the callbacks, which
        raises after the batch); "skip" only counts them.
      noise_seed: seed of the training noise. Each step draws its reparameterisation noise statelessly from
        `(noise_seed, optimizer.iterations)` for the whole global batch and takes this replica's slice, so a run is
        reproducible, a resumed run repeats the same noise, and N replicas see the noise of one device.

    Call `fit(dataset_of_images)`: batches are image tensors `[B, H, W, C]` (or `(x,)` / `(x, y)` tuples, y ignored).
    Reported metrics: `loss` (= -mixture ELBO), `elbo`, `reconstruction`, `kl`, `criterion` (newest component's),
    `active_components`, `weight_m` and `entropy_m` for every component slot m, `nonfinite_examples`.
    """

    def __init__(
        self,
        encoder: RecursiveMixtureEncoder,
        decoder: keras.layers.Layer,
        method: str = "rme",
        lambda_kl: float = 0.3,
        max_log_ratio: float | None = 5.0,
        schedule: str = "stagewise",
        train_previous: bool = True,
        num_samples: int = 1,
        bound: str = "elbo",
        eps_grid=mixing.DEFAULT_EPS_GRID,
        eps_search_every: int = 50,
        boosting_entropy_weight: float = 1.0,
        nonfinite_inputs: str = "raise",
        noise_seed: int = 0,
        **kwargs,
    ):
        super().__init__(encoder, decoder, **kwargs)
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}; got {schedule!r}.")
        if not np.isfinite(lambda_kl) or lambda_kl < 0:
            raise ValueError(f"lambda_kl must be a finite number >= 0; got {lambda_kl}.")
        if bound not in BOUNDS:
            raise ValueError(f"bound must be one of {BOUNDS}; got {bound!r}.")
        if int(num_samples) < 1 or int(eps_search_every) < 1:
            raise ValueError("num_samples and eps_search_every must be >= 1.")
        if nonfinite_inputs not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite_inputs must be one of {NONFINITE_POLICIES}; got {nonfinite_inputs!r}.")
        if method == "vae" and encoder.max_components != 1:
            raise ValueError(f"method='vae' needs an encoder with max_components=1; got {encoder.max_components}.")
        eps_grid = tuple(float(e) for e in eps_grid)
        mixing.eps_to_logit(eps_grid)  # validates the range
        self.method = method
        self.lambda_kl = float(lambda_kl)
        self.max_log_ratio = None if max_log_ratio is None else float(max_log_ratio)
        self.schedule = schedule
        self.train_previous = bool(train_previous)
        self.num_samples = int(num_samples)
        self.bound = bound
        self.eps_grid = eps_grid
        self.eps_search_every = int(eps_search_every)
        self.boosting_entropy_weight = float(boosting_entropy_weight)
        self.nonfinite_inputs = nonfinite_inputs
        self.noise_seed = int(noise_seed)
        num_slots = encoder.max_components
        self._trackers = {
            name: keras.metrics.Mean(name=name)
            for name in ("loss", "elbo", "reconstruction", "kl", "criterion", "active_components")
        }
        self._trackers["nonfinite_examples"] = keras.metrics.Sum(name="nonfinite_examples")
        for m in range(num_slots):
            self._trackers[f"weight_{m}"] = keras.metrics.Mean(name=f"weight_{m}")
            self._trackers[f"entropy_{m}"] = keras.metrics.Mean(name=f"entropy_{m}")

    # ------------------------------------------------------------------ configuration
    @property
    def recursive(self) -> bool:
        return self.method in RECURSIVE_METHODS

    @property
    def line_search(self) -> bool:
        return self.recursive and self.schedule == "stagewise"

    @property
    def all_components_from_start(self) -> bool:
        return self.method == "mixture" or (self.recursive and self.schedule == "sweep")

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        joint = self.all_components_from_start
        self.encoder.configure_mixing(all_active=joint, learn_proportions=joint)
        super().build(input_shape)
        candidates = len(self.eps_grid) + 1
        self.eps_search_scores = self.add_weight(
            name="eps_search_scores", shape=(candidates,), initializer="zeros", trainable=False,
            aggregation="only_first_replica",
        )
        self.eps_search_steps = self.add_weight(
            name="eps_search_steps", shape=(), dtype="int32", initializer="zeros", trainable=False,
            aggregation="only_first_replica",
        )
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
        """The mixture posterior without reparameterisation machinery (importance sampling needs no gradients)."""
        return make_mixture(*self.encoder.compute_parameters(x), reparameterize=False)

    def elbo(self, x, num_samples: int = 1) -> tf.Tensor:
        """`[B]` stratified mixture ELBO with `num_samples` samples per component."""
        return self._terms(self._unpack(x), num_samples)["elbo"]

    def add_component(self) -> int:
        """Activates the next component (eps = 0, copy initialisation) and restarts the line-search statistics."""
        if self.all_components_from_start or self.method == "vae":
            raise ValueError(f"method={self.method!r}, schedule={self.schedule!r} does not add components.")
        active = self.encoder.add_component(0.0)
        self.eps_search_scores.assign(tf.zeros_like(self.eps_search_scores))
        self.eps_search_steps.assign(0)
        return active

    # ------------------------------------------------------------------ objectives
    def _terms(self, x, num_samples, noise=None):
        """Per-example terms of every objective on one batch `x [B, H, W, C]` (noise: `[S, B, M, D]` or None)."""
        x, example_weight = self._finite_examples(x)
        log_w, loc, scale = self.encoder.compute_parameters(x)  # [B, M], [B, M, D], [B, M, D]
        if noise is None:
            noise = tf.random.normal(tf.concat([[num_samples], tf.shape(loc)], 0))
        if self.bound == "iw":  # inactive slots draw from active components (see `mixing.slot_sources`)
            sources = mixing.slot_sources(self.encoder.max_components, self.encoder.num_active_components)
            z = tf.gather(loc, sources, axis=1) + tf.gather(scale, sources, axis=1) * noise  # [S, B, M, D]
        else:
            z = loc + scale * noise  # [S, B, M, D], reparameterised sample of every component
        entropy = tfd.Independent(tfd.Normal(loc, scale), reinterpreted_batch_ndims=1).entropy()  # [B, M]
        log_h = pairwise_log_prob(loc, scale, z)  # [S, B, M, M]: density of h_j at samples of h_i
        log_px_z = self.decoder(z).log_prob(x[None, :, None])  # [S, B, M]
        log_joint = log_px_z + standard_normal_log_prob(z)
        log_q = objectives.mixture_log_density(log_h, log_w)
        elbo = objectives.stratified_mixture_elbo(log_joint, log_q, log_w)
        reconstruction = objectives.weighted_sum(tf.reduce_mean(log_px_z, 0), log_w)
        if self.bound == "iw":
            bound = objectives.stratified_importance_weighted_bound(
                log_joint, log_q, mixing.slot_log_weights(log_w, sources))
        else:
            bound = elbo
        terms = dict(
            bound=bound, elbo=elbo, reconstruction=reconstruction, kl=reconstruction - elbo, log_weights=log_w,
            entropy=entropy, log_joint=log_joint, log_h=log_h, example_weight=example_weight,
        )
        if self.recursive:
            terms["criterion"] = self._criteria(z, loc, scale, log_joint, log_h, entropy)
        else:
            terms["criterion"] = objectives.elbo(log_joint, tf.linalg.diag_part(log_h))  # each component's ELBO
        return terms

    def _criteria(self, z, loc, scale, log_joint, log_h, entropy):
        """`[B, M]` criterion of every component against the (fixed) mixture of the components before it."""
        log_h_fixed = pairwise_log_prob(tf.stop_gradient(loc), tf.stop_gradient(scale), z)  # gradients reach z only
        previous_log_w = mixing.prefix_log_weights(tf.stop_gradient(self.encoder.mixing_logits))  # [M, M]
        log_q_previous = tf.reduce_logsumexp(log_h_fixed + previous_log_w, axis=-1)  # [S, B, M]
        log_h_self = tf.linalg.diag_part(log_h)
        has_previous = tf.range(self.encoder.max_components) >= 1
        log_q_previous = tf.where(has_previous, log_q_previous, log_h_self)
        if self.method == "rme":
            return objectives.rme_criterion(
                log_joint, log_h_self, log_q_previous, self.lambda_kl, self.max_log_ratio
            )
        residual = objectives.boosting_criterion(
            log_joint, log_h_self, log_q_previous, entropy, self.boosting_entropy_weight, self.max_log_ratio,
        )
        return tf.where(has_previous, residual, objectives.elbo(log_joint, log_h_self))

    def _trained_components(self) -> tf.Tensor:
        """`[M]` bool: which components the criterion trains this step."""
        slot = tf.range(self.encoder.max_components)
        active = tf.convert_to_tensor(self.encoder.num_active_components)
        if self.schedule == "stagewise" and not self.train_previous:
            return tf.equal(slot, active - 1)
        return slot < active

    def _newest(self, per_component: tf.Tensor) -> tf.Tensor:
        """Picks the newest active component's column of `[B, M]`."""
        newest = tf.convert_to_tensor(self.encoder.num_active_components) - 1
        return tf.gather(per_component, newest, axis=-1)

    # ------------------------------------------------------------------ training
    def _finite_examples(self, x):
        """Masks non-finite examples: returns `(x with them zeroed, [B] float weights)` and checks the policy."""
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

    def _training_noise(self, x):
        """`[S, B, M, D]` standard normal noise: this replica's slice of the global batch's stateless draw."""
        batch = tf.shape(x)[0]
        offset, global_batch = replica_batch_layout(batch)
        shape = [self.num_samples, global_batch, self.encoder.max_components, self.encoder.latent_dim]
        seed = tf.stack([tf.constant(self.noise_seed, tf.int64), tf.cast(self.optimizer.iterations, tf.int64)])
        noise = tf.random.stateless_normal(shape, seed)
        return tf.gather(noise, offset + tf.range(batch), axis=1)

    def _update_metrics(self, terms):
        values = dict(
            loss=-terms["bound"], elbo=terms["elbo"], reconstruction=terms["reconstruction"], kl=terms["kl"],
            criterion=self._newest(terms["criterion"]),
        )
        weight = terms["example_weight"]
        for name, value in values.items():
            self._trackers[name].update_state(value, sample_weight=weight)
        self._trackers["nonfinite_examples"].update_state(tf.reduce_sum(1.0 - weight))
        self._trackers["active_components"].update_state(
            tf.cast(tf.convert_to_tensor(self.encoder.num_active_components), tf.float32)
        )
        weights = tf.exp(self.encoder.mixture_log_weights())
        entropy = tf.reduce_mean(terms["entropy"], axis=0)
        for m in range(self.encoder.max_components):
            self._trackers[f"weight_{m}"].update_state(weights[m])
            self._trackers[f"entropy_{m}"].update_state(entropy[m])
        return {name: tracker.result() for name, tracker in self._trackers.items()}

    def train_step(self, data):
        x = self._unpack(data)
        global_batch = tf.cast(replica_batch_layout(tf.shape(x)[0])[1], tf.float32)
        encoder = self.encoder
        trained = self._trained_components()
        with tf.GradientTape(persistent=self.recursive) as tape:
            terms = self._terms(x, self.num_samples, noise=self._training_noise(x))
            weight = terms["example_weight"]  # 0 for skipped (non-finite) examples
            mixture_loss = -tf.reduce_sum(weight * terms["bound"]) / global_batch
            scaled_mixture_loss = self.optimizer.scale_loss(mixture_loss)
            if self.recursive:
                criterion = tf.where(trained, terms["criterion"], 0.0) * weight[:, None]
                encoder_loss = -tf.reduce_sum(criterion) / global_batch
                scaled_encoder_loss = self.optimizer.scale_loss(encoder_loss)
        variables = self.trainable_variables
        if self.recursive:
            mixture_vars = self.decoder.trainable_variables + (
                [encoder.mixing_logits] if encoder.mixing_logits.trainable else []
            )
            mixture_ids = {id(v) for v in mixture_vars}
            encoder_vars = [v for v in variables if id(v) not in mixture_ids]
            grads = dict(zip(map(id, mixture_vars), tape.gradient(scaled_mixture_loss, mixture_vars)))
            grads.update(zip(map(id, encoder_vars), tape.gradient(scaled_encoder_loss, encoder_vars)))
            gradients = [grads[id(v)] for v in variables]
            del tape
        else:
            gradients = tape.gradient(scaled_mixture_loss, variables)
        freeze = self.recursive and self.schedule == "stagewise" and not self.train_previous
        if freeze:
            component_vars = encoder.component_variables
            backup = [tf.identity(tf.convert_to_tensor(v)) for v in component_vars]
        self.optimizer.apply_gradients(zip(gradients, variables))
        if freeze:
            for variable, old in zip(component_vars, backup):
                mask = tf.reshape(trained, [-1] + [1] * (len(variable.shape) - 1))
                variable.assign(tf.where(mask, tf.convert_to_tensor(variable), old))
        if self.line_search:
            self._line_search_step(terms)
        return self._update_metrics(terms)

    def _line_search_step(self, terms):
        """Accumulates the mixture ELBO of every candidate eps of the newest component; every
        `eps_search_every` steps sets eps to the best candidate (the current value is a candidate)."""
        encoder = self.encoder
        active = tf.convert_to_tensor(encoder.num_active_components)
        logits = tf.convert_to_tensor(encoder.mixing_logits)
        newest = tf.equal(tf.range(encoder.max_components), active - 1)
        current = tf.reduce_sum(tf.where(newest, logits, 0.0))
        candidates = tf.concat([current[None], tf.constant(mixing.eps_to_logit(self.eps_grid))], 0)
        scores = objectives.line_search_scores(
            tf.stop_gradient(terms["log_joint"]), tf.stop_gradient(terms["log_h"]), logits, active, candidates,
            terms["example_weight"], bound=self.bound,
        )
        context = tf.distribute.get_replica_context()
        if context is not None and tf.distribute.get_strategy().num_replicas_in_sync > 1:
            scores = context.all_reduce(tf.distribute.ReduceOp.MEAN, scores)
        total = tf.convert_to_tensor(self.eps_search_scores) + scores
        steps = tf.convert_to_tensor(self.eps_search_steps) + 1
        search = (steps >= self.eps_search_every) & (active > 1)
        best = tf.gather(candidates, tf.argmax(total))  # gather, not slicing: XLA needs constant slice bounds
        encoder.mixing_logits.assign(tf.where(search & newest, best, logits))
        self.eps_search_scores.assign(tf.where(search, tf.zeros_like(total), total))
        self.eps_search_steps.assign(tf.where(search, 0, steps))

    def test_step(self, data):
        x = self._unpack(data)
        terms = self._terms(x, self.num_samples)
        return self._update_metrics(terms)

    # ------------------------------------------------------------------ serialization
    def get_config(self):
        config = super().get_config()
        config.update(
            method=self.method,
            lambda_kl=self.lambda_kl,
            max_log_ratio=self.max_log_ratio,
            schedule=self.schedule,
            train_previous=self.train_previous,
            num_samples=self.num_samples,
            bound=self.bound,
            eps_grid=list(self.eps_grid),
            eps_search_every=self.eps_search_every,
            boosting_entropy_weight=self.boosting_entropy_weight,
            nonfinite_inputs=self.nonfinite_inputs,
            noise_seed=self.noise_seed,
        )
        return config
