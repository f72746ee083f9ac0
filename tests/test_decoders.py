import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_rmvae
from tests.helpers import TEST_SETTINGS


@pytest.mark.parametrize("architecture", ["dense", "conv"])
def test_bernoulli_decoder_shapes_and_probabilities(architecture):
    decoder = tf_rmvae.BernoulliDecoder((28, 28, 1), architecture=architecture, hidden_units=(16,),
                                        conv_filters=(8, 4))
    z = tf.random.stateless_normal([2, 3, 4, 5], seed=[1, 2])  # [S, B, M, D]
    p = decoder(z)
    assert p.batch_shape == (2, 3, 4) and p.event_shape == (28, 28, 1)
    mean = p.mean().numpy()
    assert mean.shape == (2, 3, 4, 28, 28, 1) and mean.min() >= 0 and mean.max() <= 1
    x = tf.cast(tf.random.stateless_uniform([3, 1, 28, 28, 1], seed=[3, 4]) > 0.5, tf.float32)
    log_prob = p.log_prob(x).numpy()  # broadcasts over S and M
    assert log_prob.shape == (2, 3, 4) and np.all(log_prob < 0)


@pytest.mark.parametrize("architecture", ["dense", "conv"])
def test_gaussian_decoder_for_continuous_images(architecture):
    decoder = tf_rmvae.make_decoder("gaussian", (32, 32, 3), architecture=architecture, hidden_units=(16,),
                                    conv_filters=(8, 4))
    p = decoder(tf.zeros([5, 6]))
    assert p.event_shape == (32, 32, 3)
    mean, stddev = p.mean().numpy(), p.stddev().numpy()
    assert mean.min() > 0 and mean.max() < 1 and stddev.min() >= tf_rmvae.GaussianDecoder.min_scale
    assert np.all(np.isfinite(p.log_prob(tf.fill([5, 32, 32, 3], 0.5)).numpy()))


def test_decoder_arguments_are_checked():
    with pytest.raises(ValueError, match="divisible by 4"):
        tf_rmvae.BernoulliDecoder((30, 30, 1), architecture="conv")
    with pytest.raises(ValueError, match="image_shape"):
        tf_rmvae.BernoulliDecoder((28, 28))
    with pytest.raises(ValueError, match="likelihood"):
        tf_rmvae.make_decoder("poisson", (28, 28, 1))


@pytest.mark.slow
def test_conv_rme_trains_on_continuous_images():
    encoder = tf_rmvae.RecursiveMixtureEncoder(4, 2, architecture="conv", conv_filters=(4, 8), hidden_units=(16,),
                                               seed=0, shared_trunk=False)
    decoder = tf_rmvae.GaussianDecoder((16, 16, 3), architecture="conv", hidden_units=(16,), conv_filters=(8, 4))
    model = tf_rmvae.RecursiveMixtureVAE(encoder, decoder, eps_search_every=4, **TEST_SETTINGS)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    rng = np.random.default_rng(0)
    images = np.clip(rng.random((1, 16, 16, 3)) * 0.2 + rng.random((256, 1, 1, 3)) * 0.8, 0, 1).astype("float32")
    data = tf.data.Dataset.from_tensor_slices(images).batch(32)
    history = model.fit(data, epochs=4, verbose=0,
                        callbacks=[tf_rmvae.ComponentSchedule(epochs_per_component=2)]).history
    assert history["active_components"] == [1.0, 1.0, 2.0, 2.0]
    assert history["elbo"][-1] > history["elbo"][0] + 50.0
