"""Gradient estimators against hand-computed gradients on a one-dimensional Gaussian model.

Model: `p(z) = N(0, 1)`, `p(x | z) = N(x; z, 1)`, proposal `q(z) = N(mu, sigma^2)`, samples `z_k = mu + sigma e_k`
for fixed noise `e_k`. With `r_k = log p(x, z_k) - log q(z_k)`, the path derivative of `r_k` at fixed proposal
parameters is `dr/dz = -z + (x - z) + (z - mu) / sigma^2`, and `dz/dmu = 1`, `dz/dsigma = e`. DReG's gradient is
`sum_k w_k^2 dr_k/dz dz_k/dtheta` (Tucker et al. 2019, eq. 6); at k = 1 it is the "sticking the landing" gradient
`dr/dz dz/dtheta` (Roeder et al. 2017).
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tf_rmvae import objectives

tfd = tfp.distributions
X = tf.constant(0.7, tf.float64)


def log_ratios(mu, sigma, noise, stop_proposal: bool):
    """`[K]` log importance weights; the proposal's density with its parameters stopped where `stop_proposal`."""
    z = mu + sigma * noise
    log_joint = tfd.Normal(tf.zeros_like(z), 1.0).log_prob(z) + tfd.Normal(z, 1.0).log_prob(X)
    q_mu, q_sigma = (tf.stop_gradient(mu), tf.stop_gradient(sigma)) if stop_proposal else (mu, sigma)
    return log_joint - tfd.Normal(q_mu, q_sigma).log_prob(z)


def hand_dreg(mu, sigma, noise):
    z = mu + sigma * noise
    log_r = log_ratios(tf.constant(mu, tf.float64), tf.constant(sigma, tf.float64), tf.constant(noise), False).numpy()
    w = np.exp(log_r - np.logaddexp.reduce(log_r))
    dr_dz = -z + (0.7 - z) + (z - mu) / sigma**2
    return np.sum(w**2 * dr_dz), np.sum(w**2 * dr_dz * noise)


def autodiff(fn, mu, sigma):
    mu, sigma = tf.Variable(mu, dtype=tf.float64), tf.Variable(sigma, dtype=tf.float64)
    with tf.GradientTape() as tape:
        value = fn(mu, sigma)
    return value, [tf.convert_to_tensor(g).numpy() for g in tape.gradient(value, [mu, sigma])]


@pytest.mark.parametrize("k", [1, 5])
def test_dreg_matches_hand_computed_gradient(k):
    noise = np.random.default_rng(k).normal(size=k).astype(np.float64)
    mu, sigma = 0.3, 0.8
    value, grads = autodiff(lambda m, s: objectives.doubly_reparameterized_log_mean_exp(
        log_ratios(m, s, noise, stop_proposal=True)), mu, sigma)
    np.testing.assert_allclose(grads, hand_dreg(mu, sigma, noise), rtol=1e-6, atol=1e-9)
    fixed = [tf.constant(v, tf.float64) for v in (mu, sigma)]
    plain = objectives.log_mean_exp(log_ratios(*fixed, noise, False))
    np.testing.assert_allclose(value.numpy(), plain.numpy(), rtol=1e-12)  # the value is the IWAE bound


def test_dreg_at_one_sample_is_sticking_the_landing():
    noise = np.array([0.4])
    mu, sigma = -0.2, 1.3
    _, dreg = autodiff(lambda m, s: objectives.doubly_reparameterized_log_mean_exp(
        log_ratios(m, s, noise, stop_proposal=True)), mu, sigma)
    _, stl = autodiff(lambda m, s: tf.reduce_sum(log_ratios(m, s, noise, stop_proposal=True)), mu, sigma)
    np.testing.assert_allclose(dreg, stl, rtol=1e-12)


def test_dreg_is_unbiased_for_the_iwae_gradient():
    """Mean over 20000 draws of k = 4 samples: DReG's gradient equals the ordinary IWAE gradient's (each within 4
    standard errors of their difference), and its variance is smaller."""
    rng = np.random.default_rng(0)
    noise = tf.constant(rng.normal(size=(4, 20000)))

    def per_draw(stop):
        # One copy of (mu, sigma) per draw: the gradient of the summed bounds is every draw's own gradient.
        mu, sigma = tf.Variable(tf.fill([20000], tf.constant(0.9, tf.float64))), tf.Variable(
            tf.fill([20000], tf.constant(0.6, tf.float64)))
        with tf.GradientTape() as tape:
            log_r = log_ratios(mu, sigma, noise, stop_proposal=stop)  # [4, N]
            bound = tf.reduce_sum(objectives.doubly_reparameterized_log_mean_exp(log_r) if stop
                                  else objectives.log_mean_exp(log_r))
        return np.stack([g.numpy() for g in tape.gradient(bound, [mu, sigma])], axis=-1)  # [N, 2]

    dreg, iwae = per_draw(True), per_draw(False)
    diff = dreg - iwae
    se = diff.std(axis=0) / np.sqrt(len(diff))
    assert np.all(np.abs(diff.mean(axis=0)) < 4 * se + 1e-4), (diff.mean(axis=0), se)
    assert np.all(dreg.var(axis=0) < iwae.var(axis=0))


def test_grouped_bound_is_miwae_and_its_dreg_gradient_per_group():
    rng = np.random.default_rng(3)
    noise = rng.normal(size=6)
    mu, sigma = 0.1, 0.9
    log_r = log_ratios(tf.constant(mu, tf.float64), tf.constant(sigma, tf.float64), noise, False).numpy()
    expected = np.mean([np.logaddexp.reduce(g) - np.log(3) for g in log_r.reshape(2, 3)])
    value = objectives.grouped_importance_weighted_bound(tf.constant(log_r), 2)
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-12)
    _, grads = autodiff(lambda m, s: objectives.grouped_importance_weighted_bound(
        log_ratios(m, s, noise, stop_proposal=True), 2, dreg=True), mu, sigma)
    by_group = np.mean([hand_dreg(mu, sigma, g) for g in noise.reshape(2, 3)], axis=0)
    np.testing.assert_allclose(grads, by_group, rtol=1e-6, atol=1e-9)


def test_rme_criterion_dreg_pools_each_components_samples():
    """The importance-weighted RME criterion with DReG: its value is unchanged, and the gradient of its bound part
    (lambda = 0) is DReG over each component's pooled slots (slots 0 and 2 draw from component 0, slot 1 from 1)."""
    rng = np.random.default_rng(5)
    noise = rng.normal(size=(2, 1, 3))  # [S, B, M slots]
    sources = tf.constant([0, 1, 0])
    mus, sigmas = np.array([0.2, -0.5, 0.0]), np.array([0.9, 1.1, 1.0])

    def criterion(mu, sigma, dreg):
        m, s = tf.gather(mu, sources), tf.gather(sigma, sources)
        z = m + s * noise
        log_joint = tfd.Normal(tf.zeros_like(z), 1.0).log_prob(z) + tfd.Normal(z, 1.0).log_prob(X)
        log_h = tfd.Normal(m, s).log_prob(z)
        log_h_fixed = tfd.Normal(tf.stop_gradient(m), tf.stop_gradient(s)).log_prob(z)
        return objectives.rme_importance_weighted_criterion(
            log_joint, log_h, log_h, sources, 0.0, None, log_h_fixed if dreg else None)

    plain, _ = autodiff(lambda m, s: criterion(m, s, False), mus, sigmas)
    value, grads = autodiff(lambda m, s: tf.reduce_sum(criterion(m, s, True)[:, :2]), mus, sigmas)
    np.testing.assert_allclose(value.numpy(), np.sum(plain.numpy()[:, :2]), rtol=1e-12)
    pool0 = noise[:, 0, [0, 2]].ravel()
    expected_mu = [hand_dreg(mus[0], sigmas[0], pool0)[0], hand_dreg(mus[1], sigmas[1], noise[:, 0, 1])[0], 0.0]
    expected_sigma = [hand_dreg(mus[0], sigmas[0], pool0)[1], hand_dreg(mus[1], sigmas[1], noise[:, 0, 1])[1], 0.0]
    np.testing.assert_allclose(grads[0], expected_mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(grads[1], expected_sigma, rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------------- a mixture proposal (stratified bound)
# Two components `h_k = N(mu_k, exp(rho_k)^2)` with learned proportions `a = softmax(logits)`, S samples of each,
# `z_sk = mu_k + exp(rho_k) e_sk`, and `p(x | z) = N(x; theta z, 1)`. Batch axis B: independent draws.
MIXTURE = dict(mu=np.array([0.1, 0.8]), rho=np.log([0.6, 0.9]), logits=np.array([0.2, -0.1]), theta=1.0)


def mixture_bounds(mu, rho, logits, theta, noise):
    """`(ordinary, dreg)`: `[B]` the stratified importance-weighted bound with its ordinary gradient, and with the
    doubly reparameterised one (`objectives.stratified_importance_weighted_dreg`). noise: `[S, B, 2]`."""
    sigma = tf.exp(rho)
    z = mu + sigma * noise  # [S, B, M]
    one = tf.constant(1.0, tf.float64)
    log_joint = tfd.Normal(tf.zeros_like(z), one).log_prob(z) + tfd.Normal(theta * z, one).log_prob(X)

    def pairwise(m, s, samples):  # [S, B, M_i, M_j]: log h_j(z_i)
        return tfd.Normal(m[..., None, :], s[..., None, :]).log_prob(samples[..., None])

    log_w = tf.broadcast_to(tf.nn.log_softmax(logits), tf.shape(log_joint)[1:])
    log_q = objectives.mixture_log_density(pairwise(mu, sigma, z), log_w)
    ordinary = objectives.stratified_importance_weighted_bound(log_joint, log_q, log_w)
    densities = objectives.MixtureDensities(pairwise(tf.stop_gradient(mu), tf.stop_gradient(sigma), z),
                                            pairwise(mu, sigma, tf.stop_gradient(z)), log_w)
    return ordinary, objectives.stratified_importance_weighted_dreg(log_joint, densities)


def hand_mixture_dreg(mu, rho, logits, theta, noise):
    """The estimator's gradient for `(mu, rho)` by hand (noise `[S, 2]`, one example): own strata reparameterised,
    other strata's exact partials (the formula in `stratified_importance_weighted_dreg`'s docstring)."""
    sigma = np.exp(rho)
    alpha = np.exp(logits - np.logaddexp.reduce(logits))
    z = mu + sigma * noise  # [S, M]
    log_h = -0.5 * np.log(2 * np.pi) - np.log(sigma) - (z[..., None] - mu) ** 2 / (2 * sigma**2)  # [S, i, j]
    log_q = np.logaddexp.reduce(np.log(alpha) + log_h, axis=-1)  # [S, i]
    r = np.exp(np.log(alpha) + log_h - log_q[..., None])  # [S, i, j] responsibility of j at z_si
    log_joint = -z**2 / 2 - (X.numpy() - theta * z) ** 2 / 2 - np.log(2 * np.pi)
    log_ratio = np.log(alpha) + log_joint - log_q
    w = np.exp(log_ratio - np.logaddexp.reduce(log_ratio.ravel()))  # [S, i]
    dlog_h = -(z[..., None] - mu) / sigma**2  # [S, i, j] d log h_j / dz at z_si
    dlog_q = np.sum(r * dlog_h, axis=-1)
    dlog_ratio = -z + theta * (X.numpy() - theta * z) - dlog_q
    own_r = np.einsum("sii->si", r)
    dr_own = own_r * (np.einsum("sii->si", dlog_h) - dlog_q)
    along_own_path = w * (1 - (1 - w) * own_r) * dlog_ratio - w * dr_own  # [S, k]
    grad_mu, grad_rho = along_own_path.sum(0), (along_own_path * (z - mu)).sum(0)
    for k in range(2):
        for i in range(2):
            if i != k:  # d log h_k(z_si) / d(mu_k, rho_k) at fixed z, weighted by W_si r_k(z_si)
                u = (z[:, i] - mu[k]) / sigma[k]
                grad_mu[k] -= np.sum(w[:, i] * r[:, i, k] * u / sigma[k])
                grad_rho[k] -= np.sum(w[:, i] * r[:, i, k] * (u**2 - 1))
    return grad_mu, grad_rho


def mixture_gdreg(mu, rho, logits, theta, noise):
    """`[B]` the same bound with the generalized DReG (`objectives.stratified_importance_weighted_gdreg`), the
    likelihood differentiated along every component's transport by autodiff (here it is a closed form)."""
    sigma = tf.exp(rho)
    z = mu + sigma * noise  # [S, B, M]
    one = tf.constant(1.0, tf.float64)

    def log_joint_at(samples):
        return tfd.Normal(tf.zeros_like(samples), one).log_prob(samples) + tfd.Normal(theta * samples, one).log_prob(X)

    def pairwise(m, s, samples):  # [..., M_j]: log h_j at each sample
        return tfd.Normal(m[..., None, :], s[..., None, :]).log_prob(samples[..., None])

    fixed_mu, fixed_sigma = tf.stop_gradient(mu), tf.stop_gradient(sigma)
    log_w = tf.broadcast_to(tf.nn.log_softmax(logits), tf.shape(z)[1:])
    densities = objectives.MixtureDensities(pairwise(fixed_mu, fixed_sigma, z),
                                            pairwise(mu, sigma, tf.stop_gradient(z)), log_w)
    # Z_sik: z_si moved along k's transport (value z_si).
    transported = mu[..., None, :] + sigma[..., None, :] * tf.stop_gradient(
        (z[..., None] - mu[..., None, :]) / sigma[..., None, :])  # [S, B, i, k]
    routes = objectives.TransportedDensities(
        log_joint_at(transported), pairwise(fixed_mu[..., None, :], fixed_sigma[..., None, :], transported))
    return objectives.stratified_importance_weighted_gdreg(log_joint_at(z), densities, routes)


def hand_mixture_gdreg(mu, rho, logits, theta, noise):
    """The generalized DReG's gradient for `(mu, rho)` by hand (noise `[S, 2]`, one example): the own strata as in
    `hand_mixture_dreg`, each other stratum's score term replaced by
    `-[r_k W (1 - W) dlog w/dz + W dr_k/dz + W r_k (dlog h_i/dz - dlog h_k/dz)] v_k`, `v_k = (1, z - mu_k)` for
    `(mu_k, rho_k)`."""
    sigma = np.exp(rho)
    alpha = np.exp(logits - np.logaddexp.reduce(logits))
    z = mu + sigma * noise  # [S, M]
    log_h = -0.5 * np.log(2 * np.pi) - np.log(sigma) - (z[..., None] - mu) ** 2 / (2 * sigma**2)  # [S, i, j]
    log_q = np.logaddexp.reduce(np.log(alpha) + log_h, axis=-1)
    r = np.exp(np.log(alpha) + log_h - log_q[..., None])  # [S, i, j]
    log_joint = -z**2 / 2 - (X.numpy() - theta * z) ** 2 / 2 - np.log(2 * np.pi)
    log_ratio = np.log(alpha) + log_joint - log_q
    w = np.exp(log_ratio - np.logaddexp.reduce(log_ratio.ravel()))  # [S, i]
    dlog_h = -(z[..., None] - mu) / sigma**2  # [S, i, j]
    dlog_q = np.sum(r * dlog_h, axis=-1)
    dlog_ratio = -z + theta * (X.numpy() - theta * z) - dlog_q
    own_r = np.einsum("sii->si", r)
    dr_own = own_r * (np.einsum("sii->si", dlog_h) - dlog_q)
    along_own_path = w * (1 - (1 - w) * own_r) * dlog_ratio - w * dr_own
    grad_mu, grad_rho = along_own_path.sum(0), (along_own_path * (z - mu)).sum(0)
    for k in range(2):
        for i in range(2):
            if i != k:
                dr_k = r[:, i, k] * (dlog_h[:, i, k] - dlog_q[:, i])
                coefficient = (r[:, i, k] * w[:, i] * (1 - w[:, i]) * dlog_ratio[:, i] + w[:, i] * dr_k
                               + w[:, i] * r[:, i, k] * (dlog_h[:, i, i] - dlog_h[:, i, k]))
                grad_mu[k] -= np.sum(coefficient)
                grad_rho[k] -= np.sum(coefficient * (z[:, i] - mu[k]))
    return grad_mu, grad_rho


@pytest.mark.parametrize("estimator, seed, samples", [("dreg", 7, 2), ("gdreg", 7, 3), ("gdreg", 11, 3)])
def test_mixture_dreg_matches_hand_computed_gradient(estimator, seed, samples):
    """The partial and the generalized DReG of the stratified bound against their hand-computed gradients (one
    example, M = 2); the value is the bound; each differs from the estimator it refines."""
    noise = np.random.default_rng(seed).normal(size=(samples, 1, 2))
    variables = [tf.Variable(MIXTURE[name]) for name in ("mu", "rho", "logits")]
    with tf.GradientTape(persistent=True) as tape:
        ordinary, partial = mixture_bounds(*variables, MIXTURE["theta"], noise)
        estimate = partial if estimator == "dreg" else mixture_gdreg(*variables, MIXTURE["theta"], noise)
    np.testing.assert_allclose(estimate.numpy(), ordinary.numpy(), rtol=1e-12)  # the value is the bound
    grad_mu, grad_rho, grad_logits = tape.gradient(estimate, variables)
    hand = hand_mixture_dreg if estimator == "dreg" else hand_mixture_gdreg
    expected_mu, expected_rho = hand(*(MIXTURE[n] for n in ("mu", "rho", "logits", "theta")), noise[:, 0])
    np.testing.assert_allclose(grad_mu.numpy(), expected_mu, rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(grad_rho.numpy(), expected_rho, rtol=1e-5, atol=1e-9)
    assert grad_logits is None  # the proportions train on the bound's own gradient
    refined = tape.gradient(ordinary if estimator == "dreg" else partial, variables[0])
    assert not np.allclose(grad_mu.numpy(), refined.numpy(), rtol=1e-3)  # not the estimator it refines


def test_mixture_gdreg_vanishes_where_every_component_is_the_posterior():
    """Where every component is the posterior (a conjugate model: p(z | x) = N(x / 2, 1 / 2) for theta = 1), every
    importance weight is equal and the generalized DReG is exactly zero on every draw, as DReG is for an exact
    proposal; the partial estimator's exact partials of the other strata are not. (Where only the mixture is the
    posterior, the other strata's terms stay, zero in expectation only.)"""
    posterior = dict(mu=np.array([0.35, 0.35]), rho=np.log([np.sqrt(0.5)] * 2))
    noise = np.random.default_rng(3).normal(size=(4, 5, 2))
    variables = [tf.Variable(posterior["mu"]), tf.Variable(posterior["rho"])]
    logits = tf.constant(MIXTURE["logits"])
    with tf.GradientTape(persistent=True) as tape:
        gdreg = tf.reduce_sum(mixture_gdreg(*variables, logits, 1.0, noise))
        dreg = tf.reduce_sum(mixture_bounds(*variables, logits, 1.0, noise)[1])
    for gradient in tape.gradient(gdreg, variables):
        np.testing.assert_allclose(gradient.numpy(), 0.0, atol=1e-12)
    assert max(np.abs(g.numpy()).max() for g in tape.gradient(dreg, variables)) > 1e-3

def hand_gdreg_one_example(mu, sigma, alpha, noise, x, a_matrix):
    """The generalized DReG's gradient for `(mu, log sigma)` `[M, D]` by hand, one example of the model
    `p(z) = N(0, I)`, `p(x | z) = N(x; A z, I)`, proportions `alpha [M]`, noise `[S, M, D]`."""
    m = len(alpha)
    z = mu + sigma * noise  # [S, M, D]

    def log_h(j, v):
        return np.sum(-0.5 * np.log(2 * np.pi) - np.log(sigma[j]) - (v - mu[j]) ** 2 / (2 * sigma[j] ** 2), -1)

    def dlog_h(j, v):
        return -(v - mu[j]) / sigma[j] ** 2

    def log_q(v):
        return np.logaddexp.reduce([np.log(alpha[j]) + log_h(j, v) for j in range(m)], axis=0)

    def resp(j, v):
        return np.exp(np.log(alpha[j]) + log_h(j, v) - log_q(v))[..., None]

    def dlog_q(v):
        return sum(resp(j, v) * dlog_h(j, v) for j in range(m))

    def log_p(v):
        return -0.5 * np.sum(v**2 + (x - v @ a_matrix.T) ** 2, -1)

    log_ratio = np.stack([np.log(alpha[i]) + log_p(z[:, i]) - log_q(z[:, i]) for i in range(m)], 1)  # [S, M]
    weights = np.exp(log_ratio - np.logaddexp.reduce(log_ratio.ravel()))[..., None]
    grad_mu, grad_rho = np.zeros_like(mu), np.zeros_like(mu)
    for k in range(m):
        for i in range(m):
            v, w = z[:, i], weights[:, i]
            dlog_w = -v + (x - v @ a_matrix.T) @ a_matrix - dlog_q(v)
            dr_k = resp(k, v) * (dlog_h(k, v) - dlog_q(v))
            score = resp(k, v) * w * (1 - w) * dlog_w + w * dr_k  # d(W r_k)/dz
            if i == k:  # the path term and the own stratum's score term, along k's own samples
                coefficient = w * dlog_w - score
            else:
                coefficient = -(score + w * resp(k, v) * (dlog_h(i, v) - dlog_h(k, v)))
            grad_mu[k] += coefficient.sum(0)
            grad_rho[k] += (coefficient * (v - mu[k])).sum(0)
    return grad_mu, grad_rho


def test_mixture_gdreg_on_the_models_transports_matches_a_hand_computed_gradient():
    """Three two-dimensional components with per-example proportions, `p(x | z) = N(x; A z, I)`, the samples moved by
    the model's own `transported_samples` and `transported_log_prob`: the gradient for every (mu, log sigma) is the
    hand-computed one (own strata as `hand_mixture_dreg`, the others as `hand_mixture_gdreg`)."""
    from tf_rmvae.models.recursion import pairwise_log_prob, transported_log_prob, transported_samples

    rng = np.random.default_rng(0)
    samples, batch, m, d = 3, 2, 3, 2
    a_matrix, x = np.array([[1.0, 0.4], [-0.3, 0.8]]), np.array([[0.7, -0.2], [0.1, 0.5]])  # [D, D], [B, D]
    mu0, rho0 = rng.normal(size=(batch, m, d)) * 0.6, rng.normal(size=(batch, m, d)) * 0.3 - 0.3
    log_w = np.log(rng.dirichlet(np.ones(m), size=batch))  # [B, M]: each example its own proportions
    noise = rng.normal(size=(samples, batch, m, d))

    def log_joint(z):  # z [S, B, M, (K,) D]
        x_b = tf.reshape(tf.constant(x), [1, batch] + [1] * (len(z.shape) - 3) + [d])
        mean = tf.einsum("ed,...d->...e", tf.constant(a_matrix), z)
        return -0.5 * tf.reduce_sum(z**2 + (x_b - mean) ** 2, -1) - d * np.log(2 * np.pi)

    mu, rho = tf.Variable(mu0), tf.Variable(rho0)
    with tf.GradientTape() as tape:
        scale = tf.exp(rho)
        z = mu + scale * noise
        fixed_mu, fixed_scale = tf.stop_gradient(mu), tf.stop_gradient(scale)
        densities = objectives.MixtureDensities(pairwise_log_prob(fixed_mu, fixed_scale, z),
                                                pairwise_log_prob(mu, scale, tf.stop_gradient(z)), tf.constant(log_w))
        moved = transported_samples(mu, scale, z)
        routes = objectives.TransportedDensities(log_joint(moved), transported_log_prob(fixed_mu, fixed_scale, moved))
        bound = tf.reduce_sum(objectives.stratified_importance_weighted_gdreg(log_joint(z), densities, routes))
    grad_mu, grad_rho = (g.numpy() for g in tape.gradient(bound, [mu, rho]))

    expected = [hand_gdreg_one_example(mu0[b], np.exp(rho0[b]), np.exp(log_w[b]), noise[:, b], x[b], a_matrix)
                for b in range(batch)]
    expected_mu, expected_rho = (np.stack([e[n] for e in expected]) for n in (0, 1))
    np.testing.assert_allclose(grad_mu, expected_mu, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(grad_rho, expected_rho, rtol=1e-7, atol=1e-12)

def test_mixture_dreg_at_one_component_is_dreg():
    """With all the weight on one component (the other's proportion 0) the estimator is DReG of IWAE for it."""
    noise = np.random.default_rng(2).normal(size=(4, 1, 2))
    mu, rho = tf.Variable(MIXTURE["mu"]), tf.Variable(MIXTURE["rho"])
    with tf.GradientTape() as tape:
        _, dreg = mixture_bounds(mu, rho, tf.constant([0.0, -np.inf], tf.float64), 1.0, noise)
    grad_mu, grad_rho = tape.gradient(dreg, [mu, rho])
    expected = hand_dreg(MIXTURE["mu"][0], np.exp(MIXTURE["rho"][0]), noise[:, 0, 0])
    np.testing.assert_allclose([grad_mu[0], grad_rho[0] / np.exp(MIXTURE["rho"][0])], expected, rtol=1e-6)


@pytest.mark.parametrize("samples, mu, scales", [
    (2, (0.1, 0.8), (0.6, 0.9)),  # components on either side of the posterior N(0.35, 0.5)
    (5, (0.3, 0.35), (0.5, 0.9)),  # overlapping components, more samples
])
@pytest.mark.parametrize("estimator", ["dreg", "gdreg"])
def test_mixture_dreg_is_unbiased_with_lower_variance(samples, mu, scales, estimator):
    """20000 seeded draws: the mean DReG (partial or generalized) gradient of every component parameter is the mean
    reparameterised gradient of the same bound (the mean difference within 4 standard errors), and its variance is
    at most 0.8 of it."""
    draws = 20000
    noise = tf.constant(np.random.default_rng(0).normal(size=(samples, draws, 2)))

    def per_draw(which):
        # One copy of (mu, rho) per draw: the gradient of the summed bounds is every draw's own gradient.
        mu_, rho_ = tf.Variable(np.tile(mu, (draws, 1))), tf.Variable(np.tile(np.log(scales), (draws, 1)))
        logits = tf.constant(MIXTURE["logits"])
        with tf.GradientTape() as tape:
            if which == "gdreg":
                bound = tf.reduce_sum(mixture_gdreg(mu_, rho_, logits, 1.0, noise))
            else:
                bound = tf.reduce_sum(mixture_bounds(mu_, rho_, logits, 1.0, noise)[which == "dreg"])
        return np.concatenate([g.numpy() for g in tape.gradient(bound, [mu_, rho_])], axis=-1)  # [N, 4]

    reparam, dreg = per_draw("reparam"), per_draw(estimator)
    diff = dreg - reparam
    se = diff.std(axis=0) / np.sqrt(draws)
    assert np.all(np.abs(diff.mean(axis=0)) < 4 * se), (diff.mean(axis=0), se)
    assert np.all(dreg.var(axis=0) < 0.8 * reparam.var(axis=0)), (dreg.var(axis=0), reparam.var(axis=0))


# ---------------------------------------------------------------------- in the model
def step_gradients(model, x, noise):
    """`[(gradient, is an encoder variable)]` of one training step's routed losses (`RecursiveMixtureTrainer`), in
    the order of the model's trainable variables."""
    with tf.GradientTape(persistent=True) as tape:
        terms = model.terms(x, noise=noise)
        losses = model.rme.losses(terms)
    grads = {}
    for loss, variables in model.rme.gradient_routes(losses, model.trainable_variables):
        grads.update({id(v): g for v, g in zip(variables, tape.gradient(loss, variables))})
    encoder = {id(v) for v in model.encoder.trainable_variables}
    return [(grads[id(v)], id(v) in encoder) for v in model.trainable_variables if id(v) in grads]


def twin_models(**kwargs):
    """Two tiny models with the same weights, the first with the ordinary gradient, the second with `kwargs` (e.g.
    another encoder gradient)."""
    from tests.helpers import tiny_model

    models = []
    for extra in ({"encoder_gradient": "reparam"}, kwargs):
        base = {k: v for k, v in kwargs.items() if k not in ("encoder_gradient", "encoder_groups")}
        model = tiny_model(hidden=16, latent_dim=4, **{**base, **extra})
        model.ensure_built((None, 28, 28, 1))
        models.append(model)
    models[1].set_weights(models[0].get_weights())
    return models


@pytest.mark.parametrize("settings", [
    dict(method="vae", bound="iw", num_samples=4, encoder_gradient="dreg"),
    dict(method="vae", bound="iw", num_samples=4, encoder_groups=2),
    dict(method="rme", components=2, bound="iw", component_bound="iw", num_samples=3, lambda_kl=1.0,
         encoder_gradient="dreg"),
    dict(method="mixture", components=3, bound="iw", num_samples=3, encoder_gradient="dreg"),
])
def test_encoder_estimators_change_the_encoder_gradient_only(settings):
    """IWAE-DReG, PIWAE, RME-DReG and the mixture's DReG: the decoder's gradient is the ordinary gradient of the
    model's bound, the encoder's differs; the reported bound is unchanged."""
    from tests.helpers import mnist_digits

    plain, other = twin_models(**settings)
    x = tf.constant(mnist_digits(8))
    if settings["method"] == "rme":
        for model in (plain, other):
            model.add_component()
            model.encoder.mixing_logits.assign([0.0, 0.0])
    noise = tf.random.stateless_normal([settings["num_samples"], 8, plain.encoder.max_components, 4], [1, 2])
    grads_plain, grads_other = step_gradients(plain, x, noise), step_gradients(other, x, noise)
    np.testing.assert_allclose(plain.terms(x, noise=noise).bound, other.terms(x, noise=noise).bound, rtol=1e-6)
    assert len(grads_plain) == len(grads_other) and not all(encoder for _, encoder in grads_other)
    differs = []
    for (mine, encoder), (theirs, _) in zip(grads_other, grads_plain):
        if encoder:
            differs.append(not np.allclose(mine, theirs, rtol=1e-3, atol=1e-6))
        else:
            np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-7)
    assert any(differs)


def test_mixture_dreg_keeps_the_proportions_ordinary_gradient():
    """A jointly trained mixture with DReG: its learned proportions and its decoder get exactly the ordinary gradient
    of the bound on the same draws; its component networks do not; the reported criterion (each component's own
    ELBO) is unchanged."""
    from tests.helpers import mnist_digits

    settings = dict(method="mixture", components=3, bound="iw", num_samples=3, encoder_gradient="dreg")
    plain, dreg = twin_models(**settings)
    x = tf.constant(mnist_digits(8))
    noise = tf.random.stateless_normal([3, 8, 3, 4], [3, 4])
    by_variable = [{id(v): g for v, (g, _) in zip(model.trainable_variables, step_gradients(model, x, noise))}
                   for model in (plain, dreg)]
    mixing = {id(v) for v in dreg.encoder.mixing.trainable_variables}
    networks = {id(v) for v in dreg.encoder.networks.trainable_variables}
    assert mixing and networks
    for mine, theirs in zip(dreg.trainable_variables, plain.trainable_variables):
        if id(mine) in networks:
            continue
        np.testing.assert_allclose(by_variable[1][id(mine)], by_variable[0][id(theirs)], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dreg.terms(x, noise=noise).criterion, plain.terms(x, noise=noise).criterion, rtol=1e-6)
    assert any(not np.allclose(by_variable[1][id(mine)], by_variable[0][id(theirs)], rtol=1e-3, atol=1e-6)
               for mine, theirs in zip(dreg.trainable_variables, plain.trainable_variables) if id(mine) in networks)


@pytest.mark.parametrize("per_example_proportions", [False, True])
def test_mixture_gdreg_in_the_model_is_the_gradient_along_every_transport(monkeypatch, per_example_proportions):
    """The generalized DReG in the model, from the step's one backward pass through the decoder
    (`decoder_pass.gradients` pushing the decoder's z-gradient along every component's transport), equals the
    gradient that autodiff gives when the decoder is evaluated at the transported samples themselves (M times the
    decoder calls), for every variable; and differs from the partial DReG's for the component networks."""
    from tests.helpers import mnist_digits
    from tf_rmvae.models import decoder_pass

    settings = dict(method="mixture", components=3, bound="iw", num_samples=3,
                    per_example_proportions=per_example_proportions)
    model = twin_models(**settings, encoder_gradient="gdreg")[1]
    partial_model = twin_models(**settings, encoder_gradient="dreg")[1]
    partial_model.set_weights(model.get_weights())
    x = tf.constant(mnist_digits(8))
    noise = tf.random.stateless_normal([3, 8, 3, 4], [5, 6])

    def routed(which):
        with tf.GradientTape(persistent=True) as tape:
            losses = which.rme.losses(which.terms(x, noise=noise))
        return {id(v): g for g, v in which.rme.gradients(tape, losses, which.trainable_variables)}

    one_pass, partial_one_pass = routed(model), routed(partial_model)
    route = decoder_pass.route

    def decoder_at_every_transport(x_, z, log_likelihood_fn, transported=None):
        plain = route(x_, z, log_likelihood_fn)
        shape = tf.shape(transported)
        flat = tf.reshape(transported, tf.concat([shape[:2], [-1], shape[-1:]], 0))  # [S, B, M K, D]
        return plain._replace(transported_latents=transported, transported_log_likelihood=tf.reshape(
            log_likelihood_fn(x_, flat), shape[:-1]))

    monkeypatch.setattr(decoder_pass, "route", decoder_at_every_transport)
    reference = step_gradients(model, x, noise)
    networks = {id(v) for v in model.encoder.networks.trainable_variables}
    moved = []
    for variable, twin, (expected, _) in zip(model.trainable_variables, partial_model.trainable_variables,
                                             reference):
        np.testing.assert_allclose(one_pass[id(variable)], expected, rtol=2e-4, atol=1e-6)
        if id(variable) in networks:
            moved.append(not np.allclose(one_pass[id(variable)], partial_one_pass[id(twin)], rtol=1e-3, atol=1e-6))
    assert any(moved)

@pytest.mark.parametrize("settings, message", [
    (dict(method="vae", encoder_gradient="dreg"), "dreg"),  # a VAE on the ELBO has no importance weights
    (dict(method="rme", component_bound="elbo", encoder_gradient="dreg"), "dreg"),
    (dict(method="mixture", encoder_gradient="dreg"), "dreg"),  # a mixture on the ELBO: no importance weights
    (dict(method="boosting", bound="iw", encoder_gradient="dreg"), "dreg"),
    (dict(method="vae", bound="iw", num_samples=5, encoder_groups=2), "divide"),
    (dict(method="rme", encoder_groups=2), "PIWAE"),
    (dict(method="vae", encoder_gradient="score"), "encoder_gradient"),
    (dict(method="vae", bound="iw", encoder_gradient="gdreg"), "gdreg"),  # a mixture proposal's estimator only
    (dict(method="rme", component_bound="iw", encoder_gradient="gdreg"), "gdreg"),
    (dict(method="mixture", encoder_gradient="gdreg"), "gdreg"),
])
def test_estimator_settings_that_do_not_apply_are_refused(settings, message):
    from tests.helpers import tiny_model
    from tf_rmvae.config import ConfigError, RunConfig

    with pytest.raises(ValueError, match=message):
        tiny_model(**settings)
    flags = {k: v for k, v in settings.items() if k != "method"}
    with pytest.raises(ConfigError, match=message):
        RunConfig(model_dir="/tmp/unused", method=settings["method"],
                  num_components=1 if settings["method"] == "vae" else 3, **flags).validate()


def test_estimator_settings_survive_serialization():
    from tests.helpers import tiny_model

    model = tiny_model(method="vae", bound="iw", num_samples=4, encoder_gradient="dreg", encoder_groups=2)
    config = model.get_config()
    assert (config["encoder_gradient"], config["encoder_groups"]) == ("dreg", 2)
    clone = type(model).from_config(config)
    assert clone.rme.criterion == objectives.ProposalBound(groups=2, dreg=True)
    mixture = tiny_model(method="mixture", components=2, bound="iw", num_samples=2, encoder_gradient="gdreg")
    clone = type(mixture).from_config(mixture.get_config())
    assert clone.rme.criterion == objectives.MixtureProposalBound(generalized=True)


def test_auto_encoder_gradient_is_resolved_by_the_library_as_by_the_configuration():
    from tests.helpers import tiny_model

    rme = tiny_model(bound="iw", component_bound="iw", lambda_kl=1.0, encoder_gradient="auto").rme
    assert rme.encoder_gradient == "dreg" and rme.criterion.dreg
    iwae = tiny_model(method="vae", bound="iw", num_samples=4, encoder_gradient="auto").rme
    assert iwae.encoder_gradient == "reparam"
    mixture = tiny_model(method="mixture", bound="iw", num_samples=2, encoder_gradient="auto").rme
    assert mixture.encoder_gradient == "reparam" and mixture.criterion == objectives.ComponentELBO()
