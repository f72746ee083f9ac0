import numpy as np
import pytest
import tensorflow as tf

from tf_rmvae import mixing


def product_form_weights(eps, active):
    """Reference: q_1 = h_1, q_m = (1 - eps_m) q_{m-1} + eps_m h_m, unrolled in numpy."""
    weights = np.zeros(len(eps))
    weights[0] = 1.0
    for m in range(1, active):
        weights[:m] *= 1.0 - eps[m]
        weights[m] = eps[m]
    return weights


@pytest.mark.parametrize("active", [1, 2, 3, 5])
def test_recursive_weights_match_the_product_form(active):
    eps = np.array([0.9, 0.3, 0.5, 0.2, 0.7])
    log_w = mixing.recursive_log_weights(mixing.eps_to_logit(eps), active).numpy()
    weights = np.exp(log_w)
    np.testing.assert_allclose(weights, product_form_weights(eps, active), atol=1e-6)
    np.testing.assert_allclose(weights.sum(), 1.0, atol=1e-6)
    assert np.all(weights[active:] == 0.0)  # exactly zero, not merely small


def test_uniform_logits_give_uniform_prefix_mixtures():
    logits = mixing.uniform_mixing_logits(4)
    for active in range(1, 5):
        weights = np.exp(mixing.recursive_log_weights(logits, active).numpy())
        np.testing.assert_allclose(weights[:active], 1.0 / active, atol=1e-6)


def test_prefix_weights_rows_are_earlier_mixtures():
    logits = mixing.eps_to_logit([0.5, 0.4, 0.25, 0.6])
    rows = np.exp(mixing.prefix_log_weights(logits).numpy())
    assert np.all(rows[0] == 0.0)
    for m in range(1, 4):
        np.testing.assert_allclose(rows[m], np.exp(mixing.recursive_log_weights(logits, m).numpy()), atol=1e-7)


def test_candidate_weights_replace_only_the_newest_proportion():
    logits = mixing.eps_to_logit([0.5, 0.4, 0.25, 0.6])
    candidates = mixing.eps_to_logit([0.0, 0.5, 0.9])
    weights = np.exp(mixing.candidate_log_weights(logits, 3, candidates).numpy())
    np.testing.assert_allclose(weights[0], product_form_weights([1, 0.4, 0.0, 0.6], 3), atol=1e-6)
    np.testing.assert_allclose(weights[2], product_form_weights([1, 0.4, 0.9, 0.6], 3), atol=1e-6)


def test_eps_to_logit_rejects_values_outside_the_unit_interval():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mixing.eps_to_logit([0.5, 1.5])
    with pytest.raises(ValueError):
        mixing.eps_to_logit([float("nan")])


def test_tiny_proportions_stay_finite():
    log_w = mixing.recursive_log_weights(mixing.eps_to_logit([1.0, 1e-8, 0.0]), 3)
    assert np.all(np.isfinite(log_w.numpy()))
    assert tf.reduce_sum(tf.exp(log_w)).numpy() == pytest.approx(1.0, abs=1e-6)


def test_prefix_weights_of_per_example_logits_are_each_rows_prefix_weights():
    logits = np.stack([mixing.eps_to_logit([0.5, 0.4, 0.25]), mixing.eps_to_logit([0.5, 0.9, 0.05])])  # [B=2, M]
    batched = mixing.prefix_log_weights(logits).numpy()  # [2, 3, 3]
    for b in range(2):
        np.testing.assert_array_equal(batched[b], mixing.prefix_log_weights(logits[b]).numpy())


def test_candidate_weights_with_offsets_shift_every_candidate_by_the_examples_offsets():
    logits, candidates = mixing.eps_to_logit([0.5, 0.3, 0.2]), mixing.eps_to_logit([0.0, 0.1, 0.6])
    offsets = np.array([[0.0, 1.0, -2.0], [0.0, -0.5, 3.0]], np.float32)  # [B=2, M]
    with_offsets = mixing.candidate_log_weights(logits, 2, candidates, offsets).numpy()  # [G, B, M]
    for g, candidate in enumerate(candidates):
        for b in range(2):
            shifted = np.array([logits[0], candidate, logits[2]]) + offsets[b]
            np.testing.assert_allclose(
                with_offsets[g, b], mixing.recursive_log_weights(shifted, 2).numpy(), rtol=1e-6)
    # eps = 0 (logit -30) stays off whatever the example's offset (bounded by MAX_OFFSET in the layer).
    assert np.all(np.exp(with_offsets[0, :, 1]) < 1e-8)


@pytest.mark.parametrize("active", [1, 2, 3])
@pytest.mark.parametrize("with_offsets", [False, True])
def test_candidate_join_proportions_recompose_the_candidate_weights(active, with_offsets):
    # q_k's weights are q_{k-1}'s times (1 - eps_k), and eps_k for the newest: the line search's faster density
    # (objectives.candidate_mixture_log_density) reads the join from here, the bound's weights from
    # candidate_log_weights; both must be the same candidates.
    logits = mixing.eps_to_logit([0.5, 0.3, 0.2, 0.6])
    candidates = np.array([-40.0, -2.0, 0.0, 1.5, 40.0], np.float32)  # +-40: beyond the clip
    offsets = np.array([[0.0, 1.0, -2.0, 0.5], [0.0, -0.5, 3.0, -1.0]], np.float32) if with_offsets else None
    log_keep, log_eps = (t.numpy() for t in mixing.candidate_join_log_proportions(candidates, active, offsets))
    assert log_keep.shape == log_eps.shape == ((5, 2) if with_offsets else (5, 1))
    weights = mixing.candidate_log_weights(logits, active, candidates, offsets).numpy()  # [G, (B,) M]
    if not with_offsets:
        weights = weights[:, None, :]
    shifted = logits if offsets is None else logits + offsets  # [(B,) M]
    previous = mixing.recursive_log_weights(shifted, active - 1).numpy()  # q_{k-1}
    np.testing.assert_allclose(log_eps, weights[..., active - 1], atol=1e-6)
    if active == 1:  # q_1 = h_1: eps_1 = 1 and nothing kept
        np.testing.assert_array_equal(log_eps, 0.0)
        assert np.all(log_keep <= mixing.INACTIVE_LOG_WEIGHT)
    else:
        np.testing.assert_allclose(
            previous[..., : active - 1] + log_keep[..., None], weights[..., : active - 1], rtol=1e-6, atol=1e-6)
        assert np.all(np.isfinite(log_keep)) and np.all(log_keep >= -mixing.MAX_ABS_LOGIT - 1)
