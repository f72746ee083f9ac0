import numpy as np
import pytest
import tensorflow as tf
import tensorflow_probability as tfp

import tf_rmvae
from tf_rmvae import RecursiveMixtureEncoder
from tf_rmvae.layers.component_networks import ComponentNetworks

tfd = tfp.distributions


def encoder_with(active, latent_dim=2, max_components=4, eps=0.4, shared_trunk=False, **kwargs):
    encoder = RecursiveMixtureEncoder(latent_dim, max_components, hidden_units=(16,), seed=7,
                                      shared_trunk=shared_trunk, **kwargs)
    encoder(tf.zeros([1, 5]))
    for _ in range(active - 1):
        encoder.add_component(eps)
    return encoder


@pytest.mark.parametrize("active", [1, 2, 4])
def test_mixture_density_integrates_to_one_in_1d(active):
    encoder = encoder_with(active, latent_dim=1, init_noise=1.0)
    q = encoder(tf.random.stateless_normal([3, 5], seed=[0, 1]))
    grid = np.linspace(-20, 20, 200001, dtype=np.float32)  # fine enough for scales down to ~1e-3
    density = np.exp(q.log_prob(grid[:, None, None]).numpy())  # [G, B]
    np.testing.assert_allclose(np.trapezoid(density, grid, axis=0), 1.0, atol=1e-3)


@pytest.mark.parametrize("active", [1, 3])
def test_mixture_density_integrates_to_one_in_2d(active):
    encoder = encoder_with(active, latent_dim=2, init_noise=1.0)
    q = encoder(tf.random.stateless_normal([2, 5], seed=[0, 2]))
    axis = np.linspace(-12, 12, 481, dtype=np.float32)
    grid = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 1, 2)
    density = np.exp(q.log_prob(grid).numpy()).reshape(len(axis), len(axis), 2)
    mass = np.trapezoid(np.trapezoid(density, axis, axis=0), axis, axis=0)
    np.testing.assert_allclose(mass, 1.0, atol=2e-3)


def test_inactive_components_have_exactly_zero_weight_and_weights_sum_to_one():
    for active in range(1, 5):
        encoder = encoder_with(active, eps=0.3)
        probs = encoder(tf.ones([2, 5])).mixture_distribution.probs_parameter().numpy()
        assert np.all(probs[:, active:] == 0.0)
        assert np.all(probs[:, :active] > 0.0)
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)


def test_monte_carlo_kl_with_one_component_matches_closed_form():
    encoder = encoder_with(1, latent_dim=3)
    q = encoder(tf.random.stateless_normal([4, 5], seed=[3, 4]))
    prior = tfd.MultivariateNormalDiag(tf.zeros(3))
    z = q.sample(20000, seed=5)
    log_ratio = (q.log_prob(z) - prior.log_prob(z)).numpy()
    mc, stderr = log_ratio.mean(0), log_ratio.std(0) / np.sqrt(len(log_ratio))
    component = tfd.MultivariateNormalDiag(q.components_distribution.distribution.loc[:, 0],
                                           q.components_distribution.distribution.scale[:, 0])
    closed = tfd.kl_divergence(component, prior).numpy()
    assert np.all(np.abs(mc - closed) < 4 * stderr + 1e-4)


def test_sample_is_reparameterized_into_every_active_component():
    encoder = encoder_with(2, eps=0.5, learn_mixing_proportions=True)
    x = tf.random.stateless_normal([8, 5], seed=[5, 6])
    with tf.GradientTape() as tape:
        z = encoder(x).sample(seed=3)
        loss = tf.reduce_sum(tf.square(z - 1.0))
    networks = encoder.networks
    grads = tape.gradient(loss, [networks.loc_kernel, networks.scale_kernel, encoder.mixing_logits])
    for grad in grads[:2]:
        norms = tf.norm(tf.reshape(grad, [4, -1]), axis=1).numpy()
        assert np.all(norms[:2] > 0) and np.all(norms[2:] == 0)
    assert np.abs(grads[2].numpy()[1]) > 0  # the mixing proportion of component 2 gets a gradient too


def test_batched_pass_equals_each_component_network_run_alone():
    encoder = encoder_with(3, latent_dim=4, init_noise=0.5)
    x = tf.random.stateless_normal([6, 5], seed=[7, 8])
    _, loc, scale = encoder.compute_parameters(x)
    net = encoder.networks
    for m in range(4):
        hidden = tf.nn.relu(x @ net.dense_kernels[0][m] + net.dense_biases[0][m])
        np.testing.assert_allclose(loc[:, m], hidden @ net.loc_kernel[m] + net.loc_bias[m], atol=1e-5)
        raw = hidden @ net.scale_kernel[m] + net.scale_bias[m]
        np.testing.assert_allclose(scale[:, m], tf.nn.softplus(raw) + encoder.min_scale, atol=1e-5)


@pytest.mark.parametrize("hidden_units", [(16,), ()])
@pytest.mark.parametrize("shared_trunk", [False, True])
def test_conv_trunk_components_are_independent_networks(shared_trunk, hidden_units):
    encoder = RecursiveMixtureEncoder(3, 2, architecture="conv", conv_filters=(4, 8), hidden_units=hidden_units,
                                      shared_trunk=shared_trunk, initial_active_components=2, seed=1)
    x = tf.random.stateless_uniform([2, 12, 12, 1], seed=[1, 1])
    _, loc, scale = encoder.compute_parameters(x)
    assert loc.shape == (2, 2, 3) and scale.shape == (2, 2, 3)
    # Changing the second component's variables leaves the first component's outputs untouched.
    for variable in encoder.component_variables:
        values = variable.numpy()
        values[1] += 0.5
        variable.assign(values)
    _, loc_after, _ = encoder.compute_parameters(x)
    np.testing.assert_allclose(loc_after[:, 0], loc[:, 0], atol=1e-6)
    assert np.max(np.abs(loc_after[:, 1] - loc[:, 1])) > 1e-3


def test_adding_components_does_not_retrace_and_works_under_xla():
    encoder = encoder_with(1)
    traces = []

    @tf.function(jit_compile=True)
    def mean_log_prob(x):
        traces.append(1)
        q = encoder(x)
        return tf.reduce_mean(q.log_prob(tf.zeros([tf.shape(x)[0], 2])))

    x = tf.ones([3, 5])
    before = mean_log_prob(x).numpy()
    encoder.add_component(0.5)
    after = mean_log_prob(x).numpy()
    assert len(traces) == 1
    assert before != after


def test_copied_component_starts_near_its_source():
    encoder = encoder_with(1, init_noise=0.01)
    encoder.add_component(0.0)
    _, loc, _ = encoder.compute_parameters(tf.ones([2, 5]))
    np.testing.assert_allclose(loc[:, 1], loc[:, 0], atol=0.05)
    assert np.max(np.abs(loc[:, 1] - loc[:, 0])) > 0


def test_functional_api_with_parameter_outputs():
    import keras

    inputs = keras.Input((5,))
    outputs = RecursiveMixtureEncoder(2, 3, hidden_units=(8,), output_mode="parameters")(inputs)
    model = keras.Model(inputs, outputs)
    log_w, loc, scale = model.predict(np.ones((4, 5), np.float32), verbose=0)
    q = tf_rmvae.make_mixture(log_w, loc, scale)
    assert q.batch_shape == (4,) and q.event_shape == (2,)
    assert np.all(np.isfinite(q.log_prob(np.zeros((4, 2), np.float32))))


def test_functional_api_with_distribution_output_explains_the_fix():
    import keras

    with pytest.raises(ValueError, match="output_mode='parameters'"):
        RecursiveMixtureEncoder(2, 3)(keras.Input((5,)))


def test_bad_constructor_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="max_components must be >= 1"):
        RecursiveMixtureEncoder(2, 0)
    with pytest.raises(ValueError, match="latent_dim"):
        RecursiveMixtureEncoder(0, 2)
    with pytest.raises(ValueError, match="architecture"):
        RecursiveMixtureEncoder(2, 2, architecture="transformer")
    with pytest.raises(ValueError, match="initial_active_components"):
        RecursiveMixtureEncoder(2, 2, initial_active_components=3)


def test_add_component_past_the_limit_raises():
    encoder = encoder_with(4)
    with pytest.raises(ValueError, match="all max_components=4 components are already active"):
        encoder.add_component()


def test_bad_inputs_raise_clear_errors():
    encoder = encoder_with(1)
    with pytest.raises(ValueError, match=r"expected inputs of shape"):
        encoder(tf.ones([2, 6]))
    with pytest.raises(ValueError, match=r"expected inputs of shape"):
        encoder(tf.ones([2, 5, 1]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        encoder(tf.constant([[0.0, np.nan, 0.0, 0.0, 0.0]]))
    graph_call = tf.function(lambda x: encoder(x).mean())
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN or Inf"):
        graph_call(tf.constant([[0.0, np.inf, 0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"conv.*\[B, H, W, C\]"):
        RecursiveMixtureEncoder(2, 2, architecture="conv")(tf.ones([2, 5]))


def test_gaussian_encoder_equals_a_one_component_mixture_encoder_with_the_same_seed():
    x = tf.random.stateless_normal([3, 12, 12, 1], seed=[4, 4])
    settings = dict(architecture="conv", conv_filters=(4, 8), hidden_units=(16,), seed=9)
    gaussian = tf_rmvae.GaussianEncoder(3, **settings)
    mixture = RecursiveMixtureEncoder(3, 1, **settings)
    loc, scale = gaussian.compute_parameters(x)
    _, mixture_loc, mixture_scale = mixture.compute_parameters(x)
    np.testing.assert_array_equal(loc.numpy(), mixture_loc[:, 0].numpy())
    np.testing.assert_array_equal(scale.numpy(), mixture_scale[:, 0].numpy())
    assert gaussian(x).event_shape == (3,)
    clone = tf_rmvae.GaussianEncoder.from_config(gaussian.get_config())
    np.testing.assert_array_equal(clone.compute_parameters(x)[0].numpy(), loc.numpy())


def test_component_networks_and_mixing_weights_are_serializable_layers():
    import keras

    networks = tf_rmvae.ComponentNetworks(2, 3, hidden_units=(8,), seed=1)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(networks))
    x = tf.ones([2, 5])
    for a, b in zip(networks(x), restored(x)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    weights = tf_rmvae.RecursiveMixingWeights(3, initial_active_components=2, learn_mixing_proportions=True)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(weights))
    assert restored.get_config() == weights.get_config()
    weights.ensure_built()
    weights.activate_next(0.25)
    expected = [0.5 * 0.75, 0.5 * 0.75, 0.25]  # eps = 1/2 for two components, then eps = 0.25
    np.testing.assert_allclose(np.exp(weights.log_weights().numpy()), expected, atol=1e-6)
    with pytest.raises(ValueError, match="already active"):
        weights.activate_next(0.1)


@pytest.mark.parametrize("built", [False, True])
def test_configure_mixing_sets_the_active_count_and_trainability_before_or_after_the_build(built):
    encoder = RecursiveMixtureEncoder(2, 3, hidden_units=(4,), learn_mixing_proportions=True)
    if built:
        encoder(tf.ones([1, 5]))
    encoder.configure_mixing(all_active=True, learn_proportions=False)
    encoder(tf.ones([1, 5]))
    assert int(encoder.num_active_components.numpy()) == 3
    assert not encoder.mixing_logits.trainable
    assert encoder.get_config()["learn_mixing_proportions"]  # the config keeps the constructor arguments


@pytest.mark.parametrize("architecture", ["dense", "conv"])
@pytest.mark.parametrize("components", [1, 3])
@pytest.mark.parametrize("shared_trunk", [False, True])
def test_two_layer_networks_and_gradients_match_a_batched_matmul_reference(shared_trunk, components, architecture):
    networks = ComponentNetworks(components, 4, architecture=architecture, conv_filters=(3, 5), hidden_units=(8, 6),
                                 shared_trunk=shared_trunk, seed=2)
    shared = networks.shared_trunk  # one component is one network either way
    assert shared == (shared_trunk and components > 1)
    x = tf.random.stateless_uniform([5, 7] if architecture == "dense" else [5, 6, 6, 2], seed=[3, 4])
    networks(x)
    weights = tf.random.stateless_normal([5, components, 4], seed=[5, 6])

    def convolutions(component):  # one component's convolution stack, [B, H, W, C] -> [B, F]
        h = x
        for kernel, bias in zip(networks.conv_kernels, networks.conv_biases):
            if not shared:
                kernel, bias = kernel[component], bias[component]
            h = tf.nn.relu(tf.nn.conv2d(h, kernel, strides=2, padding="SAME") + bias)
        return tf.reshape(h, [5, -1])

    def reference():  # the broadcast batched matmuls of the M networks, written out
        if architecture == "dense":
            h = x[None]
        else:
            h = convolutions(0)[None] if shared else tf.stack([convolutions(m) for m in range(components)])
        for kernel, bias in zip(networks.dense_kernels, networks.dense_biases):
            h = tf.nn.relu(tf.matmul(h, kernel) + (bias if shared else bias[:, None, :]))
        loc = tf.transpose(tf.matmul(h, networks.loc_kernel) + networks.loc_bias[:, None, :], [1, 0, 2])
        raw = tf.transpose(tf.matmul(h, networks.scale_kernel) + networks.scale_bias[:, None, :], [1, 0, 2])
        return loc, tf.nn.softplus(raw) + networks.min_scale

    results = []
    for forward in (lambda: networks.compute_parameters(x), reference):
        with tf.GradientTape() as tape:
            loc, scale = forward()
            loss = tf.reduce_sum(weights * loc) + tf.reduce_sum(weights * scale)
        results.append((loc, scale, tape.gradient(loss, networks.trainable_variables)))
    (loc, scale, grads), (loc_ref, scale_ref, grads_ref) = results
    assert loc.shape == scale.shape == (5, components, 4)
    np.testing.assert_allclose(loc, loc_ref, atol=1e-6)
    np.testing.assert_allclose(scale, scale_ref, atol=1e-6)
    assert len(grads) == len(grads_ref) == len(networks.trainable_variables)
    for grad, grad_ref in zip(grads, grads_ref):
        assert grad is not None and float(tf.reduce_max(tf.abs(grad))) > 0
        np.testing.assert_allclose(grad, grad_ref, atol=1e-5)
