"""The recursion of RME, reusable in any Keras VAE: `RecursiveMixtureTrainer`.

A model that owns a `RecursiveMixtureEncoder` and a decoder trains it by RME (or a baseline) with four calls:

    with tf.GradientTape(persistent=True) as tape:
        terms = rme.terms(x, log_likelihood_fn)    # MixtureTerms: per-example bound, ELBO, criteria, ...
        losses = rme.losses(terms, optimizer)      # Losses: the mixture's bound and the components' criteria
    rme.apply_gradients(tape, losses, optimizer, model.trainable_variables)
    rme.after_step(terms)                          # the eps line search (stage-wise schedule)

and `rme.add_component()` between steps (`tf_rmvae.ComponentSchedule` calls the model's `add_component`). What
trains on what:

- the decoder and learned proportions: the mixture's bound (`bound`: the stratified ELBO or
  importance-weighted bound, with `num_samples` reparameterised samples of every component);
- the component networks: their criteria against the fixed mixture of the components before them
  (`objectives.component_criterion(method)`) for "rme" and "boosting", the mixture's bound for "vae" and
  "mixture" (with `encoder_gradient="dreg"`, its doubly reparameterised gradient; "gdreg", the generalized one);
- which components train, chosen once from the method, schedule and `train_previous`: `JointTraining` (every
  component from the start, proportions learned) or `StagewiseTraining` (components join one at a time, eps by
  line search, earlier components trained or frozen).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, ClassVar, NamedTuple

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tf_rmvae import mixing, objectives
from tf_rmvae.choices import (
    BOUND_SETTINGS,
    BOUNDS,  # noqa: F401  (re-exported: tf_rmvae.models.recursive_mixture_vae imports it from here)
    METHODS,
    SCHEDULES,
    adds_components,
    encoder_objective_problem,
    is_stagewise,
    resolve_bound,
    resolve_component_bound,
    resolve_encoder_gradient,
    resolve_num_samples,
)
from tf_rmvae.config import DEFAULTS
from tf_rmvae.layers.encoders import RecursiveMixtureEncoder
from tf_rmvae.models import decoder_pass
from tf_rmvae.models.latent_model import replica_batch_layout, standard_normal_log_prob

tfd = tfp.distributions


# `log p(x | z)`: images `x [B, ...]` and latents `z [S, B, M, D]` -> `[S, B, M]` (e.g.
# `lambda x, z: decoder(z).log_prob(x[None, :, None])` for a decoder that returns a distribution).
LogLikelihoodFn = Callable[[tf.Tensor, tf.Tensor], tf.Tensor]


def pairwise_log_prob(loc: tf.Tensor, scale: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
    """`log h_j(z_i)` for every pair: loc, scale `[B, M, D]`, z `[S, B, M, D]` -> `[S, B, M_i, M_j]`."""
    components = tfd.Independent(tfd.Normal(loc[:, None], scale[:, None]), reinterpreted_batch_ndims=1)
    return components.log_prob(z[..., None, :])


def transported_samples(loc: tf.Tensor, scale: tf.Tensor, z: tf.Tensor) -> tf.Tensor:
    """Every sample moved along every component's transport: `Z[s, b, i, k] = loc_k + scale_k * e` with
    `e = stop((z_sbi - loc_k) / scale_k)`: the value `z_sbi`, the parameters' derivative that of component k's
    reparameterisation at the noise that gives `z_sbi` (`objectives.TransportedDensities`). loc, scale `[B, M, D]`,
    z `[S, B, M, D]` -> `[S, B, M, M, D]`."""
    loc_k, scale_k = loc[:, None], scale[:, None]  # [B, 1, M, D]
    return loc_k + scale_k * tf.stop_gradient((z[..., None, :] - loc_k) / scale_k)


def transported_log_prob(loc: tf.Tensor, scale: tf.Tensor, moved: tf.Tensor) -> tf.Tensor:
    """`log h_j` at every transported sample: loc, scale `[B, M, D]`, moved `[S, B, M, K, D]` ->
    `[S, B, M, K, M_j]`. One component at a time (M is static), so the largest intermediate is `moved`'s size, not
    M times it."""
    return tf.stack([tfd.Independent(tfd.Normal(loc[:, None, None, j], scale[:, None, None, j]),
                                     reinterpreted_batch_ndims=1).log_prob(moved)
                     for j in range(loc.shape[1])], axis=-1)


def own_log_prob(loc: tf.Tensor, scale: tf.Tensor, z: tf.Tensor, sources: tf.Tensor | None = None) -> tf.Tensor:
    """`log h_{sources[i]}(z_i)`, each slot's samples under their own component: loc, scale `[B, M, D]`, z
    `[S, B, M, D]`, sources `[M]` (default: slot i's own) -> `[S, B, M]`. The values of
    `objectives.own_log_density(pairwise_log_prob(loc, scale, z), sources)` without the other M - 1 pairs."""
    if sources is not None:
        loc, scale = tf.gather(loc, sources, axis=1), tf.gather(scale, sources, axis=1)
    return tfd.Independent(tfd.Normal(loc, scale), reinterpreted_batch_ndims=1).log_prob(z)


# Arguments that a config saved before they existed lacks, or that it may lack, with the behaviour of then: before
# `bound` was an argument (its default is now "auto", the method's default), every method trained on the ELBO; before
# the classes read the configuration's defaults (`config.DEFAULTS`), they trained on ELBO criteria with one sample per
# component, lambda 0.3 and ordinary gradients (a config saved since holds every setting, resolved).
LEGACY_ARGUMENTS = {"bound": "elbo", "component_bound": "elbo", "num_samples": 1, "lambda_kl": 0.3,
                    "encoder_gradient": "reparam"}

# The settings that configure the training, each with its default (the configuration's, `config.DEFAULTS`, where it
# has one; the arguments of `RecursiveMixtureTrainer`, which `RecursiveMixtureVAE` forwards).
TRAINING_DEFAULTS = dict(
    method=DEFAULTS.method,
    lambda_kl=DEFAULTS.lambda_kl,
    max_log_ratio=DEFAULTS.resolved_max_log_ratio,
    schedule=DEFAULTS.schedule,
    train_previous=DEFAULTS.train_previous,
    num_samples=DEFAULTS.num_samples,
    bound=DEFAULTS.bound,
    eps_grid=mixing.DEFAULT_EPS_GRID,
    eps_search_every=DEFAULTS.eps_search_every,
    boosting_entropy_weight=1.0,
    noise_seed=DEFAULTS.seed,
    component_bound=DEFAULTS.component_bound,
    encoder_gradient=DEFAULTS.encoder_gradient,
    encoder_groups=DEFAULTS.encoder_groups,
)
TRAINING_ARGUMENTS = tuple(TRAINING_DEFAULTS)


class MixtureTerms(NamedTuple):
    """Per-example terms of one batch: `S` samples per component slot, `B` examples, `M` slots."""

    bound: tf.Tensor  # [B] what the decoder and learned proportions maximise ("elbo" or "iw")
    elbo: tf.Tensor  # [B] stratified mixture ELBO
    reconstruction: tf.Tensor  # [B] sum_m w_m E_{h_m}[log p(x | z)]
    kl: tf.Tensor  # [B] reconstruction - elbo
    criterion: tf.Tensor  # [B, M] each component's criterion
    log_weights: tf.Tensor  # [B, M] mixture log-weights
    entropy: tf.Tensor  # [B, M] component entropies
    log_joint: tf.Tensor  # [S, B, M] log p(x, z) at each slot's samples
    log_h: tf.Tensor  # [S, B, M, M] log h_j at the samples of slot i
    example_weight: tf.Tensor  # [B] 1, or 0 for a skipped example
    logit_offsets: tf.Tensor | None = None  # [B, M] per-example proportions' logit offsets (zeros if shared)
    decoder_route: decoder_pass.DecoderRoute | None = None  # z -> log p(x | z), for the step's backward pass


class Losses(NamedTuple):
    """Scalar losses of one step (summed over this replica's examples, divided by the global batch)."""

    mixture: tf.Tensor  # -bound: trains the decoder and learned proportions
    components: tf.Tensor | None  # -criteria of the trained components; None: they train on `mixture`
    decoder_route: decoder_pass.DecoderRoute | None = None  # the terms' decoder call (`gradients`)


@dataclasses.dataclass(frozen=True)
class JointTraining:
    """All M components active from the first step, proportions learned by gradient ascent on the mixture's
    bound: methods "vae" and "mixture", schedule "sweep" (one component has no proportion to learn)."""

    line_search: ClassVar[bool] = False
    adds_components: ClassVar[bool] = False
    freezes: ClassVar[bool] = False

    def configure(self, encoder: RecursiveMixtureEncoder) -> None:
        encoder.configure_mixing(all_active=True, learn_proportions=encoder.max_components > 1)

    def trained_components(self, num_active: tf.Tensor, num_slots: int) -> tf.Tensor:
        """`[M]` bool: the components trained this step."""
        return tf.range(num_slots) < num_active


@dataclasses.dataclass(frozen=True)
class StagewiseTraining:
    """Components join one at a time (`add_component`, eps = 0), the newest eps is set by line search; earlier
    components keep training on their criteria (`train_previous`) or are frozen."""

    train_previous: bool = True
    line_search: ClassVar[bool] = True
    adds_components: ClassVar[bool] = True

    @property
    def freezes(self) -> bool:
        return not self.train_previous

    def configure(self, encoder: RecursiveMixtureEncoder) -> None:
        encoder.configure_mixing(all_active=False, learn_proportions=False)

    def trained_components(self, num_active: tf.Tensor, num_slots: int) -> tf.Tensor:
        """`[M]` bool: the components trained this step."""
        slot = tf.range(num_slots)
        if self.train_previous:
            return slot < num_active
        return tf.equal(slot, num_active - 1)


ComponentTraining = JointTraining | StagewiseTraining


def component_training(method: str, schedule: str, train_previous: bool) -> ComponentTraining:
    """Stage-wise for the recursive methods on schedule "stagewise", joint otherwise."""
    if is_stagewise(method, schedule):
        return StagewiseTraining(train_previous)
    return JointTraining()


def _build_optimizer(optimizer: keras.optimizers.Optimizer, variables: list) -> None:
    """Builds an unbuilt optimizer for `variables` in their order, as Keras would on their first update and as
    it does when it loads a saved model (its slot variables are saved by position)."""
    if not optimizer.built:
        with keras.name_scope(optimizer.name, caller=optimizer):
            optimizer.build(variables)
        optimizer.built = True


@keras.saving.register_keras_serializable(package="tf_rmvae")
class RecursiveMixtureTrainer(keras.layers.Layer):
    """Trains a `RecursiveMixtureEncoder` and the decoder beside it by RME or a baseline (module docstring).

    A layer only to hold the line search's state (saved with the model that owns it); it has no `call`.

    Example (a user's VAE; see README.md for the whole model):

        self.encoder = tf_rmvae.RecursiveMixtureEncoder(latent_dim=8, max_components=3)
        self.rme = tf_rmvae.RecursiveMixtureTrainer(self.encoder, method="rme")
        ...
        def train_step(self, x):
            with tf.GradientTape(persistent=True) as tape:
                terms = self.rme.terms(x, self.log_likelihood)
                losses = self.rme.losses(terms, self.optimizer)
            self.rme.apply_gradients(tape, losses, self.optimizer, self.trainable_variables)
            self.rme.after_step(terms)

    Args:
      encoder: the `RecursiveMixtureEncoder` to train; the method configures its mixing (`configure_mixing`).
      method: "rme" (default), "vae", "mixture" or "boosting".
      lambda_kl: RME's KL weight lambda (>= 0); the default 1 relies on the cap `max_log_ratio`.
      max_log_ratio: cap (>= 0) of each sample's `log h - log q_prev` in the RME criterion's KL term (default 5 nats;
        None: uncapped); boosting's residual ELBO has the same unbounded reward and gets the same cap. The uncapped
        KL reward is unbounded above and lets a new component run off (see `objectives.rme_criterion`).
      schedule: "stagewise" (default, the paper's recursion) or "sweep" (all components every step).
      train_previous: stage-wise only: keep training earlier components on their own criteria (default True;
        False freezes them, which needs an encoder with `shared_trunk=False`).
      num_samples: reparameterised samples per component per step (S); 0 (default, "auto"): 5 for RME on
        importance-weighted component criteria, 1 otherwise (`choices.resolve_num_samples`).
      bound: what the decoder and the mixing proportions train on (and the line search scores): "elbo", the
        stratified mixture ELBO; "iw", the stratified importance-weighted bound
        (`objectives.stratified_importance_weighted_bound`), whose inactive slots draw extra samples from the
        active components (`method="vae"` with `num_samples=k` is IWAE); "auto" (default): "iw" for method "rme",
        "elbo" otherwise (`choices.resolve_bound`). The paper's RME is `bound="elbo"`.
      component_bound: method "rme": the bound in each component's criterion, "elbo" (the paper's
        `ELBO(h_m) + lambda KL`) or "iw", the importance-weighted bound of `h_m` over every sample drawn from it
        (`objectives.rme_importance_weighted_criterion`); "auto" (default): "iw" for RME on the "iw" bound, "elbo"
        otherwise (`choices.resolve_component_bound`).
      eps_grid: candidate mixing proportions for the line search (stage-wise recursive methods).
      eps_search_every: steps between line searches.
      boosting_entropy_weight: c in boosting's residual ELBO.
      noise_seed: seed of the training noise (`training_noise`): each step draws it statelessly from
        `(noise_seed, step)` for the whole global batch, so a run is reproducible and resumes with the same noise.
      encoder_gradient: how the encoder's importance-weighted objective is differentiated: "reparam" or "dreg",
        doubly reparameterised (`objectives.doubly_reparameterized_log_mean_exp`), for method "vae" on the "iw"
        bound (IWAE-DReG), for RME's components on `component_bound="iw"`, and for method "mixture" on the "iw"
        bound (its components on the stratified bound's DReG, `objectives.stratified_importance_weighted_dreg`);
        "gdreg" for method "mixture" on the "iw" bound: the generalized DReG
        (`objectives.stratified_importance_weighted_gdreg`, through the step's one backward pass through the
        decoder: `gradients`); "auto" (default): "dreg" for RME on importance-weighted component criteria,
        "reparam" otherwise (`choices.resolve_encoder_gradient`).
      encoder_groups: method "vae" on the "iw" bound: G > 1 trains the encoder on MIWAE(G, S / G) while the decoder
        trains on IWAE(S) (PIWAE, Rainforth et al. 2018); 1 (default): the encoder on the model's bound.

    The defaults are the recommended model's (`config.DEFAULTS`, the "default" preset; `TRAINING_DEFAULTS`). The
    trainer holds, and saves, every "auto" setting resolved.
    """

    def __init__(
        self,
        encoder: RecursiveMixtureEncoder,
        method: str = TRAINING_DEFAULTS["method"],
        lambda_kl: float = TRAINING_DEFAULTS["lambda_kl"],
        max_log_ratio: float | None = TRAINING_DEFAULTS["max_log_ratio"],
        schedule: str = TRAINING_DEFAULTS["schedule"],
        train_previous: bool = TRAINING_DEFAULTS["train_previous"],
        num_samples: int = TRAINING_DEFAULTS["num_samples"],
        bound: str = TRAINING_DEFAULTS["bound"],
        eps_grid=TRAINING_DEFAULTS["eps_grid"],
        eps_search_every: int = TRAINING_DEFAULTS["eps_search_every"],
        boosting_entropy_weight: float = TRAINING_DEFAULTS["boosting_entropy_weight"],
        noise_seed: int = TRAINING_DEFAULTS["noise_seed"],
        component_bound: str = TRAINING_DEFAULTS["component_bound"],
        encoder_gradient: str = TRAINING_DEFAULTS["encoder_gradient"],
        encoder_groups: int = TRAINING_DEFAULTS["encoder_groups"],
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(encoder, RecursiveMixtureEncoder):
            raise TypeError(f"encoder must be a RecursiveMixtureEncoder; got {type(encoder).__name__}.")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}; got {schedule!r}.")
        if not np.isfinite(lambda_kl) or lambda_kl < 0:
            raise ValueError(f"lambda_kl must be a finite number >= 0; got {lambda_kl}.")
        if max_log_ratio is not None and not max_log_ratio >= 0:  # the trainer's "negative = uncapped" is its own
            raise ValueError(f"max_log_ratio must be a number >= 0, or None for uncapped; got {max_log_ratio}.")
        if bound not in BOUND_SETTINGS:
            raise ValueError(f"bound must be one of {BOUND_SETTINGS}; got {bound!r}.")
        if component_bound not in BOUND_SETTINGS:
            raise ValueError(f"component_bound must be one of {BOUND_SETTINGS}; got {component_bound!r}.")
        if int(num_samples) < 0 or int(eps_search_every) < 1:
            raise ValueError("num_samples must be >= 1 (or 0 for auto) and eps_search_every >= 1.")
        # "auto" settings: what they mean for this model, as `RunConfig.resolved` resolves them.
        num_samples = resolve_num_samples(method, bound, component_bound, int(num_samples))
        component_bound = resolve_component_bound(method, bound, component_bound)
        bound = resolve_bound(method, bound)
        problem = encoder_objective_problem(
            method, bound, component_bound, int(num_samples), encoder_gradient, int(encoder_groups))
        if problem:
            raise ValueError(problem)
        if method == "vae" and encoder.max_components != 1:
            raise ValueError(
                f"method='vae' needs an encoder with max_components=1; got {encoder.max_components}.")
        if not train_previous and encoder.shared_trunk and adds_components(method, schedule, encoder.max_components):
            raise ValueError(
                "train_previous=False freezes earlier components, but on a shared trunk their common trunk keeps "
                "training on the newest component's criterion: build the encoder with shared_trunk=False.")
        eps_grid = tuple(float(e) for e in eps_grid)
        mixing.eps_to_logit(eps_grid)  # validates the range
        self.encoder = encoder
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
        self.noise_seed = int(noise_seed)
        self.component_bound = component_bound
        # "auto" is what it means for this model (as `RunConfig` resolves it), so the criterion and the saved config
        # name the estimator that trains.
        self.encoder_gradient = resolve_encoder_gradient(method, bound, component_bound, encoder_gradient)
        self.encoder_groups = int(encoder_groups)
        self.criterion = objectives.component_criterion(
            method, lambda_kl=self.lambda_kl, max_log_ratio=self.max_log_ratio,
            boosting_entropy_weight=self.boosting_entropy_weight, component_bound=component_bound,
            encoder_gradient=self.encoder_gradient, encoder_groups=self.encoder_groups,
        )
        self.component_training = component_training(method, schedule, self.train_previous)
        self.component_training.configure(encoder)

    # ------------------------------------------------------------------ state
    def build(self, input_shape=None):
        candidates = len(self.eps_grid) + 1
        self.eps_search_scores = self.add_weight(
            name="eps_search_scores", shape=(candidates,), initializer="zeros", trainable=False,
            aggregation="only_first_replica",
        )
        self.eps_search_steps = self.add_weight(
            name="eps_search_steps", shape=(), dtype="int32", initializer="zeros", trainable=False,
            aggregation="only_first_replica",
        )

    def ensure_built(self, input_shape=None) -> None:
        """Builds the encoder for inputs `input_shape` (if given) and the line search's state, eagerly."""
        if input_shape is not None:
            self.encoder.ensure_built(tuple(input_shape))
        if not self.built:
            with tf.init_scope():  # also from inside a traced step
                self.build()
            self.built = True

    # ------------------------------------------------------------------ per-batch terms
    def training_noise(self, x: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
        """`[S, B, M, D]` standard normal noise: this replica's slice of a stateless draw for the global batch
        from `(noise_seed, step)`. A run is reproducible, a resumed run repeats it, N replicas match one."""
        batch = tf.shape(x)[0]
        offset, global_batch = replica_batch_layout(batch)
        shape = [self.num_samples, global_batch, self.encoder.max_components, self.encoder.latent_dim]
        seed = tf.stack([tf.constant(self.noise_seed, tf.int64), tf.cast(step, tf.int64)])
        noise = tf.random.stateless_normal(shape, seed)
        return tf.gather(noise, offset + tf.range(batch), axis=1)

    def terms(
        self,
        x: tf.Tensor,
        log_likelihood_fn: LogLikelihoodFn,
        num_samples: int | None = None,
        noise: tf.Tensor | None = None,
        example_weight: tf.Tensor | None = None,
    ) -> MixtureTerms:
        """Every objective's per-example terms on one batch `x [B, ...]`.

        Args:
          x: images `[B, ...]`.
          log_likelihood_fn: `log p(x | z)`, `(x [B, ...], z [S, B, M, D]) -> [S, B, M]`.
          num_samples: S (default `num_samples`) when `noise` is None (noise is then drawn statefully).
          noise: `[S, B, M, D]` standard normal noise (e.g. `training_noise`).
          example_weight: `[B]` weights of the examples (default 1; 0 leaves an example out of every loss).
        """
        self.ensure_built(x.shape)
        if example_weight is None:
            example_weight = tf.ones([tf.shape(x)[0]])
        log_w, loc, scale, offsets = self.encoder.compute_parameters(x, return_logit_offsets=True)
        if noise is None:
            noise = tf.random.normal(tf.concat([[num_samples or self.num_samples], tf.shape(loc)], 0))
        if self.bound == "iw":  # inactive slots draw from active components (see `mixing.slot_sources`)
            sources = mixing.slot_sources(self.encoder.max_components, self.encoder.num_active_components)
            z = tf.gather(loc, sources, axis=1) + tf.gather(scale, sources, axis=1) * noise  # [S, B, M, D]
        else:
            sources = tf.range(self.encoder.max_components)
            z = loc + scale * noise  # [S, B, M, D], reparameterised sample of every component
        entropy = tfd.Independent(tfd.Normal(loc, scale), reinterpreted_batch_ndims=1).entropy()  # [B, M]
        log_h = pairwise_log_prob(loc, scale, z)  # [S, B, M, M]: density of h_j at samples of h_i
        # The decoder's input and output pass `decoder_pass.switch`: `gradients` takes both losses' gradients with
        # one backward pass through the decoder; elsewhere the terms differentiate as usual.
        transported = transported_samples(loc, scale, z) if self.criterion.reads_transports else None
        decoder_route = decoder_pass.route(x, z, log_likelihood_fn, transported)
        log_px_z = decoder_route.log_likelihood_used  # [S, B, M]
        log_joint = log_px_z + standard_normal_log_prob(z)
        log_q = objectives.mixture_log_density(log_h, log_w)
        elbo = objectives.stratified_mixture_elbo(log_joint, log_q, log_w)
        reconstruction = objectives.weighted_sum(tf.reduce_mean(log_px_z, 0), log_w)
        if self.bound == "iw":
            bound = objectives.stratified_importance_weighted_bound(
                log_joint, log_q, mixing.slot_log_weights(log_w, sources))
        else:
            bound = elbo
        return MixtureTerms(
            bound=bound, elbo=elbo, reconstruction=reconstruction, kl=reconstruction - elbo,
            criterion=self._criteria(z, loc, scale, log_joint, log_h, entropy, offsets, sources, log_w,
                                     decoder_route),
            log_weights=log_w,
            entropy=entropy, log_joint=log_joint, log_h=log_h, example_weight=example_weight,
            logit_offsets=offsets, decoder_route=decoder_route,
        )

    def _criteria(self, z, loc, scale, log_joint, log_h, entropy, logit_offsets, sources, log_w,
                  decoder_route) -> tf.Tensor:
        """`[B, M]` criterion of every component (against the fixed mixture of the components before it).
        `sources [M]`: the component each slot's samples come from; `log_w [B, M]`: the mixture's log-weights;
        `decoder_route`: the step's decoder call (`decoder_pass.route`)."""
        if not self.criterion.trains_components:
            return self.criterion(log_joint, tf.linalg.diag_part(log_h))
        # q_{m-1} is held fixed: its parameters get no gradient, the samples z do; so are the components' own
        # densities in the doubly reparameterised estimators.
        log_h_fixed = pairwise_log_prob(tf.stop_gradient(loc), tf.stop_gradient(scale), z)
        sources = sources if self.criterion.uses_sources else None  # None: every slot is its own component's
        log_h_self_fixed = objectives.own_log_density(log_h_fixed, sources)
        if self.criterion.reads_mixture:  # a jointly trained mixture: every slot draws from its own component
            mixture = objectives.MixtureDensities(
                log_h_fixed, pairwise_log_prob(loc, scale, tf.stop_gradient(z)), log_w)
            if not self.criterion.reads_transports:
                return self.criterion(log_joint, tf.linalg.diag_part(log_h), mixture=mixture)
            moved = decoder_route.transported_latents  # [S, B, M, M, D]
            transported = objectives.TransportedDensities(
                decoder_route.transported_log_likelihood + standard_normal_log_prob(moved),
                transported_log_prob(tf.stop_gradient(loc), tf.stop_gradient(scale), moved))
            return self.criterion(log_joint, tf.linalg.diag_part(log_h), mixture=mixture, transported=transported)
        if not self.criterion.recursive:
            return self.criterion(log_joint, tf.linalg.diag_part(log_h), log_h_self_fixed=log_h_self_fixed)
        logits = tf.convert_to_tensor(self.encoder.mixing_logits)
        if self.encoder.per_example_proportions:
            logits = logits + logit_offsets  # [B, M]: each example's own earlier mixtures
        # Each slot's own density, the criteria's only route into the components' parameters besides z: computed
        # alone, its gradient skips the pairwise log_h's M - 1 other pairs per sample.
        log_h_self, log_q_previous = objectives.criterion_log_densities(
            log_h, log_h_fixed, tf.stop_gradient(logits), sources, log_h_self=own_log_prob(loc, scale, z, sources))
        return self.criterion(log_joint, log_h_self, log_q_previous, entropy, sources=sources,
                              log_h_self_fixed=log_h_self_fixed)

    def newest(self, per_component: tf.Tensor) -> tf.Tensor:
        """Picks the newest active component's column of `[..., M]`."""
        newest = tf.convert_to_tensor(self.encoder.num_active_components) - 1
        return tf.gather(per_component, newest, axis=-1)

    def trained_components(self) -> tf.Tensor:
        """`[M]` bool: which components the criteria train this step."""
        active = tf.convert_to_tensor(self.encoder.num_active_components)
        return self.component_training.trained_components(active, self.encoder.max_components)

    # ------------------------------------------------------------------ one step
    def losses(self, terms: MixtureTerms, optimizer: keras.optimizers.Optimizer | None = None) -> Losses:
        """The step's losses (call under the tape), scaled as `optimizer` expects (mixed precision)."""
        scale = optimizer.scale_loss if optimizer is not None else (lambda loss: loss)
        weight = terms.example_weight  # 0 for skipped (non-finite) examples
        global_batch = tf.cast(replica_batch_layout(tf.shape(weight)[0])[1], tf.float32)
        mixture = scale(-tf.reduce_sum(weight * terms.bound) / global_batch)
        if not self.criterion.trains_components:
            return Losses(mixture, None)
        criteria = tf.where(self.trained_components(), terms.criterion, 0.0) * weight[:, None]
        return Losses(mixture, scale(-tf.reduce_sum(criteria) / global_batch), terms.decoder_route)

    def gradient_routes(self, losses: Losses, variables: list) -> list[tuple[tf.Tensor, list]]:
        """`[(loss, variables)]`: which loss trains which of the model's trainable `variables`. The mixture's
        bound trains the decoder (every variable outside the encoder) and learned proportions; the component
        networks train on their criteria, or on the bound too when the method has none. (`gradients` takes them
        with one backward pass through the decoder; each loss's own gradient for its variables is the same, except
        for the generalized DReG: its decoder terms along the other transports come from `gradients` only.)"""
        if losses.components is None:
            return [(losses.mixture, list(variables))]
        networks = self.encoder.networks.trainable_variables
        proportions = self.encoder.mixing.trainable_variables
        encoder_ids = {id(v) for v in networks + proportions}
        decoder = [v for v in variables if id(v) not in encoder_ids]
        return [(losses.mixture, decoder + proportions), (losses.components, networks)]

    def gradients(self, tape: tf.GradientTape, losses: Losses, variables: list) -> list[tuple]:
        """`[(gradient, variable)]`: each loss's gradient for its variables (`gradient_routes`), from a persistent
        `tape`. With two losses, one backward pass through the decoder gives both (`decoder_pass.gradients`:
        the decoder's cotangent floored where the bound gives a sample no weight, below the decoder's rounding).
        `variables`: the model's trainable variables."""
        routes = self.gradient_routes(losses, variables)
        if len(routes) == 1:
            (loss, route), = routes
            return list(zip(tape.gradient(loss, route), route))
        (mixture, decoder), (components, networks) = routes
        decoder_gradients, network_gradients = decoder_pass.gradients(
            tape, mixture, components, losses.decoder_route, decoder, networks,
            floor=decoder_pass.cotangent_floor(self.compute_dtype))
        return list(zip(decoder_gradients + network_gradients, decoder + networks))

    def apply_gradients(
        self, tape: tf.GradientTape, losses: Losses, optimizer: keras.optimizers.Optimizer, variables: list
    ) -> None:
        """Applies `gradients` (a persistent tape); frozen components keep their values. `variables`: the model's
        trainable variables."""
        _build_optimizer(optimizer, variables)
        gradients = self.gradients(tape, losses, variables)
        with self._frozen_components():
            optimizer.apply_gradients(gradients)

    @contextlib.contextmanager
    def _frozen_components(self):
        """Restores frozen components' slices after the optimizer step (Adam's momentum would move them)."""
        if not self.component_training.freezes:
            yield
            return
        trained = self.trained_components()
        variables = self.encoder.component_variables
        backup = [tf.identity(tf.convert_to_tensor(v)) for v in variables]
        yield
        for variable, old in zip(variables, backup):
            mask = tf.reshape(trained, [-1] + [1] * (len(variable.shape) - 1))
            variable.assign(tf.where(mask, tf.convert_to_tensor(variable), old))

    def after_step(self, terms: MixtureTerms) -> None:
        """After the optimizer step: the line search of the newest eps (stage-wise schedule)."""
        if self.component_training.line_search:
            self._line_search_step(terms)

    def _line_search_step(self, terms: MixtureTerms) -> None:
        """Accumulates the mixture's bound for every candidate eps of the newest component; every
        `eps_search_every` steps sets eps to the best candidate (the current value is a candidate)."""
        encoder = self.encoder
        active = tf.convert_to_tensor(encoder.num_active_components)
        logits = tf.convert_to_tensor(encoder.mixing_logits)
        newest = tf.equal(tf.range(encoder.max_components), active - 1)
        current = tf.reduce_sum(tf.where(newest, logits, 0.0))
        candidates = tf.concat([current[None], tf.constant(mixing.eps_to_logit(self.eps_grid))], 0)
        scores = objectives.line_search_scores(
            tf.stop_gradient(terms.log_joint), tf.stop_gradient(terms.log_h), logits, active, candidates,
            terms.example_weight, bound=self.bound,
            logit_offsets=tf.stop_gradient(terms.logit_offsets) if encoder.per_example_proportions else None,
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

    # ------------------------------------------------------------------ between steps
    def add_component(self) -> int:
        """Activates the next component (eps = 0, copy initialisation) and restarts the line-search
        statistics."""
        if not self.component_training.adds_components:
            raise ValueError(f"method={self.method!r}, schedule={self.schedule!r} does not add components.")
        active = self.encoder.add_component(0.0)
        self.ensure_built()
        self.eps_search_scores.assign(tf.zeros_like(self.eps_search_scores))
        self.eps_search_steps.assign(0)
        return active

    # ------------------------------------------------------------------ serialization
    def get_config(self):
        config = super().get_config()
        config.update(
            encoder=keras.saving.serialize_keras_object(self.encoder),
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
            noise_seed=self.noise_seed,
            component_bound=self.component_bound,
            encoder_gradient=self.encoder_gradient,
            encoder_groups=self.encoder_groups,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = {**LEGACY_ARGUMENTS, **config}
        config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
        return cls(**config)
