"""Presets: the recommended model in one line from Python and from the command line, the same configuration both
ways, and explicit settings over a preset."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest

import tf_rmvae
from tests.helpers import tiny_model
from tests.test_trainer import _config_from_flags
from tf_rmvae import objectives
from tf_rmvae.config import PRESETS, ConfigError, RunConfig
from tf_rmvae.layers.component_networks import ComponentNetworks
from tf_rmvae.layers.decoders import ImageDecoder
from tf_rmvae.models import recursion
from tf_rmvae.models.semi_amortized import SemiAmortizedVAE
from tf_rmvae.run import factory as model_factory


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


def preset_defaults(preset: str = "default") -> dict:
    """The settings of `preset` as the configuration defines them: its fields' defaults under the preset's values."""
    return {**{f.name: f.default for f in dataclasses.fields(RunConfig)}, **PRESETS[preset]}


def signature_defaults(function) -> dict:
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


def test_the_classes_defaults_are_the_configurations_default_preset():
    config = preset_defaults()
    # Each class argument that is a setting of the configuration, and the field it must default to.
    expected = {
        tf_rmvae.RecursiveMixtureTrainer: dict(
            method="method", lambda_kl="lambda_kl", max_log_ratio="max_log_ratio", schedule="schedule",
            train_previous="train_previous", num_samples="num_samples", bound="bound",
            component_bound="component_bound", encoder_gradient="encoder_gradient", encoder_groups="encoder_groups",
            eps_search_every="eps_search_every", noise_seed="seed"),
        tf_rmvae.RecursiveMixtureEncoder: dict(
            latent_dim="latent_dim", max_components="num_components", architecture="architecture",
            hidden_units="hidden_units", conv_filters="conv_filters", shared_trunk="shared_trunk",
            per_example_proportions="per_example_proportions"),
        tf_rmvae.GaussianEncoder: dict(latent_dim="latent_dim", architecture="architecture",
                                       hidden_units="hidden_units", conv_filters="conv_filters"),
        model_factory.build_networks: dict(
            latent_dim="latent_dim", num_components="num_components", architecture="architecture",
            hidden_units="hidden_units", conv_filters="conv_filters", likelihood="decoder",
            shared_trunk="shared_trunk", per_example_proportions="per_example_proportions"),
        tf_rmvae.RecursiveMixtureVAE: dict(nonfinite_inputs="nonfinite_inputs"),
        ComponentNetworks: dict(architecture="architecture", conv_filters="conv_filters",
                                hidden_units="hidden_units", shared_trunk="shared_trunk"),
        ImageDecoder: dict(architecture="architecture", hidden_units="hidden_units"),
        SemiAmortizedVAE: dict(refine_steps="refine_steps", refine_lr="refine_lr", refine_momentum="refine_momentum",
                               encoder_objective="refine_encoder_objective"),
    }
    # Defaults that are the class's own, not the configuration's: SA-VAE's one sample (the configuration's 0 means
    # "the method's own", which is 1 for SA-VAE).
    own = {SemiAmortizedVAE: {"num_samples"}}
    mirrored = {ImageDecoder: {"conv_filters"}}  # the encoder's, reversed (below)
    # (`seed=None` of a layer draws from Keras's global seed: a choice of the caller, not a model setting.)
    settings = {f.name for f in dataclasses.fields(RunConfig)} - {"seed"} | {
        "max_components", "likelihood", "encoder_objective"}
    for owner, arguments in expected.items():
        defaults = signature_defaults(owner)
        for argument, field in arguments.items():
            assert defaults[argument] == config[field], (owner.__name__, argument)
        # Every default named as a setting is the configuration's, or one the class keeps knowingly.
        unread = (set(defaults) & settings) - set(arguments) - own.get(owner, set()) - mirrored.get(owner, set())
        assert not unread, (owner.__name__, unread)
    # The decoder mirrors the encoder's filters (as `factory.build_networks` builds it); so do its subclasses.
    for decoder in (ImageDecoder, tf_rmvae.BernoulliDecoder, tf_rmvae.GaussianDecoder):
        assert signature_defaults(decoder)["conv_filters"] == tuple(reversed(config["conv_filters"]))
    # The model defines no training setting of its own: it forwards them to the trainer, whose defaults are tested.
    assert not set(signature_defaults(tf_rmvae.RecursiveMixtureVAE)) & set(recursion.TRAINING_ARGUMENTS)


def test_the_classes_built_with_their_defaults_train_the_recommended_model():
    resolved = RunConfig.from_preset("default", model_dir="x").resolved()
    encoder = tf_rmvae.RecursiveMixtureEncoder()
    model = tf_rmvae.RecursiveMixtureVAE(encoder, tf_rmvae.BernoulliDecoder((28, 28, 1)))
    names = ("method", "bound", "component_bound", "num_samples", "lambda_kl", "encoder_gradient", "encoder_groups",
             "schedule", "train_previous", "eps_search_every")
    assert {n: getattr(model.rme, n) for n in names} == {n: getattr(resolved, n) for n in names}
    assert (model.lambda_kl, model.num_samples, model.encoder_gradient) == (1.0, 5, "dreg")  # resolved, readable
    assert model.max_log_ratio == resolved.resolved_max_log_ratio == 5.0
    assert isinstance(model.rme.criterion, objectives.RMEImportanceWeightedCriterion) and model.rme.criterion.dreg
    assert (encoder.max_components, encoder.shared_trunk, encoder.latent_dim, encoder.hidden_units) == (
        resolved.num_components, True, resolved.latent_dim, resolved.hidden_units)
    # The trainer resolves "auto" for other methods as the configuration does.
    for method in ("vae", "mixture", "boosting"):
        config = RunConfig.from_preset("default", model_dir="x", method=method).resolved()
        encoder = tf_rmvae.RecursiveMixtureEncoder(4, config.num_components, hidden_units=(4,))
        trainer = tf_rmvae.RecursiveMixtureTrainer(encoder, method=method)
        assert (trainer.bound, trainer.component_bound, trainer.num_samples, trainer.encoder_gradient) == (
            config.bound, config.component_bound, config.num_samples, config.encoder_gradient), method
    assert not tf_rmvae.RecursiveMixtureEncoder(4, 1).shared_trunk  # one component is one network either way


def test_models_saved_before_the_new_defaults_load_with_the_settings_they_were_saved_with():
    paper = tiny_model("rme", bound="elbo", shared_trunk=False)
    config = paper.get_config()
    assert {k: config[k] for k in ("num_samples", "component_bound", "encoder_gradient")} == dict(
        num_samples=1, component_bound="elbo", encoder_gradient="reparam")  # saved resolved
    # A config of a version whose classes had the paper's defaults lacks the settings added since.
    old = {k: v for k, v in config.items() if k not in ("bound", "component_bound", "num_samples", "encoder_gradient",
                                                           "encoder_groups")}
    old["encoder"] = dict(old["encoder"], config={k: v for k, v in old["encoder"]["config"].items()
                                                  if k not in ("shared_trunk", "per_example_proportions")})
    del old["lambda_kl"]
    loaded = tf_rmvae.RecursiveMixtureVAE.from_config(old)
    assert (loaded.bound, loaded.component_bound, loaded.num_samples, loaded.lambda_kl, loaded.encoder_gradient) == (
        "elbo", "elbo", 1, 0.3, "reparam")
    assert not loaded.encoder.shared_trunk and loaded.encoder.max_components == 3
    trainer = {k: v for k, v in paper.rme.get_config().items() if k not in ("component_bound", "num_samples")}
    assert tf_rmvae.RecursiveMixtureTrainer.from_config(trainer).num_samples == 1
    # A config saved now loads as saved, whatever the defaults.
    default = tf_rmvae.RecursiveMixtureVAE.from_config(
        tf_rmvae.RecursiveMixtureVAE(tf_rmvae.RecursiveMixtureEncoder(4, 2, hidden_units=(4,)),
                                     tf_rmvae.BernoulliDecoder((28, 28, 1), hidden_units=(4,))).get_config())
    assert (default.num_samples, default.component_bound, default.encoder.shared_trunk) == (5, "iw", True)
