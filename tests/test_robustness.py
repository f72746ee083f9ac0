"""Numerical robustness, non-finite inputs, mixed precision, replication (issue 6)."""

import json
import os
import subprocess
import sys
import textwrap

import hypothesis
import hypothesis.strategies as st
import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_rmvae
from tests.helpers import mnist_digits, tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compiled(model, jit_compile=False):
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=jit_compile)
    return model


def batches(x, size=50):
    return tf.data.Dataset.from_tensor_slices(x).batch(size)


def all_finite(model):
    return all(np.all(np.isfinite(keras.ops.convert_to_numpy(v))) for v in model.weights)


@pytest.mark.slow
def test_nan_batch_raises_an_error_naming_the_step_and_leaves_weights_intact():
    x = mnist_digits(150)
    x[120, 3, 4, 0] = np.nan  # third batch
    model = compiled(tiny_model("rme"))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"optimizer step.*\n?.*2.*NaN/Inf inputs"):
        model.fit(batches(x), epochs=1, verbose=0)
    assert all_finite(model)


def test_nan_examples_are_skipped_on_request():
    x = mnist_digits(150)
    x[10, 0, 0, 0] = np.inf
    x[60] = np.nan
    model = compiled(tiny_model("rme", nonfinite_inputs="skip"))
    history = model.fit(batches(x), epochs=1, verbose=0).history
    assert history["nonfinite_examples"] == [2.0]
    assert np.isfinite(history["elbo"][0]) and all_finite(model)


@pytest.mark.slow
def test_under_xla_the_guard_callback_names_the_batch():
    x = mnist_digits(150)
    x[70, 5, 5, 0] = np.nan  # second batch
    model = compiled(tiny_model("rme"), jit_compile=True)
    with pytest.raises(RuntimeError, match="Batch 1 of epoch 0 had NaN/Inf inputs"):
        model.fit(batches(x), epochs=1, verbose=0, callbacks=[tf_rmvae.NonFiniteInputGuard()])
    assert all_finite(model)


@pytest.mark.parametrize("bound", ["elbo", "iw"])
def test_extreme_inputs_and_tiny_weights_stay_finite(bound):
    model = tiny_model("rme", components=3, bound=bound)
    images = np.stack([np.zeros((28, 28, 1)), np.ones((28, 28, 1))]).astype("float32")
    model.ensure_built(images.shape)
    model.add_component()
    model.add_component()
    model.encoder.set_mixing_proportion(1, 1e-8)
    model.encoder.set_mixing_proportion(2, 1e-8)
    # Very large decoder logits: scale the output layer.
    head = model.decoder.head
    head.kernel.assign(head.kernel * 1e4)
    with tf.GradientTape() as tape:
        terms = model.terms(tf.constant(images), 2)
        loss = -tf.reduce_sum(terms.bound) - tf.reduce_sum(terms.criterion)  # what training differentiates
    grads = tape.gradient(loss, model.trainable_variables)
    assert np.all(np.isfinite(terms.elbo.numpy())) and np.all(np.isfinite(terms.bound.numpy()))
    assert all(np.all(np.isfinite(g.numpy())) for g in grads if g is not None)
    assert np.all(np.isfinite(model.log_likelihood(images, iwae_samples=16).numpy()))
    weights = np.exp(model.encoder.mixture_log_weights().numpy())
    assert weights[1] > 0 and weights[1] < 1e-7


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_training_keeps_distributions_in_float32(policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = compiled(tiny_model("rme", components=2))
        history = model.fit(batches(mnist_digits(200)), epochs=2, verbose=0,
                            callbacks=[tf_rmvae.ComponentSchedule(epochs_per_component=1)]).history
        q = model.posterior(mnist_digits(4))
        assert q.dtype == tf.float32
        assert model.decoder(q.sample()).dtype == tf.float32
        assert np.all(np.isfinite(history["elbo"])) and all_finite(model)
    finally:
        keras.mixed_precision.set_global_policy("float32")


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(
    batch=st.integers(1, 5),
    features=st.integers(1, 7),
    latent=st.integers(1, 4),
    slots=st.integers(1, 4),
    active=st.integers(1, 4),
    magnitude=st.sampled_from([1e-3, 1.0, 1e3]),
    draws=st.integers(1, 3),
)
def test_encoder_shapes_and_log_prob_over_random_configurations(batch, features, latent, slots, active,
                                                                 magnitude, draws):
    active = min(active, slots)
    encoder = tf_rmvae.RecursiveMixtureEncoder(
        latent, slots, hidden_units=(4,), initial_active_components=active, seed=0)
    x = tf.random.stateless_normal([batch, features], seed=[batch, features]) * magnitude
    q = encoder(x)
    z = q.sample(draws, seed=1)
    log_prob = q.log_prob(z)
    assert z.shape == (draws, batch, latent)
    assert log_prob.shape == (draws, batch)
    assert np.all(np.isfinite(log_prob.numpy()))
    probs = q.mixture_distribution.probs_parameter().numpy()
    assert np.all(probs[:, active:] == 0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


MIRRORED_SCRIPT = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import tf_rmvae
    from tests.helpers import mnist_digits, tiny_model

    def run(strategy):
        keras.utils.set_random_seed(0)
        with strategy.scope():
            model = tiny_model("rme", components=2, eps_search_every=3)
            model.compile(optimizer=keras.optimizers.Adam(1e-3))
        data = tf.data.Dataset.from_tensor_slices(mnist_digits(400)).batch(100, drop_remainder=True)
        history = model.fit(data, epochs=2, verbose=0,
                            callbacks=[tf_rmvae.ComponentSchedule(epochs_per_component=1)]).history
        return {k: [float(v) for v in vals] for k, vals in history.items()}

    single = run(tf.distribute.OneDeviceStrategy("/cpu:0"))
    mirrored = run(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))
    print(json.dumps({"single": single, "mirrored": mirrored}))
""")


@pytest.mark.slow
def test_mirrored_strategy_over_two_devices_matches_one_device(tmp_path):
    script = tmp_path / "mirrored.py"
    script.write_text(MIRRORED_SCRIPT)
    env = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    single, mirrored = result["single"], result["mirrored"]
    assert mirrored["active_components"] == single["active_components"] == [1.0, 2.0]
    for key in ("loss", "elbo", "kl", "weight_1"):
        np.testing.assert_allclose(mirrored[key], single[key], rtol=1e-5, atol=1e-4, err_msg=key)
