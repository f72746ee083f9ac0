"""RME training reused in a user's own Keras VAE (`tf_rmvae.models.recursion`), and the pieces it is made of."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tf_rmvae
from tests.helpers import TEST_SETTINGS, mnist_digits, tiny_model
from tf_rmvae import objectives
from tf_rmvae.models import recursion

tfd = tfp.distributions


class UserVAE(keras.Model):
    """A user's keras.io-style VAE (their own decoder and likelihood) whose encoder is trained by RME."""

    def __init__(self, components=3, method="rme", latent_dim=8, **rme_kwargs):
        super().__init__()
        self.encoder = tf_rmvae.RecursiveMixtureEncoder(latent_dim, components, hidden_units=(64,), seed=0,
                                                       shared_trunk=False)
        self.hidden = keras.layers.Dense(64, activation="relu")
        self.pixel_logits = keras.layers.Dense(784)
        self.rme = tf_rmvae.RecursiveMixtureTrainer(self.encoder, method=method, **{**TEST_SETTINGS, **rme_kwargs})
        self.elbo_tracker = keras.metrics.Mean(name="elbo")

    @property
    def metrics(self):
        return [self.elbo_tracker]

    def decode(self, z):  # [..., D] -> Bernoulli over [..., 28, 28, 1]
        logits = tf.reshape(self.pixel_logits(self.hidden(z)), tf.concat([tf.shape(z)[:-1], [28, 28, 1]], 0))
        return tfd.Independent(tfd.Bernoulli(logits=logits), reinterpreted_batch_ndims=3)

    def log_likelihood(self, x, z):  # x [B, 28, 28, 1], z [S, B, M, D] -> [S, B, M]
        return self.decode(z).log_prob(x[None, :, None])

    def add_component(self):  # called by tf_rmvae.ComponentSchedule
        return self.rme.add_component()

    def train_step(self, x):
        with tf.GradientTape(persistent=True) as tape:
            terms = self.rme.terms(x, self.log_likelihood)
            losses = self.rme.losses(terms, self.optimizer)
        self.rme.apply_gradients(tape, losses, self.optimizer, self.trainable_variables)
        self.rme.after_step(terms)
        self.elbo_tracker.update_state(terms.elbo)
        return {"elbo": self.elbo_tracker.result()}


def iwae_log_likelihood(model, x, iwae_samples=100):
    """`[B]` importance-weighted log-likelihood with the model's mixture posterior as proposal."""
    q = model.encoder(x)
    z = q.sample(iwae_samples)
    prior = tfd.MultivariateNormalDiag(tf.zeros(model.encoder.latent_dim))
    log_weights = model.decode(z).log_prob(x[None]) + prior.log_prob(z) - q.log_prob(z)
    return objectives.log_mean_exp(log_weights, axis=0).numpy()


def trained_user_vae(train, components, method, epochs=3):
    keras.utils.set_random_seed(0)
    model = UserVAE(components, method, eps_search_every=5)
    model.compile(keras.optimizers.Adam(3e-3))
    callbacks = [tf_rmvae.ComponentSchedule(epochs_per_component=1)] if method == "rme" else []
    model.fit(train, batch_size=100, epochs=epochs, verbose=0, callbacks=callbacks)
    return model


@pytest.mark.slow
def test_user_vae_trained_by_rme_adds_weighted_components_and_is_no_worse_than_as_a_plain_vae():
    train, test = mnist_digits(1000), tf.constant(mnist_digits(300, "test"))
    rme = trained_user_vae(train, components=3, method="rme")
    vae = trained_user_vae(train, components=1, method="vae")
    weights = np.exp(rme.encoder.mixture_log_weights().numpy())
    assert int(rme.encoder.num_active_components.numpy()) == 3
    assert np.all(weights > 1e-3), weights  # every component joined with a weight the line search chose
    tf.random.set_seed(1)
    difference = iwae_log_likelihood(rme, test) - iwae_log_likelihood(vae, test)
    # Tolerance: 2 nats on the mean (over seeds this small run's difference ranged from -0.6 to +1.9 nats).
    assert difference.mean() > -2.0, (difference.mean(), difference.std() / np.sqrt(len(difference)))


class SameAsModelVAE(keras.Model):
    """`RecursiveMixtureVAE`'s networks and training noise in a user's model (for the one-implementation
    test)."""

    def __init__(self, model):
        super().__init__()
        self.encoder, self.decoder = model.encoder, model.decoder
        self.rme = tf_rmvae.RecursiveMixtureTrainer(self.encoder, eps_search_every=2, train_previous=False,
                                                    **TEST_SETTINGS)

    def add_component(self):
        return self.rme.add_component()

    def train_step(self, x):
        with tf.GradientTape(persistent=True) as tape:
            noise = self.rme.training_noise(x, self.optimizer.iterations)
            terms = self.rme.terms(x, lambda x, z: self.decoder(z).log_prob(x[None, :, None]), noise=noise)
            losses = self.rme.losses(terms, self.optimizer)
        self.rme.apply_gradients(tape, losses, self.optimizer, self.trainable_variables)
        self.rme.after_step(terms)
        return {"elbo": tf.reduce_mean(terms.elbo)}


@pytest.mark.slow
def test_a_user_vae_and_recursive_mixture_vae_share_one_training_step():
    x = mnist_digits(200)
    results = []
    for user in (False, True):
        keras.utils.set_random_seed(2)
        model = tiny_model("rme", components=2, eps_search_every=2, train_previous=False)
        model.ensure_built(x.shape)
        trained = SameAsModelVAE(model) if user else model
        trained.compile(keras.optimizers.Adam(3e-3), run_eagerly=True)
        trained.fit(x, batch_size=50, epochs=2, verbose=0,
                    callbacks=[tf_rmvae.ComponentSchedule(steps_per_component=2)])
        results.append([v.numpy() for v in model.encoder.weights + model.decoder.weights])
    for model_value, user_value in zip(*results):
        np.testing.assert_array_equal(model_value, user_value)


def test_the_method_chooses_the_criterion_and_the_component_training():
    settings = dict(lambda_kl=0.5, max_log_ratio=5.0, boosting_entropy_weight=1.0, component_bound="elbo",
                    encoder_gradient="reparam", encoder_groups=1)
    assert objectives.component_criterion("rme", **settings) == objectives.RMECriterion(0.5, 5.0)
    assert isinstance(objectives.component_criterion("boosting", **settings), objectives.BoostingCriterion)
    assert not objectives.component_criterion("mixture", **settings).recursive
    assert recursion.component_training("rme", "stagewise", False) == recursion.StagewiseTraining(False)
    assert recursion.component_training("rme", "sweep", True) == recursion.JointTraining()
    assert recursion.component_training("mixture", "stagewise", True) == recursion.JointTraining()
    frozen = recursion.StagewiseTraining(train_previous=False)
    assert frozen.freezes and frozen.trained_components(2, 3).numpy().tolist() == [False, True, False]
    assert recursion.JointTraining().trained_components(2, 3).numpy().tolist() == [True, True, False]


@pytest.mark.parametrize("sources", [None, [0, 1, 0]])
def test_own_log_prob_is_the_pairwise_density_at_each_slots_own_component(sources):
    rng = np.random.default_rng(0)
    loc = tf.constant(rng.normal(size=(4, 3, 5)), tf.float32)
    scale = tf.constant(rng.uniform(0.5, 2.0, size=(4, 3, 5)), tf.float32)
    z = tf.constant(rng.normal(size=(2, 4, 3, 5)), tf.float32)
    sources = None if sources is None else tf.constant(sources)
    expected = objectives.own_log_density(recursion.pairwise_log_prob(loc, scale, z), sources)
    np.testing.assert_allclose(recursion.own_log_prob(loc, scale, z, sources).numpy(), expected.numpy(), rtol=1e-6)


def test_gradient_routes_send_the_criteria_to_the_networks_and_the_bound_to_the_rest():
    model = tiny_model("rme", components=2)
    model.ensure_built((None, 28, 28, 1))
    x = tf.constant(mnist_digits(8))
    with tf.GradientTape(persistent=True) as tape:
        losses = model.rme.losses(model.terms(x))
    routes = model.rme.gradient_routes(losses, model.trainable_variables)
    assert [loss is losses.mixture for loss, _ in routes] == [True, False]
    assert [id(v) for v in routes[0][1]] == [id(v) for v in model.decoder.trainable_variables]
    assert [id(v) for v in routes[1][1]] == [id(v) for v in model.encoder.networks.trainable_variables]
    assert all(g is not None for loss, variables in routes for g in tape.gradient(loss, variables))
    joint = tiny_model("mixture", components=2)
    joint.ensure_built((None, 28, 28, 1))
    losses = joint.rme.losses(joint.terms(x))
    (loss, variables), = joint.rme.gradient_routes(losses, joint.trainable_variables)
    assert len(variables) == len(joint.trainable_variables)  # no criterion: everything trains on the bound


def test_joint_schedules_do_not_add_components_and_vae_needs_one_component():
    model = tiny_model("mixture", components=2)
    model.ensure_built((None, 28, 28, 1))
    with pytest.raises(ValueError, match="does not add components"):
        model.rme.add_component()
    with pytest.raises(ValueError, match="max_components=1"):
        tf_rmvae.RecursiveMixtureTrainer(tf_rmvae.RecursiveMixtureEncoder(4, 2), method="vae")
    with pytest.raises(TypeError, match="RecursiveMixtureEncoder"):
        tf_rmvae.RecursiveMixtureTrainer(tf_rmvae.GaussianEncoder(4))
    clone = tf_rmvae.RecursiveMixtureTrainer.from_config(model.rme.get_config())
    assert clone.component_training == model.rme.component_training and clone.criterion == model.rme.criterion


def test_freezing_earlier_components_on_a_shared_trunk_is_refused_by_the_library():
    """The command line refuses it (`RunConfig.validate`); so does the library, naming the fix."""
    encoder = tf_rmvae.RecursiveMixtureEncoder(4, 3, hidden_units=(8,), shared_trunk=True)
    with pytest.raises(ValueError, match="shared_trunk=False"):
        recursion.RecursiveMixtureTrainer(encoder, method="rme", train_previous=False)
    recursion.RecursiveMixtureTrainer(encoder, method="rme", train_previous=True)  # training them is fine
    separate = tf_rmvae.RecursiveMixtureEncoder(4, 3, hidden_units=(8,), shared_trunk=False)
    assert recursion.RecursiveMixtureTrainer(separate, method="rme", train_previous=False).component_training.freezes
