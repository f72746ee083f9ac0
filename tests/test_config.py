"""`RunConfig` is the one definition of every setting: it imports no TensorFlow, and the program's flags are
made from its fields (same names, defaults and help), so a flag cannot drift from its field."""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from tf_rmvae import choices, files
from tf_rmvae.config import METHOD_DEFAULTS, ConfigError, RunConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_importing_the_config_and_the_flags_made_from_it_loads_no_tensorflow():
    code = ("import sys, tf_rmvae.config, tf_rmvae.choices, tf_rmvae.files, trainers.config_flags, trainers.cli, "
            "trainers.flags_doc, benchmarks.cells; "
            "print(sorted(m for m in ('tensorflow', 'keras', 'tensorflow_probability') if m in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def _program_flags() -> dict[str, flags.Flag]:
    """The trainer's flags: those that `trainers.config_flags` defines for it (the program defines none itself)."""
    from trainers import config_flags
    from trainers import train as program

    assert not flags.FLAGS.get_flags_for_module(program)
    return {flag.name: flag for flag in flags.FLAGS.get_flags_for_module(config_flags)}


def test_every_field_has_a_flag_with_its_default_and_help_and_every_flag_is_a_field():
    program_flags = _program_flags()
    fields = {field.name: field for field in dataclasses.fields(RunConfig)}
    assert set(program_flags) == set(fields)
    for name, field in fields.items():
        flag = program_flags[name]
        if field.metadata["required"]:
            assert flag.default is None, name
        elif isinstance(field.default, tuple):
            assert tuple(int(v) for v in flag.default) == field.default, name
        else:
            assert flag.default == field.default and type(flag.default) is type(field.default), name
        assert flag.help.endswith(field.metadata["help"]), name
        if field.metadata["choices"]:
            assert tuple(flag.parser.enum_values) == field.metadata["choices"], name
            assert field.default in field.metadata["choices"], name


def test_choice_fields_take_their_values_from_the_choices_module():
    fields = {field.name: field.metadata["choices"] for field in dataclasses.fields(RunConfig)}
    assert fields["method"] == choices.RUN_METHODS and fields["strategy"] == choices.STRATEGIES
    assert fields["mixed_precision"] == choices.PRECISIONS and fields["architecture"] == choices.ARCHITECTURES
    with pytest.raises(ConfigError, match="--bound must be one of auto, elbo, iw"):
        RunConfig(model_dir="a", bound="kl").validate()
    with pytest.raises(ConfigError, match="--component_bound=iw applies to --method=rme only"):
        RunConfig(model_dir="a", method="mixture", component_bound="iw").validate()


def test_the_auto_bound_is_each_methods_default_and_old_run_directories_keep_the_elbo():
    # RME trains on the importance-weighted bound (README "Results"); the paper's RME is --bound=elbo; the other
    # methods train on the ELBO unless told.
    assert choices.resolve_bound("rme", "auto") == "iw"
    for method in ("vae", "mixture", "boosting"):
        assert choices.resolve_bound(method, "auto") == "elbo"
    assert choices.resolve_bound("rme", "elbo") == "elbo" and choices.resolve_bound("vae", "iw") == "iw"
    assert RunConfig(model_dir="a").bound == "auto" and RunConfig(model_dir="a").component_bound == "auto"
    # A run directory saved before the bound was a setting trained on the ELBO, and resumes so.
    saved = {k: v for k, v in RunConfig(model_dir="a").to_dict().items() if k != "bound"}
    assert RunConfig.from_dict(saved).bound == "elbo"
    # A run resumes under "auto" where that names the bound it trained on, and is refused where it does not.
    assert RunConfig(model_dir="a", bound="iw").mismatches(RunConfig(model_dir="a")) == {}
    mixture = RunConfig(model_dir="a", method="mixture", num_components=2)
    assert mixture.replace(bound="elbo").mismatches(mixture) == {}
    # (the bound also decides what "auto" means for the component criteria and samples; a saved run names them)
    assert RunConfig(model_dir="a", bound="elbo").resolved().mismatches(RunConfig(model_dir="a")) == {
        "bound": ("elbo", "auto"), "component_bound": ("elbo", "auto"), "num_samples": (1, 0),
        "encoder_gradient": ("reparam", "auto")}


def test_the_cap_and_trunk_rules_are_stated_once_in_the_choices_module():
    # Any negative cap is "uncapped"; a trunk is shared only between several components.
    assert choices.resolve_max_log_ratio(-1.0) is None and choices.resolve_max_log_ratio(-0.5) is None
    assert choices.resolve_max_log_ratio(0.0) == 0.0 and choices.resolve_max_log_ratio(5.0) == 5.0
    assert choices.uses_shared_trunk(True, 2) and not choices.uses_shared_trunk(True, 1)
    assert not choices.uses_shared_trunk(False, 8)
    assert RunConfig(model_dir="a", max_log_ratio=-3.0).resolved_max_log_ratio is None
    assert RunConfig(model_dir="a", method="vae", num_components=1).effective("shared_trunk") is False


def test_run_directories_saved_before_the_shared_trunk_default_resume_where_the_settings_mean_the_same():
    def saved_before(**settings):  # a config.json of the version whose defaults were 4 networks, 2 epochs each,
        values = RunConfig(  # and lambda = 0.3
            model_dir="a", num_components=4, epochs_per_component=2, lambda_kl=0.3, **settings).to_dict()
        del values["shared_trunk"]
        return RunConfig.from_dict(values)

    # A VAE: one component is one network with or without a shared trunk, and no component joins.
    vae = saved_before(method="vae").replace(num_components=1)
    assert vae.mismatches(RunConfig(model_dir="a", method="vae", num_components=1)) == {}
    # MixVAE: all components train from the start, so the schedule means nothing; the trunk does. No criterion
    # but RME's reads lambda, so its default does not matter to MixVAE or boosting.
    mixture = saved_before(method="mixture")
    assert mixture.mismatches(RunConfig(model_dir="a", method="mixture", num_components=4, shared_trunk=False)) == {}
    assert mixture.mismatches(RunConfig(model_dir="a", method="mixture", num_components=4)) == {
        "shared_trunk": (False, True)}
    boosting = saved_before(method="boosting")
    assert boosting.mismatches(RunConfig(
        model_dir="a", method="boosting", num_components=4, epochs_per_component=2, shared_trunk=False)) == {}
    assert boosting.mismatches(RunConfig(
        model_dir="a", method="boosting", num_components=4, epochs_per_component=2, shared_trunk=False,
        max_log_ratio=-1.0)) == {"max_log_ratio": (5.0, -1.0)}
    uncapped = boosting.replace(max_log_ratio=-1.0)  # every negative cap means uncapped
    assert uncapped.mismatches(uncapped.replace(max_log_ratio=-2.0)) == {}
    # RME: the old defaults, spelled out, resume it; the new ones are refused with the differences listed.
    rme = saved_before(method="rme")
    old_defaults = RunConfig(
        model_dir="a", num_components=4, epochs_per_component=2, shared_trunk=False, lambda_kl=0.3)
    assert rme.mismatches(old_defaults) == {}
    assert rme.mismatches(RunConfig(model_dir="a")) == {
        "num_components": (4, 3), "shared_trunk": (False, True), "epochs_per_component": (2, 0),
        "lambda_kl": (0.3, 1.0)}


def test_the_default_rme_is_three_heads_with_five_samples_each_on_importance_weighted_criteria():
    default = RunConfig(model_dir="a")
    assert (default.method, default.num_components, default.shared_trunk, default.lambda_kl) == ("rme", 3, True, 1.0)
    assert (default.resolved_bound, default.resolved_component_bound, default.resolved_num_samples) == ("iw", "iw", 5)
    # "auto" cascades: --bound=elbo alone is the paper's RME (ELBO criteria, one sample per component); ELBO
    # criteria take one sample; explicit values stand; the other methods keep one sample on the ELBO.
    paper = RunConfig(model_dir="a", bound="elbo")
    assert (paper.resolved_component_bound, paper.resolved_num_samples) == ("elbo", 1)
    assert RunConfig(model_dir="a", component_bound="elbo").resolved_num_samples == 1
    assert RunConfig(model_dir="a", num_samples=2).resolved_num_samples == 2
    for method in ("vae", "mixture", "boosting"):
        other = RunConfig(model_dir="a", method=method, num_components=1 if method == "vae" else 3)
        assert (other.resolved_component_bound, other.resolved_num_samples) == ("elbo", 1)
    assert RunConfig(model_dir="a", method="vae", num_components=1, bound="iw").resolved_num_samples == 1
    # The automatic schedule spreads the components evenly: 100 epochs, joins at 34 and 68 (the measured cells).
    long = RunConfig(model_dir="a", epochs=100)
    assert long.resolved_epochs_per_component == 34
    assert [long.active_components_at(e) for e in (0, 33, 34, 67, 68, 99)] == [1, 1, 2, 2, 3, 3]
    assert RunConfig(model_dir="a", epochs=10).resolved_epochs_per_component == 4
    assert RunConfig(model_dir="a", epochs=2, num_components=8).resolved_epochs_per_component == 1
    assert RunConfig(model_dir="a", epochs_per_component=3).resolved_epochs_per_component == 3
    for name, value in (("num_samples", -1), ("epochs_per_component", -1)):
        with pytest.raises(ConfigError, match=f"--{name} must be >= 1, or 0 for auto"):
            RunConfig(model_dir="a", **{name: value}).validate()


def test_a_run_saves_what_auto_meant_and_an_extended_run_keeps_its_schedule():
    saved = RunConfig(model_dir="a").resolved()
    assert (saved.bound, saved.component_bound, saved.num_samples, saved.epochs_per_component) == ("iw", "iw", 5, 4)
    assert saved.mismatches(RunConfig(model_dir="a")) == {}  # the same command resumes it
    extended = RunConfig(model_dir="a", epochs=40).resolved(saved=saved)
    assert extended.epochs_per_component == 4 and saved.mismatches(extended) == {}
    assert RunConfig(model_dir="a", epochs=40).resolved().epochs_per_component == 14  # a new run spreads its own
    # a config.json saved unresolved (RunConfig.save of a hand-made config) holds 0: its own epochs decide
    assert RunConfig(model_dir="a", epochs=40).resolved(saved=RunConfig(model_dir="a")).epochs_per_component == 4
    # A config.json written before component_bound and num_samples were settings trained one sample on the ELBO.
    values = {k: v for k, v in saved.to_dict().items() if k not in ("component_bound", "num_samples")}
    legacy = RunConfig.from_dict(values)
    assert (legacy.component_bound, legacy.num_samples) == ("elbo", 1)
    assert legacy.mismatches(RunConfig(model_dir="a")) == {"component_bound": ("elbo", "auto"), "num_samples": (1, 0)}


def test_the_methods_own_defaults_name_methods_and_fields_and_change_a_default():
    names = {f.name: f.default for f in dataclasses.fields(RunConfig)}
    for method, defaults in METHOD_DEFAULTS.items():
        assert method in choices.RUN_METHODS
        for name, value in defaults.items():
            assert name in names and names[name] != value, (method, name)


def test_frozen_earlier_components_need_independent_networks():
    with pytest.raises(ConfigError, match="--noshared_trunk"):
        RunConfig(model_dir="a", train_previous=False).validate()
    RunConfig(model_dir="a", train_previous=False, shared_trunk=False).validate()
    RunConfig(model_dir="a", train_previous=False, method="mixture").validate()  # nothing joins: nothing to freeze
    RunConfig(model_dir="a", train_previous=False, method="vae", num_components=1).validate()


def test_flags_build_the_config_they_name():
    from trainers import train as program

    try:
        flags.FLAGS(["train", "--model_dir=runs/a", "--hidden_units=8,4", "--method=vae", "--nojit_compile",
                     "--learning_rate=0.01", "--decoder=gaussian"])
        config = program.config_from_flags()
    finally:
        flags.FLAGS.unparse_flags()
    assert config == RunConfig(model_dir="runs/a", hidden_units=(8, 4), method="vae", num_components=1,
                               learning_rate=0.01, decoder="gaussian")
    # The method's own defaults apply only where the flag was not given: MixVAE gets M independent networks.
    for argv, shared in ((["--method=mixture"], False), (["--method=mixture", "--shared_trunk"], True),
                         (["--method=rme"], True), (["--method=boosting"], True)):
        try:
            flags.FLAGS(["train", "--model_dir=runs/a", *argv])
            assert program.config_from_flags().shared_trunk is shared, argv
        finally:
            flags.FLAGS.unparse_flags()
    try:
        flags.FLAGS(["train", "--model_dir=runs/a", "--conv_filters=8,x"])
        with pytest.raises(ConfigError, match="--conv_filters must be a comma-separated list of integers"):
            program.config_from_flags()
    finally:
        flags.FLAGS.unparse_flags()


def test_json_ready_writes_non_finite_numbers_as_null_and_finite_ones_unchanged(tmp_path):
    value = {"a": np.float32(0.5), "b": [math.nan, -math.inf, np.int64(3)],
             1: (np.array([1.5, np.nan]), True), "c": None, "d": np.bool_(True)}
    assert files.json_ready(value) == {"a": 0.5, "b": [None, None, 3], "1": [[1.5, None], True], "c": None,
                                       "d": True}
    path = tmp_path / "x.json"
    files.write_json_atomic(path, {"b": 2, "a": math.nan}, sort_keys=True)
    assert path.read_text() == '{\n  "a": null,\n  "b": 2\n}\n'
    assert not (tmp_path / "x.json.tmp").exists()


def test_rme_on_importance_weighted_criteria_defaults_to_dreg_and_older_runs_keep_the_plain_gradient():
    assert RunConfig(model_dir="x").resolved().encoder_gradient == "dreg"
    for preset in ("paper", "posterior", "iwae"):
        assert RunConfig.from_preset(preset, model_dir="x").resolved().encoder_gradient == "reparam"
    assert RunConfig(model_dir="x", method="vae", num_components=1, bound="iw").resolved_encoder_gradient == "reparam"
    old = {k: v for k, v in RunConfig(model_dir="x").resolved().to_dict().items() if k != "encoder_gradient"}
    assert RunConfig.from_dict(old).encoder_gradient == "reparam"  # saved before the setting: what it trained
    assert RunConfig.from_dict(old).mismatches(RunConfig(model_dir="x")) == {"encoder_gradient": ("reparam", "auto")}


def test_benchmark_settings_keep_the_trainers_behaviour_by_default_and_old_runs_resume():
    config = RunConfig(model_dir="a", seed=3)
    assert config.resolved_noise_seed == 3 and config.replace(noise_seed=0).resolved_noise_seed == 0
    assert config.data_order == "epoch_keyed" and config.encoder_parameters_of == 0
    saved = {k: v for k, v in config.to_dict().items()
             if k not in ("noise_seed", "data_order", "encoder_parameters_of") and not k.startswith("refine_")}
    assert RunConfig.from_dict(saved).mismatches(config) == {}  # a run saved before these settings resumes
    assert set(config.mismatches(config.replace(noise_seed=0))) == {"noise_seed"}
    assert config.mismatches(config.replace(noise_seed=3)) == {}  # the same noise, spelled out
    assert config.mismatches(config.replace(refine_steps=2)) == {}  # SA-VAE's settings: only SA-VAE reads them
    savae = RunConfig.from_preset(model_dir="a", method="savae").validate()
    assert savae.num_components == 1 and set(savae.mismatches(savae.replace(refine_steps=2))) == {"refine_steps"}
    with pytest.raises(ConfigError, match="--method=savae trains on the ELBO"):
        savae.replace(bound="iw").validate()
    with pytest.raises(ConfigError, match="--encoder_parameters_of"):
        RunConfig(model_dir="a", num_components=3, encoder_parameters_of=2).validate()
    # The identity hashes what trains the model: not the directory or the evaluation, nor "auto" against its meaning.
    assert config.identity() == config.replace(model_dir="b", iwae_samples=7).identity() == config.resolved().identity()
    assert config.identity() != config.replace(noise_seed=0).identity() and len(config.identity()) == 16
    with pytest.raises(ConfigError, match="--data_order must be one of"):
        RunConfig(model_dir="a", data_order="random").validate()
