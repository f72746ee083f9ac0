"""Per-example mixing proportions eps_m(x) (`RecursiveMixtureEncoder(per_example_proportions=True)`)."""

import keras
import numpy as np
import tensorflow as tf

import tf_rmvae
from tests.helpers import mnist_digits


def model_with_per_example_proportions(components=3, **kwargs):
    encoder = tf_rmvae.RecursiveMixtureEncoder(8, components, hidden_units=(32,), seed=3, per_example_proportions=True)
    decoder = tf_rmvae.BernoulliDecoder((28, 28, 1), hidden_units=(32,))
    return tf_rmvae.RecursiveMixtureVAE(encoder, decoder, eps_search_every=5, **kwargs)


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
