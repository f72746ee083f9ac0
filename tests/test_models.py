import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tf_rmvae
from tests.helpers import mnist_digits, tiny_model
from tf_rmvae import objectives

tfd = tfp.distributions


@pytest.fixture(scope="module")
def digits():
    return mnist_digits(1200)


def dataset(x, batch_size=100):
    return tf.data.Dataset.from_tensor_slices(x).batch(batch_size)


def fitted(model, x, epochs=1, callbacks=(), lr=1e-3, jit_compile=False):
    model.compile(optimizer=keras.optimizers.Adam(lr), jit_compile=jit_compile)
    history = model.fit(dataset(x), epochs=epochs, verbose=0, callbacks=list(callbacks))
    return model, history.history


def mean_elbo(model, x, seed=0):
    tf.random.set_seed(seed)
    return float(tf.reduce_mean(model.elbo(x, num_samples=4)))


@pytest.mark.slow
def test_training_raises_the_test_elbo(digits):
    train, test = digits[:1000], mnist_digits(300, "test")
    model = tiny_model("rme", components=3, eps_search_every=10)
    model.ensure_built(train.shape)
    before = mean_elbo(model, test)
    schedule = tf_rmvae.ComponentSchedule(epochs_per_component=1)
    model, history = fitted(model, train, epochs=3, callbacks=[schedule])
    after = mean_elbo(model, test)
    assert after > before + 100.0, (before, after)
    assert history["active_components"] == [1.0, 2.0, 3.0]
    expected = {"loss", "elbo", "reconstruction", "kl", "criterion", "active_components"}
    expected |= {f"weight_{m}" for m in range(3)} | {f"entropy_{m}" for m in range(3)}
    assert expected <= set(history)


@pytest.mark.slow
def test_a_new_component_leaves_the_mixture_elbo_unchanged(digits):
    model, _ = fitted(tiny_model("rme"), digits[:500])
    before = mean_elbo(model, digits[:200])
    model.add_component()
    np.testing.assert_allclose(mean_elbo(model, digits[:200]), before, atol=1e-3)


@pytest.mark.slow
def test_adding_components_does_not_lower_iwae_on_a_fixed_decoder(digits):
    train, test = digits[:1000], mnist_digits(200, "test")
    model = tiny_model("rme", components=3, eps_search_every=10)
    model, _ = fitted(model, train, epochs=2)
    tf.random.set_seed(1)
    before = model.log_likelihood(test, iwae_samples=200).numpy()
    model.decoder.trainable = False  # the decoder is fixed; only the new components and their eps move
    schedule = tf_rmvae.ComponentSchedule(epochs_per_component=1)
    model, history = fitted(model, train, epochs=2, callbacks=[schedule])
    tf.random.set_seed(1)
    after = model.log_likelihood(test, iwae_samples=200).numpy()
    diff = after - before
    paired_se = diff.std() / np.sqrt(len(diff))
    assert diff.mean() > -3 * paired_se - 0.05, (diff.mean(), paired_se)
    assert history["active_components"][-1] == 2.0


def test_rme_criterion_gives_no_gradient_to_earlier_components(digits):
    model = tiny_model("rme", components=3)
    model.ensure_built(digits.shape)
    model.add_component()
    model.add_component()
    model.encoder.set_mixing_proportion(1, 0.4)
    model.encoder.set_mixing_proportion(2, 0.3)
    variables = model.encoder.component_variables
    with tf.GradientTape(persistent=True) as tape:
        criteria = tf.reduce_sum(model.terms(tf.constant(digits[:16]), 1).criterion, axis=0)  # [M]
        per_component = [criteria[m] for m in range(3)]
    for m in range(3):
        grads = tape.gradient(per_component[m], variables)
        norms = np.array([[float(tf.norm(g[j])) for j in range(3)] for g in grads])  # [vars, M]
        assert np.all(norms[:, :m] == 0.0), m
        assert np.all(norms[:, m] > 0.0), m


@pytest.mark.slow
def test_stagewise_training_freezes_earlier_components_exactly(digits):
    model, _ = fitted(tiny_model("rme", components=3, train_previous=False), digits[:300])
    model.add_component()
    before = [v.numpy().copy() for v in model.encoder.component_variables]
    fitted(model, digits[:300])
    for old, variable in zip(before, model.encoder.component_variables):
        new = variable.numpy()
        np.testing.assert_array_equal(new[0], old[0])  # frozen (despite Adam's momentum)
        assert np.max(np.abs(new[1] - old[1])) > 0  # the newest component trains
        np.testing.assert_array_equal(new[2], old[2])  # inactive


@pytest.mark.slow
def test_line_search_moves_eps_to_the_best_candidate_of_the_grid(digits):
    model, _ = fitted(tiny_model("rme", components=2, eps_search_every=5), digits[:500], epochs=2)
    model.add_component()
    assert model.encoder.mixing_logits.numpy()[1] == pytest.approx(-30.0)
    fitted(model, digits[:500], epochs=2)
    eps = float(tf.sigmoid(model.encoder.mixing_logits[1]))
    candidates = np.array(model.eps_grid)
    assert np.min(np.abs(candidates - eps)) < 1e-5
    weights = np.exp(model.encoder.mixture_log_weights().numpy())
    np.testing.assert_allclose(weights.sum(), 1.0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method,schedule", [("mixture", "stagewise"), ("rme", "sweep"), ("boosting", "stagewise")])
def test_baselines_and_options_train(digits, method, schedule):
    model = tiny_model(method, components=3, schedule=schedule, eps_search_every=5)
    callbacks = [tf_rmvae.ComponentSchedule(epochs_per_component=1)] if model.line_search else []
    model, history = fitted(model, digits[:500], epochs=2, callbacks=callbacks)
    assert np.all(np.isfinite(history["elbo"]))
    if model.all_components_from_start:
        assert history["active_components"] == [3.0, 3.0]
        assert model.encoder.mixing_logits.trainable
        uniform = tf_rmvae.mixing.uniform_mixing_logits(3)
        assert not np.allclose(model.encoder.mixing_logits.numpy()[1:], uniform[1:])
    else:
        assert history["active_components"] == [1.0, 2.0]


def test_vae_needs_one_component():
    with pytest.raises(ValueError, match="max_components=1"):
        tf_rmvae.RecursiveMixtureVAE(
            tf_rmvae.RecursiveMixtureEncoder(4, 2), tf_rmvae.BernoulliDecoder((28, 28, 1)), method="vae")
    with pytest.raises(ValueError, match="lambda_kl"):
        tiny_model(lambda_kl=-1.0)
    with pytest.raises(ValueError, match="max_log_ratio"):  # a library cap of -1 would punish every sample
        tiny_model(max_log_ratio=-1.0)
    assert tiny_model(max_log_ratio=None).get_config()["max_log_ratio"] is None
    with pytest.raises(ValueError, match="method"):
        tiny_model(method="flow")


def test_one_component_kl_matches_closed_form(digits):
    model = tiny_model("vae")
    x = tf.constant(digits[:4])
    model.ensure_built(x.shape)
    kl_mc = model.terms(x, 20000).kl.numpy()
    _, loc, scale = model.encoder.compute_parameters(x)
    q = tfd.MultivariateNormalDiag(loc[:, 0], scale[:, 0])
    closed = tfd.kl_divergence(q, tfd.MultivariateNormalDiag(tf.zeros(8))).numpy()
    # The MC KL is E_q[log q(z) - log p(z)]: its s.e. at 20000 samples is far below 0.05 nats here.
    np.testing.assert_allclose(kl_mc, closed, atol=0.1)


@pytest.mark.slow
def test_keras_file_round_trip_keeps_outputs_and_recursion_state(tmp_path, digits):
    model, _ = fitted(tiny_model("rme", components=3), digits[:300])
    model.add_component()
    model.encoder.set_mixing_proportion(1, 0.25)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    x = digits[:8]
    for a, b in zip(model.encoder.compute_parameters(x), loaded.encoder.compute_parameters(x)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    np.testing.assert_allclose(model(x).numpy(), loaded(x).numpy(), atol=1e-6)
    assert int(loaded.encoder.num_active_components.numpy()) == 2
    assert loaded.method == "rme" and loaded.lambda_kl == pytest.approx(0.3)


@pytest.mark.slow
def test_xla_compiled_training_runs(digits):
    model = tiny_model("rme", components=2, eps_search_every=3)
    model, history = fitted(model, digits[:300], epochs=2, jit_compile=True,
                            callbacks=[tf_rmvae.ComponentSchedule(epochs_per_component=1)])
    assert np.all(np.isfinite(history["elbo"])) and history["active_components"] == [1.0, 2.0]


class ThirdPartyVAE(keras.Model):
    """A user's own VAE in the style of the keras.io example, with our encoder dropped in."""

    def __init__(self):
        super().__init__()
        self.encoder = tf_rmvae.RecursiveMixtureEncoder(8, 3, hidden_units=(64,), initial_active_components=3,
                                                        learn_mixing_proportions=True)
        self.decoder = keras.Sequential([keras.layers.Dense(64, activation="relu"), keras.layers.Dense(784)])
        self.tracker = keras.metrics.Mean(name="loss")

    @property
    def metrics(self):
        return [self.tracker]

    def train_step(self, x):
        with tf.GradientTape() as tape:
            q = self.encoder(x)
            z = q.sample()
            logits = self.decoder(z)
            recon = tf.reduce_sum(
                tf.nn.sigmoid_cross_entropy_with_logits(tf.reshape(x, [-1, 784]), logits), -1)
            prior = tfd.MultivariateNormalDiag(tf.zeros(8))
            loss = tf.reduce_mean(recon + q.log_prob(z) - prior.log_prob(z))
        grads = tape.gradient(loss, self.trainable_weights)
        self.optimizer.apply_gradients(zip(grads, self.trainable_weights))
        self.tracker.update_state(loss)
        return {"loss": self.tracker.result()}


@pytest.mark.slow
def test_encoder_drops_into_a_third_party_vae(digits):
    model = ThirdPartyVAE()
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    history = model.fit(dataset(digits[:1000]), epochs=3, verbose=0).history
    assert history["loss"][-1] < history["loss"][0] - 30.0


@pytest.mark.slow
def test_default_rme_keeps_training_every_active_component(digits):
    model, _ = fitted(tiny_model("rme", components=3), digits[:300])
    model.add_component()
    before = model.encoder.networks.loc_kernel.numpy().copy()
    fitted(model, digits[:300])
    change = np.abs(model.encoder.networks.loc_kernel.numpy() - before).max(axis=(1, 2))
    assert np.all(change[:2] > 0) and change[2] == 0  # both active components train; the inactive slot does not


@pytest.mark.slow
@pytest.mark.parametrize("method, components, samples", [("vae", 1, 4), ("rme", 3, 1)])
def test_importance_weighted_bound_trains_and_lies_above_the_elbo(digits, method, components, samples):
    # vae + iw + 4 samples is IWAE (k = 4); rme + iw trains the decoder and proportions on the stratified
    # importance-weighted bound while the components keep their criteria.
    model = tiny_model(method, components=components, bound="iw", num_samples=samples, eps_search_every=5)
    callbacks = [tf_rmvae.ComponentSchedule(epochs_per_component=1)] if model.line_search else []
    model, history = fitted(model, digits[:500], epochs=2, callbacks=callbacks)
    assert np.all(np.isfinite(history["loss"]))
    # loss = -bound, and the bound is at least the ELBO on the same samples (Jensen), every batch.
    assert all(-loss >= elbo - 1e-4 for loss, elbo in zip(history["loss"], history["elbo"]))
    assert -history["loss"][-1] > history["elbo"][-1] + 0.1  # strictly tighter in practice
    assert tf_rmvae.RecursiveMixtureVAE.from_config(model.get_config()).bound == "iw"


def test_rme_defaults_to_the_importance_weighted_bound_saved_resolved_and_old_models_keep_the_elbo():
    model = tiny_model("rme")
    assert (model.bound, model.rme.component_bound) == ("iw", "elbo")
    assert isinstance(model.rme.criterion, objectives.RMECriterion)  # the paper's component criterion
    config = model.get_config()
    assert config["bound"] == "iw"  # resolved: a later default cannot move a saved model
    # A model saved before the bound was an argument trained on the ELBO, and loads so.
    old = tf_rmvae.RecursiveMixtureVAE.from_config({k: v for k, v in config.items() if k != "bound"})
    assert old.bound == "elbo"
    trainer = {k: v for k, v in model.rme.get_config().items() if k != "bound"}
    assert tf_rmvae.RecursiveMixtureTrainer.from_config(trainer).bound == "elbo"
    assert tiny_model("rme", bound="elbo").bound == "elbo"  # the paper's RME
    for method in ("vae", "mixture", "boosting"):
        assert tiny_model(method).bound == "elbo", method


@pytest.mark.slow
def test_importance_weighted_components_make_the_first_stage_iwae_and_train_every_component(digits):
    # With bound="iw" and component_bound="iw", one active component's criterion is the IWAE bound with
    # k = M samples: the same number as the mixture's bound on the same samples.
    model = tiny_model("rme", components=3, bound="iw", component_bound="iw", eps_search_every=5)
    model.ensure_built((None, 28, 28, 1))
    x = tf.constant(digits[:20])
    terms = model.terms(x, noise=model.rme.training_noise(x, tf.constant(0)))
    np.testing.assert_allclose(terms.criterion[:, 0].numpy(), terms.bound.numpy(), rtol=1e-5)
    schedule = tf_rmvae.ComponentSchedule(epochs_per_component=1)
    model, history = fitted(model, digits[:500], epochs=3, callbacks=[schedule])
    assert history["active_components"] == [1.0, 2.0, 3.0] and np.all(np.isfinite(history["loss"]))
    weights = np.exp(model.encoder.mixture_log_weights().numpy())
    assert np.all(weights > 0.01), weights  # the line search took the joining components into the mixture
    clone = tf_rmvae.RecursiveMixtureVAE.from_config(model.get_config())
    assert clone.rme.component_bound == "iw"
    assert isinstance(clone.rme.criterion, objectives.RMEImportanceWeightedCriterion)


def test_the_test_estimates_sample_count_is_iwae_samples_and_the_old_name_warns(digits):
    model = tiny_model("vae")
    x = digits[:4]
    assert model.log_likelihood(x, iwae_samples=8, chunk_size=4).shape == (4,)
    with pytest.warns(DeprecationWarning, match="iwae_samples"):
        assert model.log_likelihood(x, num_samples=8).shape == (4,)
