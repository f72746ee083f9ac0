"""Per-example mixing proportions eps_m(x) (`RecursiveMixtureEncoder(per_example_proportions=True)`)."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tf_rmvae
from tests.helpers import TEST_SETTINGS, mnist_digits
from tf_rmvae.run.evaluation import mixture_summary


def model_with_per_example_proportions(components=3, **kwargs):
    encoder = tf_rmvae.RecursiveMixtureEncoder(8, components, hidden_units=(32,), seed=3, per_example_proportions=True,
                                               shared_trunk=False)
    decoder = tf_rmvae.BernoulliDecoder((28, 28, 1), hidden_units=(32,))
    return tf_rmvae.RecursiveMixtureVAE(encoder, decoder, eps_search_every=5, **{**TEST_SETTINGS, **kwargs})


def two_components_with_varied_offsets(input_shape, head_noise):
    """Two active components, shared eps = 0.4, and an offset head perturbed so the proportions vary by example."""
    model = model_with_per_example_proportions(components=2)
    model.ensure_built(input_shape)
    model.add_component()
    model.encoder.set_mixing_proportion(1, 0.4)
    head = model.encoder.mixing.offset_head.get_layer("offsets")
    kernel, bias = head.get_weights()
    head.set_weights([kernel + head_noise * np.random.default_rng(0).standard_normal(kernel.shape), bias])
    return model


def test_a_new_encoder_has_the_shared_proportions_and_a_config_round_trip():
    x = mnist_digits(16)
    shared = tf_rmvae.RecursiveMixtureEncoder(8, 3, hidden_units=(32,), seed=3)
    per_example = tf_rmvae.RecursiveMixtureEncoder(8, 3, hidden_units=(32,), seed=3, per_example_proportions=True)
    for encoder in (shared, per_example):
        encoder.ensure_built(x.shape)
        encoder.mixing.configure(all_active=True, learn_proportions=False)
    a, b = shared.compute_parameters(x), per_example.compute_parameters(x)
    for left, right in zip(a, b):  # the offsets head starts at zero; the networks' weights are the same
        np.testing.assert_array_equal(left.numpy(), right.numpy())
    clone = tf_rmvae.RecursiveMixtureEncoder.from_config(per_example.get_config())
    assert clone.per_example_proportions and clone.mixing.max_offset == per_example.mixing.max_offset


@pytest.mark.slow
def test_rme_with_per_example_proportions_learns_proportions_that_vary_over_examples():
    train, test = mnist_digits(600), mnist_digits(200, "test")
    keras.utils.set_random_seed(0)
    model = model_with_per_example_proportions()
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    schedule = tf_rmvae.ComponentSchedule(epochs_per_component=1)
    history = model.fit(train, batch_size=100, epochs=3, verbose=0, callbacks=[schedule]).history
    assert history["active_components"] == [1.0, 2.0, 3.0] and np.all(np.isfinite(history["loss"]))
    log_weights, _, _ = model.encoder.compute_parameters(test)
    weights = np.exp(log_weights.numpy())
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-5)
    offsets = model.encoder.mixing.logit_offsets(test).numpy()
    assert np.abs(offsets).max() > 1e-3  # the head trained (it started at exactly zero)
    assert weights[:, 1:].std(axis=0).max() > 1e-4  # the proportions differ between examples
    assert np.abs(offsets).max() <= model.encoder.mixing.max_offset


def test_eps_zero_switches_a_component_off_for_every_example():
    test = mnist_digits(64, "test")
    model = model_with_per_example_proportions(components=2)
    model.ensure_built(test.shape)
    model.add_component()
    head = model.encoder.mixing.offset_head.get_layer("offsets")
    kernel, bias = head.get_weights()
    head.set_weights([kernel, bias + model.encoder.mixing.max_offset * 10])  # offsets at their upper bound
    model.encoder.set_mixing_proportion(1, 0.0)
    weights = np.exp(model.encoder.compute_parameters(test)[0].numpy())
    assert np.all(weights[:, 1] < 1e-6), weights[:, 1].max()


def test_the_export_serves_per_example_weights(tmp_path):
    test = mnist_digits(8, "test")
    model = two_components_with_varied_offsets(test.shape, head_noise=0.01)
    expected = model.encoder.compute_parameters(test)[0].numpy()
    path = tf_rmvae.export.export_encoder(model, str(tmp_path), "epsx", version=1)
    served = tf.saved_model.load(path).signatures["serving_default"](images=tf.constant(test))
    np.testing.assert_allclose(served["mixture_weights"].numpy(), np.exp(expected), rtol=1e-5, atol=1e-6)
    assert np.ptp(expected[:, 1]) > 0  # the served weights are per example


def test_reported_weights_are_the_batch_mean_of_the_per_example_weights():
    test = mnist_digits(50, "test")
    model = two_components_with_varied_offsets(test.shape, head_noise=0.05)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    metrics = model.evaluate(test, batch_size=50, verbose=0, return_dict=True)
    expected = np.exp(model.encoder.compute_parameters(test)[0].numpy()).mean(axis=0)
    np.testing.assert_allclose([metrics["weight_0"], metrics["weight_1"]], expected, rtol=1e-5)
    assert abs(metrics["weight_1"] - 0.4) > 1e-4  # not the shared logit's weight


def test_the_export_metadata_says_the_weights_are_per_example(tmp_path):
    test = mnist_digits(8, "test")
    model = two_components_with_varied_offsets(test.shape, head_noise=0.01)
    path = tf_rmvae.export.export_encoder(model, str(tmp_path), "epsx", version=1)
    meta = tf_rmvae.export.read_metadata(path)
    assert meta["per_example_proportions"] is True
    assert meta["mixing_weights"] == [0.6, 0.4]  # the shared proportions (every offset zero)


def test_the_mixture_summary_reports_the_mean_of_the_per_example_weights():
    test = mnist_digits(50, "test")
    model = two_components_with_varied_offsets(test.shape, head_noise=0.05)
    weights, entropies = mixture_summary(model.encoder, test, batch_size=20)
    per_example = np.exp(model.encoder.compute_parameters(test)[0].numpy())
    np.testing.assert_allclose(weights, per_example.mean(axis=0), rtol=1e-5)
    assert abs(weights[1] - 0.4) > 1e-4  # not the shared logit's weight
    _, loc, scale = model.encoder.compute_parameters(test)
    expected = tfp.distributions.MultivariateNormalDiag(loc, scale).entropy().numpy().mean(axis=0)
    np.testing.assert_allclose(entropies, expected, rtol=1e-5)


def test_shared_proportions_report_the_encoder_weights_exactly():
    test = mnist_digits(30, "test")
    encoder = tf_rmvae.RecursiveMixtureEncoder(8, 3, hidden_units=(32,), seed=3)
    encoder.ensure_built(test.shape)
    encoder.add_component()
    encoder.set_mixing_proportion(1, 0.25)
    weights, _ = mixture_summary(encoder, test, batch_size=7)
    np.testing.assert_array_equal(weights, np.exp(encoder.mixture_log_weights().numpy()))
    np.testing.assert_allclose(weights, [0.75, 0.25, 0.0], atol=1e-6)


def test_the_offset_head_is_seeded_by_the_encoder_seed():
    x = mnist_digits(4)

    def hidden_kernel(seed, global_seed):
        keras.utils.set_random_seed(global_seed)
        encoder = tf_rmvae.RecursiveMixtureEncoder(8, 2, hidden_units=(16,), seed=seed, per_example_proportions=True)
        encoder.ensure_built(x.shape)
        return encoder.mixing.offset_head.get_layer("hidden").get_weights()[0]

    np.testing.assert_array_equal(hidden_kernel(1, global_seed=0), hidden_kernel(1, global_seed=1))
    assert not np.allclose(hidden_kernel(1, global_seed=0), hidden_kernel(2, global_seed=0))
