import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

from tf_rmvae import mixing, objectives

tfd = tfp.distributions


def test_importance_weighted_estimate_is_exact_for_the_true_posterior():
    # Model p(z) = N(0, 1), p(x | z) = N(z, 1): p(x) = N(0, 2), p(z | x) = N(x / 2, 1 / 2).
    x = tf.constant([-1.0, 0.3, 2.0])
    posterior = tfd.Normal(x / 2.0, np.float32(np.sqrt(0.5)))

    def log_weights(size):
        z = posterior.sample(size, seed=1)
        return tfd.Normal(0.0, 1.0).log_prob(z) + tfd.Normal(z, 1.0).log_prob(x) - posterior.log_prob(z)

    estimate = objectives.importance_weighted_log_likelihood(log_weights, iwae_samples=250, chunk_size=64)
    exact = tfd.Normal(0.0, np.float32(np.sqrt(2.0))).log_prob(x).numpy()
    np.testing.assert_allclose(estimate.numpy(), exact, atol=1e-4)


def test_chunked_estimate_equals_log_mean_exp_of_all_samples():
    values = tf.random.stateless_normal([300, 4], seed=[1, 2]) * 3.0
    calls = []

    def log_weights(size):
        start = sum(calls)
        calls.append(int(size))
        return values[start:start + size]

    # Eager execution: the while loop runs in Python, so chunks come in order.
    estimate = objectives.importance_weighted_log_likelihood(log_weights, iwae_samples=300, chunk_size=128)
    np.testing.assert_allclose(estimate.numpy(), objectives.log_mean_exp(values).numpy(), rtol=1e-5)
    assert calls == [128, 128, 44]


def test_importance_weighted_estimate_validates_sizes():
    with pytest.raises(ValueError, match="iwae_samples"):
        objectives.importance_weighted_log_likelihood(lambda size: tf.zeros([size, 1]), 0)


def test_stratified_elbo_ignores_zero_weight_components_even_if_infinite():
    log_joint = tf.constant([[[1.0, np.inf]]])
    log_q = tf.constant([[[0.5, 0.0]]])
    log_w = tf.constant([[0.0, -1e9]])
    assert objectives.stratified_mixture_elbo(log_joint, log_q, log_w).numpy() == pytest.approx([0.5])


def test_rme_criterion_equals_elbo_plus_lambda_kl():
    log_joint = tf.constant([[-3.0], [-5.0]])
    log_h = tf.constant([[-1.0], [-2.0]])
    log_q = tf.constant([[-4.0], [-1.5]])
    lam = 0.3
    elbo = np.mean([-3.0 + 1.0, -5.0 + 2.0])
    kl = np.mean([-1.0 + 4.0, -2.0 + 1.5])
    assert objectives.rme_criterion(log_joint, log_h, log_q, lam).numpy() == pytest.approx([elbo + lam * kl])


def test_line_search_scores_match_a_direct_mixture_elbo():
    rng = np.random.default_rng(0)
    log_joint = tf.constant(rng.normal(size=(2, 3, 2)), tf.float32)
    log_h = tf.constant(rng.normal(size=(2, 3, 2, 2)), tf.float32)
    logits = tf.constant([0.0, 0.0])
    candidates = tf.constant([-2.0, 0.5])
    scores = objectives.line_search_scores(log_joint, log_h, logits, 2, candidates).numpy()
    for g, logit in enumerate([-2.0, 0.5]):
        eps = 1 / (1 + np.exp(-logit))
        log_w = tf.math.log(tf.constant([[1 - eps, eps]], tf.float32))
        log_q = objectives.mixture_log_density(log_h, log_w)
        direct = objectives.stratified_mixture_elbo(log_joint, log_q, log_w)
        assert scores[g] == pytest.approx(float(tf.reduce_mean(direct)), rel=1e-5)


@pytest.mark.parametrize("active", [1, 2, 3])
@pytest.mark.parametrize("per_example", [False, True])
def test_candidate_mixture_density_is_each_candidates_mixture_density(active, per_example):
    """The line search's `(1 - eps) q_{k-1} + eps h_k` equals the mixture density of each candidate's weights."""
    rng = np.random.default_rng(active)
    log_h = tf.constant(3.0 * rng.normal(size=(2, 4, 3, 3)), tf.float32)  # [S, B, M, M]
    logits = tf.constant([0.3, -1.0, 0.7])
    candidates = tf.constant(mixing.eps_to_logit([0.0, 0.01, 0.3, 0.9, 1.0]))
    offsets = tf.constant(rng.normal(size=(4, 3)), tf.float32) if per_example else None
    log_w = mixing.candidate_log_weights(logits, active, candidates, offsets)
    expected = objectives.mixture_log_density(log_h[:, None], log_w if per_example else log_w[:, None, :])
    actual = objectives.candidate_mixture_log_density(log_h, logits, active, candidates, offsets)
    assert actual.shape == (2, 5, 4, 3)
    np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)


def test_capped_kl_reward_is_bounded_and_stops_pushing():
    log_joint = tf.constant([[-3.0], [-5.0]])
    log_h = tf.constant([[-1.0], [-2.0]])
    log_q = tf.Variable([[-1e6], [-4.0]])  # the first sample lies where q_prev has (almost) no mass
    with tf.GradientTape() as tape:
        capped = objectives.rme_criterion(log_joint, log_h, log_q, 0.5, max_log_ratio=5.0)
    uncapped = objectives.rme_criterion(log_joint, log_h, log_q, 0.5)
    expected = np.mean([-3.0 + 1.0 + 0.5 * 5.0, -5.0 + 2.0 + 0.5 * 2.0])
    assert capped.numpy() == pytest.approx([expected])
    assert uncapped.numpy()[0] > 1e5
    np.testing.assert_allclose(tape.gradient(capped, log_q).numpy(), [[0.0], [-0.25]])


@pytest.mark.parametrize("cap", [None, 5.0])
def test_uncapped_criterion_runs_off_where_the_decoder_is_flat(cap):
    """Gradient ascent on the criterion of h = N(m, s^2) against a narrow q_prev = N(0, 0.1^2) with a flat
    likelihood (log p(x, z) = log N(z; 0, 1)): uncapped, lambda / 0.1^2 > 1 makes the reward grow like m^2, so m
    runs off; capped, h stops a few scales away from q_prev."""
    loc, log_scale = tf.Variable([0.05]), tf.Variable([np.float32(np.log(0.1))])
    q_prev = tfd.Normal(0.0, 0.1)
    noise = tf.random.stateless_normal([64, 1], seed=[4, 2])
    for _ in range(300):
        with tf.GradientTape() as tape:
            h = tfd.Normal(loc, tf.exp(log_scale))
            z = loc + tf.exp(log_scale) * noise
            value = objectives.rme_criterion(tfd.Normal(0.0, 1.0).log_prob(z), h.log_prob(z), q_prev.log_prob(z),
                                             0.3, max_log_ratio=cap)
            loss = -tf.reduce_sum(value)
        grads = tape.gradient(loss, [loc, log_scale])
        for variable, grad in zip([loc, log_scale], grads):
            variable.assign_sub(0.01 * tf.clip_by_norm(grad, 10.0))
    if cap is None:
        assert abs(float(loc[0])) > 10.0
    else:
        assert abs(float(loc[0])) < 2.0


def test_boosting_residual_elbo_adds_the_entropy_and_is_capped_like_rme():
    log_joint = tf.constant([[-3.0], [-5.0]])
    log_h = tf.constant([[-1.0], [-2.0]])
    log_q = tf.constant([[-1e6], [-4.0]])
    entropy = tf.constant([2.5])
    uncapped = objectives.boosting_criterion(log_joint, log_h, log_q, entropy, 0.5)
    np.testing.assert_allclose(uncapped.numpy(), [np.mean([-3.0 + 1e6, -5.0 + 4.0]) + 1.25], rtol=1e-6)
    capped = objectives.boosting_criterion(log_joint, log_h, log_q, entropy, 0.5, max_log_ratio=5.0)
    rme_at_one = objectives.rme_criterion(log_joint, log_h, log_q, 1.0, max_log_ratio=5.0)
    np.testing.assert_allclose(capped.numpy(), rme_at_one.numpy() + 0.5 * 2.5, rtol=1e-6)


def test_tensor_sample_count_below_one_fails_clearly():
    estimate = tf.function(lambda k: objectives.importance_weighted_log_likelihood(
        lambda size: tf.zeros([size, 2]), k, 4))
    with pytest.raises(tf.errors.InvalidArgumentError, match="iwae_samples must be >= 1"):
        estimate(tf.constant(0))


def test_stratified_importance_weighted_bound_is_iwae_for_one_component_and_above_the_elbo():
    log_joint = tf.random.stateless_normal([5, 3, 1], seed=[3, 4]) * 2.0 - 90.0
    log_q = tf.random.stateless_normal([5, 3, 1], seed=[5, 6])
    bound = objectives.stratified_importance_weighted_bound(log_joint, log_q, tf.zeros([3, 1]))
    np.testing.assert_allclose(bound.numpy(), objectives.log_mean_exp(log_joint - log_q)[:, 0].numpy(), rtol=1e-6)
    # Several components: never below the stratified ELBO on the same samples (Jensen).
    log_joint = tf.random.stateless_normal([2, 6, 4], seed=[1, 1]) * 3.0
    log_q = tf.random.stateless_normal([2, 6, 4], seed=[2, 2])
    log_w = tf.math.log(tf.constant([[0.1, 0.2, 0.3, 0.4]]))
    bound = objectives.stratified_importance_weighted_bound(log_joint, log_q, log_w)
    assert np.all(bound.numpy() >= objectives.stratified_mixture_elbo(log_joint, log_q, log_w).numpy() - 1e-5)


def test_stratified_importance_weighted_bound_is_unbiased_for_p_of_x():
    # p(z) = N(0, 1), p(x | z) = N(z, 1) so p(x) = N(0, 2); q = 0.3 N(-1, 1) + 0.7 N(1, 0.5^2), with four slots of
    # which the last two (inactive) draw again from components 0 and 1 (slot weights w / n).
    from tf_rmvae import mixing

    x = 0.4
    loc, scale = tf.constant([-1.0, 1.0, 5.0, 5.0]), tf.constant([1.0, 0.5, 1.0, 1.0])
    log_w = tf.math.log(tf.constant([0.3, 0.7, 0.0, 0.0]) + 1e-30)
    sources = mixing.slot_sources(4, 2)
    np.testing.assert_array_equal(sources.numpy(), [0, 1, 0, 1])
    z = tf.gather(loc, sources) + tf.gather(scale, sources) * tf.random.stateless_normal([20000, 4], seed=[7, 8])
    log_q = tf.reduce_logsumexp(tfd.Normal(loc, scale).log_prob(z[..., None]) + log_w, axis=-1)  # [S, 4]
    log_joint = tfd.Normal(0.0, 1.0).log_prob(z) + tfd.Normal(z, 1.0).log_prob(x)
    log_v = mixing.slot_log_weights(log_w, sources)
    np.testing.assert_allclose(np.exp(log_v.numpy()).sum(), 1.0, rtol=1e-5)
    # One sample per slot per "example" (S = 1, B = 20000): 20000 independent estimates of p(x); their mean must
    # match p(x).
    estimates = np.exp(objectives.stratified_importance_weighted_bound(log_joint[None], log_q[None], log_v).numpy())
    p_x = np.exp(tfd.Normal(0.0, np.sqrt(2.0)).log_prob(x).numpy())
    assert abs(estimates.mean() - p_x) < 4 * estimates.std() / np.sqrt(len(estimates))


def _random_slot_terms(seed, samples=3, batch=5, slots=4):
    rng = np.random.default_rng(seed)
    log_joint = tf.constant(rng.normal(-100.0, 5.0, [samples, batch, slots]), tf.float32)
    log_h_self = tf.constant(rng.normal(-20.0, 3.0, [samples, batch, slots]), tf.float32)
    log_q_previous = tf.constant(rng.normal(-22.0, 3.0, [samples, batch, slots]), tf.float32)
    return log_joint, log_h_self, log_q_previous


def test_importance_weighted_rme_criterion_is_the_rme_criterion_with_one_sample_per_component():
    log_joint, log_h_self, log_q_previous = _random_slot_terms(0, samples=1)
    sources = tf.range(4)
    iw = objectives.rme_importance_weighted_criterion(log_joint, log_h_self, log_q_previous, sources, 0.3, 5.0)
    plain = objectives.rme_criterion(log_joint, log_h_self, log_q_previous, 0.3, 5.0)
    np.testing.assert_allclose(iw.numpy(), plain.numpy(), rtol=1e-6)


def test_importance_weighted_rme_criterion_pools_the_samples_of_every_slot_drawing_from_a_component():
    log_joint, log_h_self, log_q_previous = _random_slot_terms(1)
    sources = tf.constant([0, 1, 0, 1])  # two active components, each feeding two slots
    lam, cap = 0.3, 1.0
    got = objectives.rme_importance_weighted_criterion(log_joint, log_h_self, log_q_previous, sources, lam, cap)
    a, h, q = (t.numpy().astype(np.float64) for t in (log_joint, log_h_self, log_q_previous))
    for m, slots in ((0, [0, 2]), (1, [1, 3])):
        log_w = (a - h)[:, :, slots]  # [S, B, 2]: the 6 samples of component m
        top = log_w.max(axis=(0, 2))
        pooled = np.log(np.mean(np.exp(log_w - top[None, :, None]), axis=(0, 2))) + top
        kl = np.minimum(h - q, cap)[:, :, slots].mean(axis=(0, 2))
        np.testing.assert_allclose(got.numpy()[:, m], pooled + lam * kl, rtol=1e-5)
    # The components no slot draws from (2, 3) keep their slot's plain criterion (they do not train).
    plain = objectives.rme_criterion(log_joint, log_h_self, log_q_previous, lam, cap).numpy()
    np.testing.assert_allclose(got.numpy()[:, 2:], plain[:, 2:], rtol=1e-6)


def test_criterion_densities_of_a_slot_are_those_of_the_component_it_draws_from():
    rng = np.random.default_rng(3)
    log_h = tf.constant(rng.normal(-20.0, 3.0, [2, 3, 4, 4]), tf.float32)  # [S, B, slot i, component j]
    logits = tf.constant([0.0, 0.5, -0.3, 1.0])
    sources = tf.constant([0, 1, 0, 1])
    log_h_self, log_q_previous = objectives.criterion_log_densities(log_h, log_h, logits, sources)
    previous = tf.exp(mixing.prefix_log_weights(logits)).numpy()  # row m: the weights of q_{m-1}
    h = log_h.numpy().astype(np.float64)
    for slot, component in enumerate([0, 1, 0, 1]):
        np.testing.assert_allclose(log_h_self[..., slot], h[..., slot, component], rtol=1e-6)
        if component == 0:  # no mixture before the first component: its own density
            expected = h[..., slot, 0]
        else:
            expected = np.log(np.sum(np.exp(h[..., slot, :]) * previous[component], axis=-1))
        np.testing.assert_allclose(log_q_previous[..., slot], expected, rtol=1e-5)
    # Without sources, slot i is component i: the densities every existing criterion used.
    plain_self, plain_previous = objectives.criterion_log_densities(log_h, log_h, logits)
    np.testing.assert_array_equal(plain_self.numpy(), tf.linalg.diag_part(log_h).numpy())
    same_self, same_previous = objectives.criterion_log_densities(log_h, log_h, logits, tf.range(4))
    np.testing.assert_array_equal(plain_previous.numpy(), same_previous.numpy())


def test_component_bound_iw_is_for_rme_only():
    settings = dict(lambda_kl=1.0, max_log_ratio=5.0, boosting_entropy_weight=1.0, component_bound="iw",
                    encoder_gradient="reparam", encoder_groups=1)
    assert isinstance(objectives.component_criterion("rme", **settings), objectives.RMEImportanceWeightedCriterion)
    with pytest.raises(ValueError, match="applies to method .rme. only"):
        objectives.component_criterion("boosting", **settings)
