"""Weights files written by tf-rmvae 0.1 (encoder variables in the encoder itself) load into the split layers."""

import json
import os

import h5py
import keras
import numpy as np
import pytest

import tf_rmvae
from tests.helpers import TEST_SETTINGS
from tf_rmvae.models import legacy_weights
from tf_rmvae.models.semi_amortized import SemiAmortizedVAE

# Written by tf-rmvae 0.1 (commit 7c4cbe1) with the settings below; expected.json holds what 0.1 computed from them.
FIXTURES = os.path.join(os.path.dirname(__file__), "data", "weights_0.1")
DIGITS = (np.random.default_rng(0).random((20, 28, 28, 1)) > 0.5).astype("float32")


def fixture(name):
    return os.path.join(FIXTURES, name)


def compiled(model, variables):
    model.ensure_built((None, 28, 28, 1))
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.optimizer.build(variables(model))
    return model


def rme_model(seed=7):  # another seed than the file's: every loaded value must come from the file
    # A weights file holds no settings: a 0.1 RME was the paper's (independent networks, ELBO bound and criteria,
    # one sample per component, lambda 0.3), the defaults then (its loss is -ELBO).
    return compiled(tf_rmvae.RecursiveMixtureVAE(
        tf_rmvae.RecursiveMixtureEncoder(2, 2, hidden_units=(3,), seed=seed, shared_trunk=False),
        tf_rmvae.BernoulliDecoder((28, 28, 1), hidden_units=(3,)), eps_search_every=2, bound="elbo",
        **TEST_SETTINGS,
    ), lambda m: m.trainable_variables)


def test_a_0_1_rme_file_is_recognised_and_a_current_one_is_not(tmp_path):
    assert legacy_weights.is_legacy(fixture("rme.weights.h5"))
    model = rme_model()
    model.load_weights(fixture("rme.weights.h5"))
    model.save_weights(str(tmp_path / "current.weights.h5"))
    assert not legacy_weights.is_legacy(str(tmp_path / "current.weights.h5"))
    assert not legacy_weights.is_legacy(str(tmp_path / "missing.weights.h5"))


def test_a_0_1_rme_file_restores_weights_recursion_state_and_optimizer():
    expected = json.load(open(fixture("expected.json")))
    model = rme_model()
    model.load_weights(fixture("rme.weights.h5"))
    with h5py.File(fixture("rme.weights.h5"), "r") as f:
        old = [f[f"encoder/vars/{i}"][()] for i in range(len(f["encoder/vars"]))]
        steps = int(f["vars/1"][()])
    current = model.encoder.networks.get_weights() + model.encoder.mixing.get_weights()
    assert len(current) == len(old) and all(np.array_equal(a, b) for a, b in zip(current, old))
    assert int(model.encoder.num_active_components.numpy()) == 2
    assert int(model.rme.eps_search_steps.numpy()) == steps
    assert int(model.optimizer.iterations.numpy()) == 4  # 2 epochs of 2 batches
    metrics = model.evaluate(DIGITS, batch_size=10, verbose=0, return_dict=True)
    for name, value in expected["rme_evaluate"].items():
        assert metrics[name] == pytest.approx(value, rel=1e-6, abs=1e-6), name
    np.testing.assert_allclose(model.posterior_mean(DIGITS[:2]), expected["rme_posterior_mean"], rtol=1e-6)
    loss = model.fit(DIGITS, batch_size=10, epochs=1, verbose=0).history["loss"][0]  # training goes on
    assert np.isfinite(loss) and int(model.optimizer.iterations.numpy()) == 6


def test_a_0_1_savae_file_loads_into_the_gaussian_encoder():
    expected = json.load(open(fixture("expected.json")))
    model = compiled(SemiAmortizedVAE(
        tf_rmvae.GaussianEncoder(2, hidden_units=(3,), seed=7),
        tf_rmvae.BernoulliDecoder((28, 28, 1), hidden_units=(3,)),
        refine_steps=1,
    ), lambda m: m.trainable_variables)
    model.load_weights(fixture("savae.weights.h5"))
    loc, _ = model.amortized_parameters(DIGITS[:2])
    np.testing.assert_allclose(loc, expected["savae_amortized_loc"], rtol=1e-6)
    assert int(model.optimizer.iterations.numpy()) == 2


def test_the_original_file_is_left_as_it_was():
    before = open(fixture("rme.weights.h5"), "rb").read()
    rme_model().load_weights(fixture("rme.weights.h5"))
    assert open(fixture("rme.weights.h5"), "rb").read() == before
