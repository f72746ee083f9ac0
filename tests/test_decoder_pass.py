"""One backward pass through the decoder (`tf_rmvae.models.decoder_pass`) gives every variable the gradient that each
loss's own backward pass gives (`RecursiveMixtureTrainer.gradient_routes`, the reference), to float32 rounding."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

import tf_rmvae
from tests.helpers import mnist_digits
from tf_rmvae.models import decoder_pass

RTOL, ATOL = 1e-4, 1e-6


def test_shared_cotangent_rescales_to_the_encoder_cotangent_and_floors_zero_weights():
    # [S=2, B=2, M=2]; example 1 is skipped (all zero); sample (0, 0, 1) has no decoder weight, (1, 0, 1) underflows.
    decoder = tf.constant([[[-0.5, 0.0], [0.0, 0.0]], [[-0.5, -1e-45], [0.0, 0.0]]])
    encoder = tf.constant([[[-0.2, -0.3], [0.0, 0.0]], [[0.0, -0.5], [0.0, 0.0]]])
    cotangent, ratio = decoder_pass.shared_cotangent(decoder, encoder, floor=2.0**-64)
    floor = 0.5 * 2.0**-64
    np.testing.assert_allclose(cotangent[:, 0].numpy(), [[-0.5, -floor], [-0.5, -floor]], rtol=1e-6)
    np.testing.assert_array_equal(cotangent[:, 1].numpy(), 0.0)  # a skipped example: no cotangent
    np.testing.assert_allclose((ratio * cotangent).numpy(), encoder.numpy(), rtol=1e-6)
    assert np.all(np.isfinite(ratio.numpy())) and np.all(ratio[:, 1].numpy() == 0.0)


def test_shared_cotangent_ratio_is_capped_finite():
    decoder = tf.constant([[[-1e-30, -1.0]]])
    _, ratio = decoder_pass.shared_cotangent(decoder, tf.constant([[[-1e30, 0.0]]]), floor=1e-40)
    assert np.isfinite(ratio.numpy()).all() and ratio.numpy()[0, 0, 0] == pytest.approx(np.exp(80.0), rel=1e-5)


def test_switch_passes_the_gradient_except_in_separate_routes():
    x = tf.constant(3.0)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        y = 2.0 * decoder_pass.switch(x)
    assert float(tape.gradient(y, x)) == 2.0
    with decoder_pass.separate_routes():
        assert tape.gradient(y, x) is None


def tiny(method="rme", components=3, shared_trunk=True, per_example=False, **kwargs):
    encoder = tf_rmvae.RecursiveMixtureEncoder(
        4, 1 if method == "vae" else components, hidden_units=(16,), shared_trunk=shared_trunk, seed=3,
        per_example_proportions=per_example)
    decoder = tf_rmvae.BernoulliDecoder((28, 28, 1), hidden_units=(16,))
    model = tf_rmvae.RecursiveMixtureVAE(encoder, decoder, method=method, **kwargs)
    model.ensure_built((None, 28, 28, 1))
    return model


def join(model, proportions):
    """Activates the next components with mixing proportions `proportions` (0: as on joining)."""
    for m, eps in enumerate(proportions, start=1):
        model.add_component()
        model.encoder.set_mixing_proportion(m, eps)


def both_gradients(model, x, noise, jit=False):
    """`(reference, routed)`: `[gradient]` of each loss for its variables, by its own backward pass
    (`gradient_routes`) and by `RecursiveMixtureTrainer.gradients` (one pass through the decoder)."""

    def compute(x, noise):
        with tf.GradientTape(persistent=True) as tape:
            losses = model.rme.losses(model.terms(x, noise=noise))
        reference = {}
        for loss, variables in model.rme.gradient_routes(losses, model.trainable_variables):
            reference.update({id(v): g for v, g in zip(variables, tape.gradient(loss, variables))})
        routed = {id(v): g for g, v in model.rme.gradients(tape, losses, model.trainable_variables)}
        ids = [id(v) for v in model.trainable_variables if id(v) in reference]
        assert set(ids) == set(routed)
        zero = tf.zeros([])
        return ([zero if reference[i] is None else reference[i] for i in ids],
                [zero if routed[i] is None else routed[i] for i in ids])

    if jit:
        compute = tf.function(compute, jit_compile=True)
    return compute(x, noise)


RME_DREG = dict(bound="iw", component_bound="iw", num_samples=3, lambda_kl=1.0, encoder_gradient="dreg")
CASES = {
    "iwae_dreg": (dict(method="vae", bound="iw", num_samples=5, encoder_gradient="dreg"), ()),
    "piwae_dreg": (dict(method="vae", bound="iw", num_samples=4, encoder_gradient="dreg", encoder_groups=2), ()),
    "rme_dreg_stage1": (RME_DREG, ()),
    "rme_dreg_stage3": (RME_DREG, (0.4, 0.3)),
    "rme_dreg_newest_at_eps0": (RME_DREG, (0.4, 0.0)),  # its samples get (almost) no decoder weight
    "rme_dreg_frozen": (dict(RME_DREG, train_previous=False, shared_trunk=False), (0.5, 0.3)),
    "rme_dreg_per_example": (dict(RME_DREG, per_example=True), (0.4, 0.3)),
    "mixture_dreg": (dict(method="mixture", bound="iw", num_samples=3, encoder_gradient="dreg"), ()),
    "mixture_dreg_per_example": (dict(method="mixture", bound="iw", num_samples=2, encoder_gradient="dreg",
                                      per_example=True), ()),
    "rme_reparam_stage3": (dict(RME_DREG, encoder_gradient="reparam"), (0.4, 0.3)),
    "rme_paper_stage2": (dict(lambda_kl=0.3, bound="elbo", num_samples=2), (0.3,)),
    "boosting_stage2": (dict(method="boosting", bound="iw", num_samples=2), (0.3,)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_pass_gives_each_losss_own_gradient(name):
    settings, proportions = CASES[name]
    model = tiny(**settings)
    join(model, proportions)
    if settings.get("per_example"):  # offsets that differ between examples (the head's last layer starts at zero)
        head = model.encoder.mixing.offset_head
        last = head.layers[-1].kernel
        last.assign(tf.random.stateless_normal(last.shape, [4, 5]))
    x = tf.constant(mnist_digits(8))
    noise = tf.random.stateless_normal([model.num_samples, 8, model.encoder.max_components, 4], [1, 2])
    reference, routed = both_gradients(model, x, noise)
    assert any(float(tf.reduce_max(tf.abs(g))) > 0 for g in reference)
    for expected, actual in zip(reference, routed):
        np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["rme_dreg_newest_at_eps0", "mixture_dreg"])
def test_one_pass_under_xla(name):
    settings, proportions = CASES[name]
    model = tiny(**settings)
    join(model, proportions)
    x = tf.constant(mnist_digits(8))
    noise = tf.random.stateless_normal([model.num_samples, 8, 3, 4], [1, 2])
    reference, routed = both_gradients(model, x, noise, jit=True)
    for expected, actual in zip(reference, routed):
        np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=RTOL, atol=ATOL)
