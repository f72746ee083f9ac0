"""Presets: the recommended model in one line from Python and from the command line, the same configuration both
ways, and explicit settings over a preset."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

import tf_rmvae
from tests.test_trainer import _config_from_flags
from tf_rmvae.run.config import PRESETS, ConfigError, RunConfig


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_python_and_the_command_line_resolve_a_preset_alike(preset):
    from_flags = _config_from_flags("--model_dir=/tmp/x", f"--preset={preset}")
    from_python = RunConfig.from_preset(preset, model_dir="/tmp/x").validate()
    assert from_flags == from_python
    for name, value in PRESETS[preset].items():
        assert getattr(from_flags, name) == value


def test_explicit_flags_and_arguments_override_the_preset():
    from_flags = _config_from_flags("--model_dir=/tmp/x", "--preset=paper", "--num_components=2", "--lambda_kl=1")
    from_python = RunConfig.from_preset("paper", model_dir="/tmp/x", num_components=2, lambda_kl=1.0)
    assert from_flags == from_python
    assert (from_flags.num_components, from_flags.lambda_kl, from_flags.bound) == (2, 1.0, "elbo")
    with pytest.raises(ConfigError, match="--preset"):
        RunConfig.from_preset("best")


def test_the_default_preset_is_the_configurations_defaults():
    assert PRESETS["default"] == {}
    assert RunConfig.from_preset(model_dir="x") == RunConfig(model_dir="x")


def test_build_model_gives_the_recommended_model_and_the_papers_recursion():
    default = tf_rmvae.build_model(hidden_units=(16,), latent_dim=4)
    resolved = RunConfig(model_dir="x").resolved()
    trainer = default.rme
    assert (trainer.method, trainer.bound, trainer.component_bound, trainer.num_samples, trainer.lambda_kl) == (
        resolved.method, resolved.bound, resolved.component_bound, resolved.num_samples, resolved.lambda_kl)
    assert default.encoder.max_components == resolved.num_components and default.encoder.shared_trunk
    paper = tf_rmvae.build_model("paper", hidden_units=(16,), latent_dim=4)
    assert (paper.rme.bound, paper.rme.component_bound, paper.rme.num_samples, paper.rme.lambda_kl) == (
        "elbo", "elbo", 1, 0.3)
    assert not paper.encoder.shared_trunk and paper.encoder.max_components == 4
    x = np.random.default_rng(0).integers(0, 2, size=(8, 28, 28, 1)).astype("float32")
    history = paper.fit(x, batch_size=4, epochs=1, verbose=0)  # compiled and built: ready to train
    assert np.isfinite(history.history["loss"][-1])
    assert inspect.signature(tf_rmvae.build_model).parameters["preset"].default == "default"
