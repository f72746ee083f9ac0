"""Objectives of recursive mixture estimation: pure functions of log-densities and weights.

Shape conventions: `S` samples per component, `B` examples, `M` component slots, `K` importance samples.
`log_joint[s, b, i] = log p(x_b, z_sbi)` for `z_sbi ~ h_i(z | x_b)`;
`log_h[s, b, i, j] = log h_j(z_sbi | x_b)` (the density of component j at a sample drawn from component i);
log-weights are `[B, M]` or `[M]`. Nothing here holds model state, so each objective can be tested against
closed forms. The per-component criteria of the training methods are small callables
(`component_criterion(method, ...)` picks one).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar, NamedTuple

import tensorflow as tf

from tf_rmvae import mixing
from tf_rmvae.choices import BOUNDS


def mixture_log_density(log_h: tf.Tensor, log_weights: tf.Tensor) -> tf.Tensor:
    """`log q(z_i) = logsumexp_j [log w_j + log h_j(z_i)]`.

    Args:
      log_h: `[..., M_i, M_j]` component log-densities at samples from component i.
      log_weights: log-weights broadcastable to `[..., M_j]` (e.g. `[B, M]` with `log_h` of shape
        `[S, B, M, M]`).

    Returns:
      `[..., M_i]` mixture log-density at each component's samples.
    """
    return tf.reduce_logsumexp(log_h + log_weights[..., None, :], axis=-1)


def weighted_sum(per_component: tf.Tensor, log_weights: tf.Tensor) -> tf.Tensor:
    """`sum_i w_i f_i` over the last axis; exactly-zero weights contribute exactly zero (even if f is inf)."""
    weights = tf.exp(log_weights)
    return tf.reduce_sum(tf.where(weights > 0, weights * per_component, 0.0), axis=-1)


def stratified_mixture_elbo(log_joint: tf.Tensor, log_q: tf.Tensor, log_weights: tf.Tensor) -> tf.Tensor:
    """Stratified ELBO of a mixture: `sum_i w_i E_{h_i}[log p(x, z) - log q(z | x)]`.

    Args:
      log_joint: `[S, B, M]` `log p(x, z)` at each component's samples.
      log_q: `[S, B, M]` mixture log-density at the same samples (see `mixture_log_density`).
      log_weights: `[B, M]` mixture log-weights.

    Returns:
      `[B]` per-example ELBO.
    """
    per_component = tf.reduce_mean(log_joint - log_q, axis=0)
    return weighted_sum(per_component, log_weights)


def stratified_importance_weighted_bound(
    log_joint: tf.Tensor, log_q: tf.Tensor, log_slot_weights: tf.Tensor
) -> tf.Tensor:
    """Stratified importance-weighted (multiple importance sampling) bound of a mixture.

    `log (1/S) sum_s sum_i v_i p(x, z_si) / q(z_si | x)` with `z_si` drawn from the component that feeds slot
    i and `v_i` the slot's weight: the component's mixture weight divided by the number of slots drawing from
    it (see `mixing.slot_log_weights`). Its expectation is `p(x)`, so its log is a lower bound on `log p(x)`;
    by Jensen it is at least the stratified ELBO on the same samples. With one component and `S = k` samples
    it is the IWAE bound (Burda et al., 2016).

    Args:
      log_joint: `[S, B, M]` `log p(x, z)` at each slot's samples (or `[S, ..., M]`).
      log_q: `[S, B, M]` mixture log-density at the same samples.
      log_slot_weights: `[B, M]` (or broadcastable) slot log-weights; a sum over slots of their exponentials
        is 1.

    Returns:
      `[B]` (`[...]`) per-example bound.
    """
    num_samples = tf.cast(tf.shape(log_joint)[0], log_joint.dtype)
    log_terms = log_slot_weights + log_joint - log_q  # [S, ..., M]
    return tf.reduce_logsumexp(tf.reduce_logsumexp(log_terms, axis=-1), axis=0) - tf.math.log(num_samples)


class MixtureDensities(NamedTuple):
    """What the doubly reparameterised gradient of a mixture proposal reads besides `log p(x, z)` (shapes as in the
    module docstring)."""

    log_h_fixed: tf.Tensor  # [S, B, M, M] log h_j(z_si), the components' parameters stopped (z not)
    log_h_at_fixed_samples: tf.Tensor  # [S, B, M, M] log h_j(z_si), the samples stopped (the parameters not)
    log_weights: tf.Tensor  # [B, M] (or [M]) mixture log-weights (their gradient is stopped here)


def stratified_importance_weighted_dreg(log_joint: tf.Tensor, densities: MixtureDensities) -> tf.Tensor:
    """The stratified importance-weighted bound of a mixture proposal (`stratified_importance_weighted_bound`, each
    slot drawing from its own component) with a doubly reparameterised gradient for the components' parameters.

    With `w_si = a_i p(x, z_si) / q(z_si)`, `W_si = w_si / sum w` (normalised over the S M samples),
    `q = sum_k a_k h_k`, `r_k(z) = a_k h_k(z) / q(z)` (k's responsibility) and `z_si = T_i(e_si; phi_i)`
    reparameterised, the ordinary gradient of the bound for component k's parameters `phi_k` is

        sum_si W_si [ d log w_si / dz . dz_si / dphi_k  -  r_k(z_si) d log h_k(z_si) / dphi_k |_z ].

    The second (score) term of each sample of k's own stratum (i = k) is replaced by its reparameterised equivalent,
    `E_{h_k}[F(z) d log h_k / dphi_k] = E_{h_k}[dF/dz . dz/dphi_k]` with `F = W_sk r_k` (the other samples fixed):
    `dW_sk/dz = W_sk (1 - W_sk) d log w_sk / dz`, so the estimator is

        sum_s [ W_sk (1 - (1 - W_sk) r_k(z_sk)) d log w_sk / dz  -  W_sk d r_k(z_sk) / dz ] . dz_sk / dphi_k
          -  sum_{s, i != k} W_si r_k(z_si) d log h_k(z_si) / dphi_k |_z

    (all z-derivatives at fixed parameters). It is unbiased for the bound's gradient; with one component (r = 1) it is
    DReG (`doubly_reparameterized_log_mean_exp`). The other strata's terms keep their exact partial derivative; their
    reparameterised equivalent (Bauer & Mnih 2021) needs the decoder's z-gradient at a sample of stratum i along
    component k's transport: `stratified_importance_weighted_gdreg`. Only the decoder reads `log_joint`
    here through the samples' own paths, so the step's one backward pass serves this gradient too. The mixture weights
    get no gradient from it (stopped): they and the decoder train on the bound's ordinary gradient.

    Args:
      log_joint: `[S, B, M]` `log p(x, z_si)` at each component's samples (reparameterised).
      densities: `MixtureDensities` at the same samples.

    Returns:
      `[B]` the bound (its value), with the gradient above.
    """
    own, weights, responsibility, bound = _own_strata(log_joint, densities)
    # Exact partials at fixed z for the other components: d log q / dphi minus the own component's share.
    log_q_at_samples = mixture_log_density(densities.log_h_at_fixed_samples, tf.stop_gradient(densities.log_weights))
    others = log_q_at_samples - tf.stop_gradient(responsibility) * tf.linalg.diag_part(
        densities.log_h_at_fixed_samples)
    surrogate = tf.reduce_sum(own - weights * others, axis=[0, 2])
    return with_gradient_of(bound, surrogate)


def _own_strata(log_joint: tf.Tensor, densities: MixtureDensities) -> tuple[tf.Tensor, ...]:
    """What both mixture DReG estimators share: `(own, W, r, bound)`, the surrogate terms of each sample along its
    own component's path (`[S, B, M]`, `stratified_importance_weighted_dreg`'s first sum), the normalised weights
    `W_si` (stopped), each sample's own responsibility `r_i(z_si)` (parameters stopped) and the bound's value `[B]`."""
    log_w = tf.stop_gradient(densities.log_weights)
    log_q = mixture_log_density(densities.log_h_fixed, log_w)  # [S, B, M], q's parameters stopped
    log_ratio = log_w + log_joint - log_q  # log w_si
    log_total = tf.reduce_logsumexp(log_ratio, axis=[0, 2], keepdims=True)
    weights = tf.stop_gradient(tf.exp(log_ratio - log_total))  # W_si
    # r_i(z_si): each sample's own component's responsibility, the parameters stopped (so a function of z only).
    responsibility = tf.exp(log_w + tf.linalg.diag_part(densities.log_h_fixed) - log_q)
    own = tf.stop_gradient(weights * (1.0 - (1.0 - weights) * responsibility)) * log_ratio - weights * responsibility
    num_samples = tf.cast(tf.shape(log_joint)[0], log_joint.dtype)
    bound = tf.squeeze(log_total, axis=[0, 2]) - tf.math.log(num_samples)
    return own, weights, responsibility, bound


class TransportedDensities(NamedTuple):
    """What the generalized DReG (`stratified_importance_weighted_gdreg`) reads at each sample moved along every
    component's transport: `Z_sik = T_k(T_k^-1(z_si); phi_k)`, the value `z_si`, the derivative k's (for a Gaussian
    `h_k = N(mu_k, sigma_k^2)`: `mu_k + sigma_k * stop((z_si - mu_k) / sigma_k)`)."""

    log_joint: tf.Tensor  # [S, B, M, M] log p(x, Z_sik): value log p(x, z_si), gradient along k's transport
    log_h_fixed: tf.Tensor  # [S, B, M, M, M] log h_j(Z_sik), the components' parameters stopped


def stratified_importance_weighted_gdreg(
    log_joint: tf.Tensor, densities: MixtureDensities, transported: TransportedDensities
) -> tf.Tensor:
    """The stratified importance-weighted bound of a mixture proposal with the generalized doubly reparameterised
    gradient for the components' parameters: every score term reparameterised, the other strata's too.

    `stratified_importance_weighted_dreg` (its notation) reparameterises the score terms of each component's own
    stratum. A sample `z_si` of another stratum (i != k) contributes `-W_si r_k(z_si) d log h_k(z_si) / dphi_k |_z`.
    With `F = W_si r_k` (the other samples fixed), a change of measure to `h_k` and the reparameterisation identity
    under `h_k` (the generalized DReG of Bauer & Mnih, ICML 2021) give the same expectation as

        -[ dF/dz + F (d log h_i / dz - d log h_k / dz) ] . v_k(z_si),    dF/dz = r_k W_si (1 - W_si) d log w_si / dz
                                                                                + W_si d r_k / dz,

    with `v_k(z) = dT_k / dphi_k` at `T_k^-1(z)`: the velocity of k's transport at `z_si` (all z-derivatives at fixed
    parameters). The estimator is unbiased for the bound's gradient; every term is a path derivative, so it vanishes
    on every draw where every component is the posterior, as DReG's does for an exact proposal (where only the
    mixture is, the other strata's terms stay: zero in expectation). `transported.log_joint` carries the decoder's
    z-gradient at `z_si` along `v_k`: `tf_rmvae.models.decoder_pass` routes it from the step's one backward pass
    through the decoder (differentiating `log p(x, Z_sik)` by autodiff gives the same gradient, at M decoder calls
    per sample). The mixture weights get no gradient from it (stopped).

    Args:
      log_joint: `[S, B, M]` `log p(x, z_si)` at each component's samples (reparameterised).
      densities: `MixtureDensities` at the same samples.
      transported: `TransportedDensities` of the same samples.

    Returns:
      `[B]` the bound (its value), with the gradient above.
    """
    own, weights, _, bound = _own_strata(log_joint, densities)
    # Along k's transport (last axis k): log w_si, r_k and log h_i - log h_k at Z_sik, the parameters stopped.
    log_h_route = transported.log_h_fixed  # [S, B, i, k, j]
    log_w_route = tf.stop_gradient(densities.log_weights)[..., None, :]  # [(B,) 1, k]
    log_q_route = mixture_log_density(log_h_route, log_w_route)  # [S, B, i, k]
    log_ratio_route = transported.log_joint - log_q_route  # log w_si up to the constant log a_i
    routes = tf.shape(log_q_route)[-1]
    log_h_k = tf.linalg.diag_part(log_h_route)  # [S, B, i, k]: h_k at Z_sik
    log_h_i = tf.linalg.diag_part(tf.transpose(log_h_route, [0, 1, 3, 2, 4]))  # [S, B, k, i]: h_i at Z_sik
    log_h_i = tf.transpose(log_h_i, [0, 1, 3, 2])
    r_route = tf.exp(log_w_route + log_h_k - log_q_route)  # r_k(Z_sik)
    w, r = weights[..., None], tf.stop_gradient(r_route)
    route = (tf.stop_gradient(r * w * (1.0 - w)) * log_ratio_route + w * r_route
             + tf.stop_gradient(w * r) * (log_h_i - log_h_k))
    other = 1.0 - tf.eye(routes, dtype=route.dtype)  # i != k: the own stratum's terms are in `own`
    surrogate = tf.reduce_sum(own, axis=[0, 2]) - tf.reduce_sum(route * other, axis=[0, 2, 3])
    return with_gradient_of(bound, surrogate)


def elbo(log_joint: tf.Tensor, log_q: tf.Tensor) -> tf.Tensor:
    """Monte Carlo ELBO `E_q[log p(x, z) - log q(z)]` over the leading sample axis: `[S, ...] -> [...]`."""
    return tf.reduce_mean(log_joint - log_q, axis=0)


def doubly_reparameterized_log_mean_exp(log_ratio_fixed: tf.Tensor, axis: int = 0) -> tf.Tensor:
    """The importance-weighted bound `log mean_k exp r_k` with the doubly reparameterised gradient (DReG; Tucker,
    Lawson, Gu & Maddison, ICLR 2019).

    `r_k = log p(x, z_k) - log q(z_k)` with q's parameters stopped by the caller and `z_k` reparameterised, so the
    only route to the encoder is through the samples. The value is the bound; the gradient is
    `sum_k w_k^2 dr_k` with `w` the normalised importance weights (stopped): unbiased for the encoder's IWAE
    gradient and free of its score term, whose signal-to-noise ratio falls as k grows. With one sample it is the
    "sticking the landing" gradient (Roeder et al., 2017). Not a gradient for the decoder: train it on the bound.

    Args:
      log_ratio_fixed: `[..., K, ...]` log importance weights, K along `axis`.

    Returns:
      The bound, `log_ratio_fixed`'s shape without `axis`.
    """
    log_norm = tf.reduce_logsumexp(log_ratio_fixed, axis=axis, keepdims=True)
    weights = tf.stop_gradient(tf.exp(log_ratio_fixed - log_norm))
    surrogate = tf.reduce_sum(tf.square(weights) * log_ratio_fixed, axis=axis)
    return with_gradient_of(log_mean_exp(log_ratio_fixed, axis), surrogate)


def with_gradient_of(value: tf.Tensor, surrogate: tf.Tensor) -> tf.Tensor:
    """`value` forward, `surrogate`'s gradient backward (a gradient estimator's usual form)."""
    return tf.stop_gradient(value) + surrogate - tf.stop_gradient(surrogate)


def grouped_importance_weighted_bound(log_ratio: tf.Tensor, groups: int, dreg: bool = False) -> tf.Tensor:
    """MIWAE(G, K / G) (Rainforth et al., ICML 2018): the mean over G groups of the importance-weighted bound of
    each group's K / G samples; G = 1 is IWAE's bound, G = K the ELBO. PIWAE trains its encoder on it.

    Args:
      log_ratio: `[K, ...]` log importance weights (q's parameters stopped where `dreg`).
      groups: G.
      dreg: the gradient of `doubly_reparameterized_log_mean_exp` in every group.

    Returns:
      `[...]` the bound; where K (known when traced) is not a multiple of G, as by a call with another number of
      samples than training's, the bound over all K in one group.
    """
    if log_ratio.shape[0] is not None and log_ratio.shape[0] % groups:
        groups = 1
    shape = tf.shape(log_ratio)
    grouped = tf.reshape(log_ratio, tf.concat([[groups, shape[0] // groups], shape[1:]], 0))
    per_group = doubly_reparameterized_log_mean_exp(grouped, 1) if dreg else log_mean_exp(grouped, 1)
    return tf.reduce_mean(per_group, axis=0)


def capped_log_ratio(log_h_self: tf.Tensor, log_q_previous: tf.Tensor, max_log_ratio: float | None) -> tf.Tensor:
    """Each sample's `log h(z) - log q_prev(z)`, capped at `max_log_ratio` (None: uncapped); why the cap: see
    `rme_criterion`. Shapes as the inputs'."""
    log_ratio = log_h_self - log_q_previous
    if max_log_ratio is not None:
        log_ratio = tf.minimum(log_ratio, max_log_ratio)
    return log_ratio


def rme_criterion(
    log_joint: tf.Tensor,
    log_h_self: tf.Tensor,
    log_q_previous: tf.Tensor,
    lambda_kl: float,
    max_log_ratio: float | None = None,
) -> tf.Tensor:
    """RME criterion of a new component: `ELBO(h) + lambda * KL(h || q_prev)` by Monte Carlo.

    `E_h[log p(x,z) - log h(z)] + lambda * E_h[log h(z) - log q_prev(z)]`, with z ~ h reparameterised. The
    caller stops gradients into q_prev's parameters (not into z). Equal to
    `E_h[log p] - lambda E_h[log q_prev] + (1 - lambda) H(h)`: at lambda = 1 the entropy of h drops out and h
    may collapse to a point.

    The KL reward is unbounded: along a latent direction where q_prev has variance `s^2 < lambda` and the
    decoder does not bind z, `log p(x, z) - lambda log q_prev(z)` grows like `(lambda / s^2 - 1) z^2 / 2`, so
    h runs off to infinity. `max_log_ratio` caps each sample's `log h(z) - log q_prev(z)` (no reward, and no
    gradient, beyond it).

    Args:
      log_joint, log_h_self, log_q_previous: `[S, ...]` at samples of h.
      lambda_kl: weight of the KL term (>= 0).
      max_log_ratio: cap of the per-sample log-ratio in the KL term, or None for the plain criterion.

    Returns:
      `[...]` criterion (to be maximised).
    """
    log_ratio = capped_log_ratio(log_h_self, log_q_previous, max_log_ratio)
    return tf.reduce_mean(log_joint - log_h_self + lambda_kl * log_ratio, axis=0)


def rme_importance_weighted_criterion(
    log_joint: tf.Tensor,
    log_h_self: tf.Tensor,
    log_q_previous: tf.Tensor,
    sources: tf.Tensor,
    lambda_kl: float,
    max_log_ratio: float | None = None,
    log_h_self_fixed: tf.Tensor | None = None,
) -> tf.Tensor:
    """RME criterion with the component's importance-weighted bound in place of its ELBO:
    `log (1/n) sum_j p(x, z_j) / h(z_j) + lambda * KL(h || q_prev)` over the `n` samples of `h`.

    The samples of component m are those of every slot drawing from it (`mixing.slot_sources`): with one
    active component of M slots and S samples per slot, its criterion is the IWAE bound with k = M S samples
    (Burda et al., 2016);
    with every slot its own component and one sample each, it is `rme_criterion`. The KL term is the capped
    estimate of `rme_criterion` averaged over the same samples.

    Args:
      log_joint, log_h_self, log_q_previous: `[S, B, M]` per slot, at the slot's samples (the densities of
        the slot's source component; `criterion_log_densities(..., sources)`).
      sources: `[M]` int, the component each slot draws from.
      lambda_kl, max_log_ratio: as for `rme_criterion`.
      log_h_self_fixed: optional `log_h_self` with the components' parameters stopped: the bound then takes the
        doubly reparameterised gradient (`doubly_reparameterized_log_mean_exp` over each component's pooled
        samples); the KL term keeps its reparameterised gradient.

    Returns:
      `[B, M]` each component's criterion (to be maximised); a component no slot draws from gets its slot's
      `rme_criterion` (it is inactive and not trained).
    """
    num_slots = log_joint.shape[-1]
    member = tf.equal(sources[:, None], tf.range(num_slots)[None, :])  # [M slots, M components]
    count = tf.reduce_sum(tf.cast(member, log_joint.dtype), axis=0)  # [M] samples' slots per component
    # n: the samples of each component, S per slot drawing from it (at least 1: no log 0 for unused ones).
    pooled = tf.cast(tf.shape(log_joint)[0], log_joint.dtype) * tf.maximum(count, 1.0)  # [M]
    log_ratio = log_joint - (log_h_self if log_h_self_fixed is None else log_h_self_fixed)  # [S, B, M slots]
    # log sum over the S samples of each slot, then over the slots of each component.
    per_slot = tf.reduce_logsumexp(log_ratio, axis=0)  # [B, M slots]
    # Other components' slots masked with a finite value (defensive: no -inf - -inf in an all-masked column).
    masked = tf.where(member, per_slot[..., :, None], tf.constant(-1e30, log_joint.dtype))  # [B, M, M]
    log_sum = tf.reduce_logsumexp(masked, axis=-2)  # [B, M components]
    bound = log_sum - tf.math.log(pooled)
    if log_h_self_fixed is not None:  # DReG: sum over the pool of (normalised weight)^2 * log ratio
        weights = tf.stop_gradient(tf.exp(log_ratio - tf.gather(log_sum, sources, axis=-1)))  # [S, B, M slots]
        surrogate = pooled_sum(tf.reduce_sum(tf.square(weights) * log_ratio, axis=0), member)
        bound = with_gradient_of(bound, surrogate)
    capped = capped_log_ratio(log_h_self, log_q_previous, max_log_ratio)
    kl = pooled_sum(tf.reduce_sum(capped, axis=0), member) / pooled  # [B, M]
    own = rme_criterion(log_joint, log_h_self, log_q_previous, lambda_kl, max_log_ratio)
    return tf.where(count > 0, bound + lambda_kl * kl, own)


def pooled_sum(per_slot: tf.Tensor, member: tf.Tensor) -> tf.Tensor:
    """`[..., M slots]` -> `[..., M components]`: each component's sum over the slots that draw from it
    (`member [M slots, M components]` bool)."""
    return tf.reduce_sum(tf.where(member, per_slot[..., :, None], 0.0), axis=-2)


def boosting_criterion(
    log_joint: tf.Tensor,
    log_h_self: tf.Tensor,
    log_q_previous: tf.Tensor,
    entropy: tf.Tensor,
    entropy_weight: float,
    max_log_ratio: float | None = None,
) -> tf.Tensor:
    """Residual ELBO of boosting VI (Locatello et al., 2018): `E_h[log p(x,z) - log q_prev(z)] + c H(h)`.

    The entropy of the new component (closed form, `[...]`) replaces RME's KL to the current mixture. Written
    as `E_h[log p - log h + (log h - log q_prev)] + c H(h)`, i.e. RME's criterion at lambda = 1 plus `c H(h)`,
    so its reward for leaving q_prev is unbounded in the same way; `max_log_ratio` caps the per-sample
    log-ratio as in `rme_criterion`.
    """
    log_ratio = capped_log_ratio(log_h_self, log_q_previous, max_log_ratio)
    return tf.reduce_mean(log_joint - log_h_self + log_ratio, axis=0) + entropy_weight * entropy


def criterion_log_densities(
    log_h: tf.Tensor,
    log_h_fixed: tf.Tensor,
    mixing_logits: tf.Tensor,
    sources: tf.Tensor | None = None,
    log_h_self: tf.Tensor | None = None,
) -> tuple[tf.Tensor, tf.Tensor]:
    """What every component's criterion compares at its own samples: `log h_m(z)` and `log q_{m-1}(z)`, the
    density of the mixture of the components before m.

    Args:
      log_h: `[S, B, M, M]` pairwise component log-densities (see the module docstring).
      log_h_fixed: the same with the gradient into the components' parameters stopped by the caller, so a
        criterion's gradient reaches `q_{m-1}` through z only.
      mixing_logits: `[M]` logits, or `[B, M]` per-example logits (gradient stopped by the caller).
      sources: optional `[M]` component each slot's samples come from (`mixing.slot_sources`); slot i then
        gets the densities of component `sources[i]`. Default: slot i draws from component i.
      log_h_self: optional `[S, B, M]` `own_log_density(log_h, sources)`, computed by the caller (then `log_h` is
        not read): a training step computes it from the slots' own components, whose gradient costs a fraction of
        the pairwise `log_h`'s (M times fewer pairs).

    Returns:
      `(log_h_self, log_q_previous)`, `[S, B, M]` each, per slot. Component 0 has no mixture before it: its
      slots' `log_q_previous` is its own density, so its KL term vanishes and its criterion is its own bound.
    """
    previous_log_w = mixing.prefix_log_weights(mixing_logits)  # [(B,) M, M]: row m holds q_{m-1}'s weights
    if log_h_self is None:
        log_h_self = own_log_density(log_h, sources)
    if sources is None:
        sources = tf.range(log_h.shape[-1])
    else:  # slot i compares against q_{c-1}, c = sources[i], at its own samples
        previous_log_w = tf.gather(previous_log_w, sources, axis=-2)
    log_q_previous = tf.reduce_logsumexp(log_h_fixed + previous_log_w, axis=-1)
    return log_h_self, tf.where(sources >= 1, log_q_previous, log_h_self)


def own_log_density(log_h: tf.Tensor, sources: tf.Tensor | None = None) -> tf.Tensor:
    """`[S, B, M, M] -> [S, B, M]`: the density of each slot's source component at the slot's samples,
    `log h_{sources[i]}(z_i)` (default: slot i draws from component i, the diagonal)."""
    if sources is not None:
        log_h = tf.gather(log_h, sources, axis=-1)  # [..., i, k] = log h_{sources[k]}(z_i); the diagonal is wanted
    return tf.linalg.diag_part(log_h)


# ---------------------------------------------------------------------- per-component criteria
# Each maps `log_joint, log_h_self, log_q_previous [S, B, M]` (log p(x, z), log h_m(z) and log q_{m-1}(z) at
# the samples of component m), `entropy [B, M]` and `log_h_self_fixed [S, B, M]` (log h_m(z) with the components'
# parameters stopped: the doubly reparameterised estimators' input) to `[B, M]`. `recursive` says whether it
# compares each component with the fixed mixture before it; `trains_components` whether the component networks
# train on it (or on the mixture's own bound: it is then only reported); `uses_sources` whether it reads
# `sources [M]`, the component each slot's samples come from (the others get None: every slot is its own
# component's); `reads_mixture` whether it reads `mixture` (`MixtureDensities`: the whole mixture's densities).


@dataclasses.dataclass(frozen=True)
class ComponentELBO:
    """Each component's own ELBO `E_h[log p(x, z) - log h(z)]`; methods "vae" and "mixture" report it and
    train the components on the mixture's bound instead."""

    recursive: ClassVar[bool] = False
    trains_components: ClassVar[bool] = False
    uses_sources: ClassVar[bool] = False
    reads_mixture: ClassVar[bool] = False
    reads_transports: ClassVar[bool] = False

    def __call__(self, log_joint, log_h_self, log_q_previous=None, entropy=None, sources=None,
                 log_h_self_fixed=None) -> tf.Tensor:
        return elbo(log_joint, log_h_self)


@dataclasses.dataclass(frozen=True)
class ProposalBound:
    """A one-Gaussian model's encoder trained on its own importance-weighted objective while the decoder trains on
    the model's bound: MIWAE(`groups`, S / `groups`) (`grouped_importance_weighted_bound`; PIWAE where groups > 1),
    with the doubly reparameterised gradient where `dreg` (IWAE-DReG where groups = 1)."""

    groups: int = 1
    dreg: bool = False
    recursive: ClassVar[bool] = False
    trains_components: ClassVar[bool] = True
    uses_sources: ClassVar[bool] = False
    reads_mixture: ClassVar[bool] = False
    reads_transports: ClassVar[bool] = False

    def __call__(self, log_joint, log_h_self, log_q_previous=None, entropy=None, sources=None,
                 log_h_self_fixed=None) -> tf.Tensor:
        log_ratio = log_joint - (log_h_self_fixed if self.dreg else log_h_self)
        return grouped_importance_weighted_bound(log_ratio, self.groups, self.dreg)


@dataclasses.dataclass(frozen=True)
class RMECriterion:
    """RME: `ELBO(h_m) + lambda KL(h_m || q_{m-1})` with capped log-ratios (`rme_criterion`)."""

    lambda_kl: float
    max_log_ratio: float | None = None
    recursive: ClassVar[bool] = True
    trains_components: ClassVar[bool] = True
    uses_sources: ClassVar[bool] = False
    reads_mixture: ClassVar[bool] = False
    reads_transports: ClassVar[bool] = False

    def __call__(self, log_joint, log_h_self, log_q_previous, entropy=None, sources=None,
                 log_h_self_fixed=None) -> tf.Tensor:
        return rme_criterion(log_joint, log_h_self, log_q_previous, self.lambda_kl, self.max_log_ratio)


@dataclasses.dataclass(frozen=True)
class BoostingCriterion:
    """Boosting VI: the residual ELBO `boosting_criterion` for m >= 1, the ELBO for the first component."""

    entropy_weight: float = 1.0
    max_log_ratio: float | None = None
    recursive: ClassVar[bool] = True
    trains_components: ClassVar[bool] = True
    uses_sources: ClassVar[bool] = False
    reads_mixture: ClassVar[bool] = False
    reads_transports: ClassVar[bool] = False

    def __call__(self, log_joint, log_h_self, log_q_previous, entropy, sources=None,
                 log_h_self_fixed=None) -> tf.Tensor:
        has_previous = tf.range(log_joint.shape[-1]) >= 1
        residual = boosting_criterion(
            log_joint, log_h_self, log_q_previous, entropy, self.entropy_weight, self.max_log_ratio,
        )
        return tf.where(has_previous, residual, elbo(log_joint, log_h_self))


@dataclasses.dataclass(frozen=True)
class RMEImportanceWeightedCriterion:
    """RME with each component's importance-weighted bound over all the samples drawn from it in place of its
    ELBO (`rme_importance_weighted_criterion`): with one active component of M slots it is IWAE's bound. `dreg`:
    the bound's doubly reparameterised gradient."""

    lambda_kl: float
    max_log_ratio: float | None = None
    dreg: bool = False
    recursive: ClassVar[bool] = True
    trains_components: ClassVar[bool] = True
    uses_sources: ClassVar[bool] = True
    reads_mixture: ClassVar[bool] = False
    reads_transports: ClassVar[bool] = False

    def __call__(self, log_joint, log_h_self, log_q_previous, entropy=None, sources=None,
                 log_h_self_fixed=None) -> tf.Tensor:
        return rme_importance_weighted_criterion(
            log_joint, log_h_self, log_q_previous, sources, self.lambda_kl, self.max_log_ratio,
            log_h_self_fixed if self.dreg else None)


@dataclasses.dataclass(frozen=True)
class MixtureProposalBound:
    """A jointly trained mixture's components trained on the mixture's stratified importance-weighted bound with the
    doubly reparameterised gradient (`stratified_importance_weighted_dreg`; `generalized`: every stratum's score terms
    reparameterised, `stratified_importance_weighted_gdreg`) while the decoder and the proportions train on the
    bound's ordinary gradient. Each column's value is its component's own ELBO, as `ComponentELBO` reports it; the
    bound's gradient is shared evenly among the columns (they train as a sum)."""

    generalized: bool = False
    recursive: ClassVar[bool] = False
    trains_components: ClassVar[bool] = True
    uses_sources: ClassVar[bool] = False
    reads_mixture: ClassVar[bool] = True

    @property
    def reads_transports(self) -> bool:
        """Whether it reads `TransportedDensities` (the samples moved along every component's transport)."""
        return self.generalized

    def __call__(self, log_joint, log_h_self, log_q_previous=None, entropy=None, sources=None,
                 log_h_self_fixed=None, mixture: MixtureDensities | None = None,
                 transported: TransportedDensities | None = None) -> tf.Tensor:
        if self.generalized:
            bound = stratified_importance_weighted_gdreg(log_joint, mixture, transported)  # [B]
        else:
            bound = stratified_importance_weighted_dreg(log_joint, mixture)  # [B]
        share = (bound - tf.stop_gradient(bound)) / log_joint.shape[-1]  # 0, with the bound's gradient / M
        return tf.stop_gradient(elbo(log_joint, log_h_self)) + share[:, None]


Criterion = (ComponentELBO | ProposalBound | RMECriterion | RMEImportanceWeightedCriterion | BoostingCriterion
             | MixtureProposalBound)


def component_criterion(
    method: str,
    *,
    lambda_kl: float,
    max_log_ratio: float | None,
    boosting_entropy_weight: float,
    component_bound: str,
    encoder_gradient: str,
    encoder_groups: int,
) -> Criterion:
    """The per-component criterion of a training method: "rme", "boosting", or "vae"/"mixture" (own ELBO).

    `component_bound="iw"` (method "rme" only) puts each component's importance-weighted bound in place of
    its ELBO in the RME criterion (`RMEImportanceWeightedCriterion`). `encoder_gradient="dreg"` gives that bound
    (or, for method "vae", the encoder's importance-weighted bound: `ProposalBound`; for method "mixture", the
    mixture's stratified importance-weighted bound: `MixtureProposalBound`) the doubly reparameterised gradient,
    "gdreg" a mixture's bound its generalized DReG;
    `encoder_groups > 1` (method "vae") trains the encoder on MIWAE (PIWAE). The caller checks that the model trains
    on the "iw" bound where these need it (`choices.encoder_objective_problem`). Every setting is named:
    their defaults are the model's (`recursion.TRAINING_DEFAULTS`)."""
    if component_bound not in BOUNDS:
        raise ValueError(f"component_bound must be one of {BOUNDS}; got {component_bound!r}.")
    if component_bound == "iw" and method != "rme":
        raise ValueError(f"component_bound='iw' applies to method 'rme' only; got method {method!r}.")
    dreg = encoder_gradient in ("dreg", "gdreg")  # "gdreg": a mixture's only (choices.encoder_objective_problem)
    if method == "rme":
        if component_bound == "iw":
            return RMEImportanceWeightedCriterion(lambda_kl, max_log_ratio, dreg)
        return RMECriterion(lambda_kl, max_log_ratio)
    if method == "boosting":
        return BoostingCriterion(boosting_entropy_weight, max_log_ratio)
    if encoder_gradient == "gdreg" and method != "mixture":
        raise ValueError(f"encoder_gradient='gdreg' applies to method 'mixture' only; got method {method!r}.")
    if method == "mixture" and dreg:
        return MixtureProposalBound(generalized=encoder_gradient == "gdreg")
    if method == "vae" and (dreg or encoder_groups > 1):
        return ProposalBound(int(encoder_groups), dreg)
    if method in ("vae", "mixture"):
        return ComponentELBO()
    raise ValueError(f"Unknown method {method!r}.")


def log_mean_exp(log_values: tf.Tensor, axis: int = 0) -> tf.Tensor:
    """`log mean exp` along `axis`, stable."""
    count = tf.cast(tf.shape(log_values)[axis], log_values.dtype)
    return tf.reduce_logsumexp(log_values, axis=axis) - tf.math.log(count)


def importance_weighted_log_likelihood(
    log_importance_weights_fn: Callable[[tf.Tensor], tf.Tensor],
    iwae_samples: int,
    chunk_size: int = 100,
) -> tf.Tensor:
    """Importance-weighted estimate `log p(x) ~ logmeanexp_k [log p(x, z_k) - log q(z_k | x)]`, `z_k ~ q`.

    Samples are drawn in chunks so `K = 5000` fits in memory: the running log-sum-exp is carried through a
    `tf.while_loop`.

    Args:
      log_importance_weights_fn: maps a chunk size `C` (int32 scalar) to `[C, B]` log importance weights of
        fresh samples.
      iwae_samples: K >= 1 (a Python int or an int32 scalar tensor, e.g. a serving input).
      chunk_size: samples per chunk.

    Returns:
      `[B]` estimate of `log p(x)` (a stochastic lower bound, tight as K grows).
    """
    if isinstance(iwae_samples, int) and iwae_samples < 1 or isinstance(chunk_size, int) and chunk_size < 1:
        raise ValueError(f"iwae_samples and chunk_size must be >= 1; got {iwae_samples}, {chunk_size}.")
    iwae_samples = tf.convert_to_tensor(iwae_samples, tf.int32)
    positive = tf.debugging.assert_positive(iwae_samples, message="iwae_samples must be >= 1")
    with tf.control_dependencies([positive]):
        iwae_samples = tf.identity(iwae_samples)  # a tensor K < 1 (e.g. a serving input) fails here, not as NaN
    chunk_size = tf.minimum(tf.convert_to_tensor(chunk_size, tf.int32), iwae_samples)
    first = log_importance_weights_fn(chunk_size)
    total = tf.reduce_logsumexp(first, axis=0)

    def body(done, total):
        size = tf.minimum(chunk_size, iwae_samples - done)
        chunk = log_importance_weights_fn(size)
        total = tf.reduce_logsumexp(tf.stack([total, tf.reduce_logsumexp(chunk, axis=0)]), axis=0)
        return done + size, total

    _, total = tf.while_loop(lambda done, _: done < iwae_samples, body, (chunk_size, total))
    return total - tf.math.log(tf.cast(iwae_samples, total.dtype))


def candidate_mixture_log_density(
    log_h: tf.Tensor,
    mixing_logits: tf.Tensor,
    num_active: tf.Tensor,
    candidate_logits: tf.Tensor,
    logit_offsets: tf.Tensor | None = None,
) -> tf.Tensor:
    """`log q_k(z)` at every slot's samples for each candidate of the newest proportion eps_k: the
    `mixture_log_density` of each candidate's `mixing.candidate_log_weights`, up to rounding, as
    `q_k = (1 - eps_k) q_{k-1} + eps_k h_k`: the mixture before the newest component is summed once, not once per
    candidate (the line search scores G = 16 candidates every step).

    Args:
      log_h: `[S, B, M, M]` (see the module docstring).
      mixing_logits: `[M]` current logits; num_active: scalar k >= 1 (slot k - 1 is the newest component).
      candidate_logits: `[G]` logits of the candidate eps_k.
      logit_offsets: optional `[B, M]` per-example logit offsets (added to every candidate's logits).

    Returns:
      `[S, G, B, M]`.
    """
    mixing_logits = tf.convert_to_tensor(mixing_logits, tf.float32)
    newest = tf.cast(num_active, tf.int32) - 1
    logits = mixing_logits if logit_offsets is None else mixing_logits + logit_offsets  # [(B,) M]
    previous = mixture_log_density(log_h, mixing.recursive_log_weights(logits, newest))  # [S, B, M]: q_{k-1}
    log_keep, log_eps = mixing.candidate_join_log_proportions(candidate_logits, num_active, logit_offsets)
    log_keep, log_eps = log_keep[..., None], log_eps[..., None]  # [G, 1 or B, 1]
    own = tf.gather(log_h, newest, axis=-1)  # [S, B, M]: h_k at every slot's samples
    return tf.reduce_logsumexp(tf.stack([previous[:, None] + log_keep, own[:, None] + log_eps]), axis=0)


def line_search_scores(
    log_joint: tf.Tensor,
    log_h: tf.Tensor,
    mixing_logits: tf.Tensor,
    num_active: tf.Tensor,
    candidate_logits: tf.Tensor,
    example_weight: tf.Tensor | None = None,
    bound: str = "elbo",
    logit_offsets: tf.Tensor | None = None,
) -> tf.Tensor:
    """Mixture bound (batch mean) for each candidate value of the newest mixing proportion, components fixed.

    All candidates share the same samples (common random numbers), so their differences have low variance.

    Args:
      log_joint: `[S, B, M]`; log_h: `[S, B, M, M]` (see module docstring).
      mixing_logits: `[M]`; num_active: scalar k (slot k-1 is searched); candidate_logits: `[G]`.
      example_weight: optional `[B]` weights of the examples (0 for skipped ones).
      bound: "elbo" (the stratified ELBO) or "iw" (the stratified importance-weighted bound, slots allocated
        by `mixing.slot_sources`).
      logit_offsets: optional `[B, M]` per-example logit offsets (per-example proportions; see
        `mixing.candidate_log_weights`).

    Returns:
      `[G]` weighted batch mean of the bound of `q_k` under each candidate.
    """
    log_w = mixing.candidate_log_weights(mixing_logits, num_active, candidate_logits, logit_offsets)
    if logit_offsets is None:
        log_w = log_w[:, None, :]  # [G, 1, M]; with offsets [G, B, M]
    log_q = candidate_mixture_log_density(log_h, mixing_logits, num_active, candidate_logits, logit_offsets)
    if bound == "iw":
        log_v = mixing.slot_log_weights(log_w, mixing.slot_sources(tf.shape(log_w)[-1], num_active))
        scores = stratified_importance_weighted_bound(log_joint[:, None], log_q, log_v)  # [G, B]
    else:
        scores = stratified_mixture_elbo(log_joint[:, None], log_q, log_w)  # [G, B]
    if example_weight is None:
        return tf.reduce_mean(scores, axis=-1)
    return tf.reduce_sum(scores * example_weight, axis=-1) / tf.maximum(tf.reduce_sum(example_weight), 1.0)
