"""A run that trains only an encoder for the frozen decoder of a trained model (`RunConfig.decoder_from`): the
decoder's weights stay as loaded, the encoder trains, the run names the decoder by its weights' digest, and a source
that is missing or does not fit is refused before the run writes anything."""

from __future__ import annotations

import hashlib
import os

import keras
import numpy as np
import pytest

from tf_rmvae.config import ConfigError, RunConfig
from tf_rmvae.data import get_dataset_spec
from tf_rmvae.run import factory as model_factory
from tf_rmvae.run import frozen_decoder, training

TINY = dict(method="vae", num_components=1, hidden_units=(16,), latent_dim=4, batch_size=50, train_examples=100,
            eval_examples=20, iwae_samples=4, verbose=0, epochs=1, validation_examples=0, image_every_epochs=0,
            export_dir="")


def _weights_file(tmp_path, name: str, **changes) -> str:
    """A `.weights.h5` file of a whole (untrained, seeded) model, as `Model.save_weights` writes it."""
    spec = get_dataset_spec("rmvae_mnist")
    config = RunConfig(model_dir="(in memory)", **dict(TINY, **{"seed": 7, **changes})).validate().resolved()
    model = model_factory.build_compiled_model(config, spec.image_shape, spec.binary)
    path = str(tmp_path / f"{name}.weights.h5")
    model.save_weights(path)
    return path


def _decoder_weights(path: str, **changes) -> list[np.ndarray]:
    spec = get_dataset_spec("rmvae_mnist")
    config = RunConfig(model_dir="(in memory)", **dict(TINY, **changes)).validate().resolved()
    model = model_factory.build_compiled_model(config, spec.image_shape, spec.binary)
    model.load_weights(path)
    return model.decoder.get_weights()


def test_a_frozen_decoder_keeps_its_weights_while_the_encoder_trains(tmp_path):
    source = _weights_file(tmp_path, "decoder")
    run = RunConfig(model_dir=str(tmp_path / "encoder"), decoder_from=source,
                    **dict(TINY, method="rme", num_components=2, epochs=2, epochs_per_component=1))
    spec = get_dataset_spec("rmvae_mnist")
    untrained = model_factory.build_compiled_model(run.validate().resolved(), spec.image_shape, spec.binary)
    fitted = training.fit(run)
    model = fitted.model

    for loaded, kept in zip(_decoder_weights(source), model.decoder.get_weights()):
        np.testing.assert_array_equal(loaded, kept)
    assert not model.decoder.trainable and not model.decoder.trainable_weights
    changed = [not np.array_equal(a, b) for a, b in zip(untrained.encoder.get_weights(), model.encoder.get_weights())]
    assert any(changed)
    # The optimizer trains the encoder alone: Adam's two moments per encoder variable, besides its counters.
    encoder_moments = 2 * len(model.encoder.trainable_variables)
    assert len(model.optimizer.variables) - 2 == encoder_moments
    # The run names its decoder by the digest of the weights file, which a resume (from a copy of the file) keeps.
    saved = RunConfig.load(os.path.join(run.model_dir, "config.json"))
    with open(source, "rb") as f:
        assert saved.decoder_sha256 == hashlib.sha256(f.read()).hexdigest()
    copy = str(tmp_path / "copy.weights.h5")
    with open(source, "rb") as f, open(copy, "wb") as g:
        g.write(f.read())
    resumed = training.fit(run.replace(decoder_from=copy))
    assert resumed.resumed_from == 2 and not resumed.history.epoch  # finished: nothing trained again
    other = _weights_file(tmp_path, "other", seed=8)
    with pytest.raises(ConfigError, match="decoder_sha256"):
        training.fit(run.replace(decoder_from=other))
    with pytest.raises(ConfigError, match="decoder_sha256"):  # nor without the frozen decoder it trained against
        training.fit(run.replace(decoder_from=""))
    # A trained run's model loads without its decoder's source (the run's own weights hold the decoder).
    os.remove(source)
    reloaded = model_factory.load_trained_model(run.model_dir)
    for a, b in zip(reloaded.decoder.get_weights(), model.decoder.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_run_directory_names_its_trained_weights(tmp_path):
    run_dir = tmp_path / "vae"
    os.makedirs(run_dir / "backup")
    source = _weights_file(tmp_path, "decoder")
    os.replace(source, run_dir / "backup" / "latest.weights.h5")
    assert frozen_decoder.weights_file(str(run_dir)) == str(run_dir / "backup" / "latest.weights.h5")
    os.makedirs(run_dir / "checkpoints")
    with open(run_dir / "checkpoints" / "best.weights.h5", "wb"):
        pass
    assert frozen_decoder.weights_file(str(run_dir)) == str(run_dir / "checkpoints" / "best.weights.h5")


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file or run directory"),
    ("empty_directory", "without trained weights"),
    ("not_weights", "not a .weights.h5 file"),
    ("other_widths", "does not fit this run's"),
    ("other_latent_dim", "does not fit this run's"),
    ("other_depth", "entries differ"),
    ("no_decoder", "entries differ"),
    ("other_digest", "holds other weights"),
])
def test_a_decoder_source_that_is_missing_or_does_not_fit_is_refused_before_anything_is_written(
        tmp_path, case, message):
    sources = {
        "missing": str(tmp_path / "nothing.weights.h5"),
        "empty_directory": str(tmp_path),
        "other_widths": lambda: _weights_file(tmp_path, "wide", hidden_units=(32,)),
        "other_latent_dim": lambda: _weights_file(tmp_path, "latent", latent_dim=3),
        "other_depth": lambda: _weights_file(tmp_path, "deep", hidden_units=(16, 16)),
        "other_digest": lambda: _weights_file(tmp_path, "decoder"),
    }
    if case == "not_weights":
        source = str(tmp_path / "decoder.npz")
        np.savez(source, x=np.zeros(1))
    elif case == "no_decoder":  # a weights file of a model without a decoder
        source = str(tmp_path / "dense.weights.h5")
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        model.save_weights(source)
    else:
        source = sources[case]() if callable(sources[case]) else sources[case]
    changes = dict(decoder_sha256="0" * 64) if case == "other_digest" else {}
    model_dir = tmp_path / "encoder"
    with pytest.raises(ConfigError, match=message):
        training.fit(RunConfig(model_dir=str(model_dir), decoder_from=source, **TINY, **changes))
    assert not model_dir.exists()


def test_the_digest_needs_a_source_and_a_run_without_one_keeps_its_identity():
    with pytest.raises(ConfigError, match="--decoder_sha256 pins"):
        RunConfig(model_dir="x", decoder_sha256="0" * 64).validate()
    with pytest.raises(ConfigError, match="64 lowercase hex"):
        RunConfig(model_dir="x", decoder_from="d.weights.h5", decoder_sha256="abc").validate()
    plain = RunConfig(model_dir="x")
    pinned = plain.replace(decoder_from="d.weights.h5", decoder_sha256="0" * 64)
    assert plain.identity() == "877f86662c1cead6"  # as before the setting existed (version 02d39fe)
    assert pinned.identity() != plain.identity()
    assert pinned.identity() == pinned.replace(decoder_from="elsewhere/d.weights.h5").identity()
    assert set(pinned.mismatches(plain)) == {"decoder_sha256"}


def test_the_decoder_loaded_is_the_one_the_run_was_pinned_to(tmp_path):
    # load_frozen loads from the bytes it checked against decoder_sha256: a file replaced after the run was pinned
    # is refused, never loaded in its place.
    source = _weights_file(tmp_path, "decoder")
    config = frozen_decoder.pinned(
        RunConfig(model_dir=str(tmp_path / "encoder"), decoder_from=source, **TINY).validate().resolved())
    spec = get_dataset_spec("rmvae_mnist")
    model = model_factory.build_compiled_model(config, spec.image_shape, spec.binary)
    np.testing.assert_array_equal(model.decoder.get_weights()[0], _decoder_weights(source)[0])
    os.replace(_weights_file(tmp_path, "other", seed=8), source)  # same shapes, other weights
    with pytest.raises(ConfigError, match="changed since the run was pinned"):
        model_factory.build_compiled_model(config, spec.image_shape, spec.binary)
