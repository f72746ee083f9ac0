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
])
def test_encoder_estimators_change_the_encoder_gradient_only(settings):
    """IWAE-DReG, PIWAE and RME-DReG: the decoder's gradient is the ordinary gradient of the model's bound, the
    encoder's differs; the reported bound is unchanged."""
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


@pytest.mark.parametrize("settings, message", [
    (dict(method="vae", encoder_gradient="dreg"), "dreg"),  # a VAE on the ELBO has no importance weights
    (dict(method="rme", component_bound="elbo", encoder_gradient="dreg"), "dreg"),
    (dict(method="vae", bound="iw", num_samples=5, encoder_groups=2), "divide"),
    (dict(method="rme", encoder_groups=2), "PIWAE"),
    (dict(method="vae", encoder_gradient="score"), "encoder_gradient"),
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


def test_auto_encoder_gradient_is_resolved_by_the_library_as_by_the_configuration():
    from tests.helpers import tiny_model

    rme = tiny_model(bound="iw", component_bound="iw", lambda_kl=1.0, encoder_gradient="auto").rme
    assert rme.encoder_gradient == "dreg" and rme.criterion.dreg
    iwae = tiny_model(method="vae", bound="iw", num_samples=4, encoder_gradient="auto").rme
    assert iwae.encoder_gradient == "reparam"
