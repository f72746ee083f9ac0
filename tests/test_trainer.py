"""The training program end to end (`python -m trainers.train` in subprocesses): outputs, resumption after kill -9,
refusal of a mismatched run directory, flag validation. Tiny settings keep the whole file short."""

from __future__ import annotations

import csv
import glob
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tf_rmvae.config import ConfigError, RunConfig
from tf_rmvae.run import directory as run_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--hidden_units=32", "--latent_dim=8", "--num_components=3", "--epochs_per_component=1", "--batch_size=64",
    "--train_examples=512", "--eval_examples=128", "--iwae_samples=8", "--verbose=2", "--validation_examples=128",
]
STEPS_PER_EPOCH = 512 // 64


def _command(model_dir, *extra):
    return [sys.executable, "-m", "trainers.train", f"--model_dir={model_dir}", *TINY, *extra]


def _env():
    return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")


def _run(command, timeout=240):
    return subprocess.run(command, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _history(model_dir):
    with open(os.path.join(model_dir, "history.csv"), newline="") as f:
        return list(csv.DictReader(f))


def _metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.json")) as f:
        return json.load(f)


@pytest.mark.slow
def test_run_writes_config_metrics_figures_checkpoints_and_export_and_a_rerun_does_not_retrain(tmp_path):
    model_dir, export_dir = tmp_path / "run", tmp_path / "exports"
    command = _command(model_dir, "--epochs=2", f"--export_dir={export_dir}", "--export_name=tiny")
    result = _run(command)
    assert result.returncode == 0, result.stderr[-3000:]

    for name in ("config.json", "metrics.json", "history.csv", "reconstructions.png", "samples.png",
                 "mixture_weights.png"):
        assert (model_dir / name).is_file(), name
    saved = RunConfig.load(model_dir / "config.json")
    assert saved.latent_dim == 8 and saved.bound == "iw"  # the bound trained on, not "auto"
    assert sorted(os.listdir(model_dir / "checkpoints")) == [
        "best.json", "best.weights.h5", "epoch_001.weights.h5", "epoch_002.weights.h5"]
    assert os.listdir(model_dir / "logs" / "train")  # TensorBoard event file
    metrics = _metrics(model_dir)
    test = metrics["test"]
    assert metrics["completed"] and metrics["epochs_completed"] == 2
    assert metrics["optimizer_iterations"] == 2 * STEPS_PER_EPOCH
    for key in ("elbo_mean", "elbo_se", "log_likelihood_mean", "log_likelihood_se"):
        assert math.isfinite(test[key]), key
    assert test["examples"] == 128 and test["iwae_samples"] == 8
    assert -784 * math.log(2) - 50 < test["elbo_mean"] <= test["log_likelihood_mean"] + 5 < 0
    assert len(test["mixture_weights"]) == 3 and math.isclose(sum(test["mixture_weights"]), 1.0, rel_tol=1e-5)
    assert test["active_components"] == 2 and test["component_entropy"][2] is None
    assert [row["epoch"] for row in metrics["history"]] == [0, 1] and metrics["wall_time_s"] > 0
    assert (export_dir / "tiny" / "1" / "saved_model.pb").is_file()
    assert metrics["exports"]["model"] == str(export_dir / "tiny" / "1")
    # Validation: the last 128 training digits, every epoch; the best epoch's weights were evaluated and exported. The
    # best is on the bound trained (the importance-weighted one: its negative is the loss), not the ELBO.
    validation = [float(row["val_loss"]) for row in _history(model_dir)]
    elbo = [float(row["val_elbo"]) for row in _history(model_dir)]
    assert len(validation) == 2 and all(0 < v < -e < 784 * math.log(2) + 50 for v, e in zip(validation, elbo))
    assert metrics["validation"]["split"] == "train[59872:]" and metrics["validation"]["examples"] == 128
    best = metrics["validation"]["best"]
    assert (best["monitor"], best["mode"]) == ("val_loss", "min")
    assert best["epoch"] == int(min(range(2), key=validation.__getitem__)) and best["value"] == min(validation)
    assert not metrics["stopped_early"]

    rerun = _run(command)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "already finished" in rerun.stdout
    assert len(_history(model_dir)) == 2
    assert sorted(os.listdir(export_dir / "tiny")) == ["1"]  # nothing trained or exported again


@pytest.mark.slow
def test_killed_run_resumes_from_last_completed_epoch_with_its_stage_and_optimizer_state(tmp_path):
    model_dir = tmp_path / "run"
    # 8 batches x 0.4 s: an epoch takes over 3 s, so the kill lands inside an epoch.
    command = _command(model_dir, "--epochs=4", "--export_dir=", "--debug_batch_sleep=0.4")
    process = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while run_dir.saved_epoch(str(model_dir)) < 1:
            assert process.poll() is None, "the run ended before its first epoch was saved"
            assert time.monotonic() < deadline, "no epoch saved in time"
            time.sleep(0.1)
        time.sleep(1.5)  # well inside the next epoch
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    saved = run_dir.saved_epoch(str(model_dir))
    assert 1 <= saved < 4
    assert not (model_dir / "metrics.json").exists()

    result = _run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _history(model_dir)
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2, 3]  # every epoch exactly once
    assert [float(row["active_components"]) for row in rows] == [1.0, 2.0, 3.0, 3.0]  # the stage-wise schedule
    metrics = _metrics(model_dir)
    assert metrics["resumed_from_epoch"] == saved and metrics["epochs_completed"] == 4
    # Adam's step counter continued from the saved state instead of restarting at 0.
    assert metrics["optimizer_iterations"] == 4 * STEPS_PER_EPOCH
    assert metrics["test"]["active_components"] == 3
    assert math.isfinite(metrics["test"]["log_likelihood_mean"])


STAGES = ("data", "training", "evaluation", "figures", "export")
NOISE = ("cuInit", "cudart", "oneDNN", "cpu_feature_guard", "absl::InitializeLog", "being cached", "shuffle=True",
         "unsupported characters", "Assets written", "Constructing tf.data.Dataset")


def _events(run_dir):
    """`{tag: [step, ...]}` over the TensorBoard event files of one run directory."""
    import tensorflow as tf

    tags = {}
    for path in glob.glob(os.path.join(run_dir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    return tags


@pytest.mark.slow
def test_the_program_is_quiet_prints_one_line_per_stage_and_logs_pictures(tmp_path):
    model_dir = tmp_path / "run"
    env = _env()
    del env["TF_CPP_MIN_LOG_LEVEL"]  # the program's own default, as a user runs it
    command = _command(model_dir, "--epochs=2", "--num_components=2", "--image_every_epochs=1",
                       f"--export_dir={tmp_path / 'exports'}")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]

    output = result.stdout + result.stderr
    assert [noise for noise in NOISE if noise in output] == []
    assert not re.findall(r"^[IWEF]\d{4} .*$", output, re.M)  # no C++ (or absl INFO) log line at all
    stages = [line.split(":", 1)[0] for line in result.stdout.splitlines() if line.split(":", 1)[0] in STAGES]
    assert stages == list(STAGES)
    assert f"export: {tmp_path / 'exports'}" in result.stdout
    assert "best validation importance-weighted bound" in result.stdout

    train = _events(model_dir / "logs" / "train")
    assert train["reconstructions"] == [0, 1] and train["samples"] == [0, 1]
    assert train["mixture/weight_1"] == [0, 1] and train["mixture/entropy_0"] == [0, 1]
    assert "mixture/entropy_1" in _events(model_dir / "logs" / "validation")


@pytest.mark.slow
def test_a_run_that_early_stopping_ended_is_finished_even_if_killed_before_its_metrics(tmp_path):
    model_dir = tmp_path / "run"
    assert _run(_command(model_dir, "--epochs=2", "--export_dir=")).returncode == 0
    # As if epoch 1 (0-based) had not beaten epoch 0 and the process died before writing the metrics.
    best_path = model_dir / "checkpoints" / "best.json"
    best_path.write_text(json.dumps(dict(json.loads(best_path.read_text()), epoch=0)))
    (model_dir / "metrics.json").unlink()

    command = _command(model_dir, "--epochs=4", "--export_dir=", "--early_stopping_patience=1")
    result = _run(command)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = _metrics(model_dir)
    assert metrics["stopped_early"] and metrics["completed"] and metrics["epochs_completed"] == 2
    assert len(_history(model_dir)) == 2  # no epoch trained after the stop
    assert metrics["optimizer_iterations"] == 2 * STEPS_PER_EPOCH
    assert "stopped early (no better validation importance-weighted bound in 1 epochs)" in result.stdout
    assert "weights of epoch 1 (best validation importance-weighted bound)" in result.stdout
    assert "already finished" in _run(command).stdout


@pytest.mark.slow
def test_rerun_with_different_settings_in_the_same_model_dir_fails_clearly(tmp_path):
    model_dir = tmp_path / "run"
    model_dir.mkdir()
    RunConfig(model_dir=str(model_dir), latent_dim=8, hidden_units=(32,), num_components=3,
              epochs_per_component=1, batch_size=64, train_examples=512).save(model_dir / "config.json")
    result = _run(_command(model_dir, "--latent_dim=16", "--epochs=1", "--export_dir="))
    assert result.returncode == 2
    assert "different settings" in result.stderr and "--latent_dim: saved 8, now 16" in result.stderr
    assert not (model_dir / "history.csv").exists()


@pytest.mark.slow
def test_vae_with_several_components_is_refused_by_the_program(tmp_path):
    result = _run([sys.executable, "-m", "trainers.train", f"--model_dir={tmp_path}", "--method=vae",
                   "--num_components=3"])
    assert result.returncode == 2
    assert "--method=vae" in result.stderr and "--num_components=1" in result.stderr


def _config_from_flags(*argv: str) -> RunConfig:
    """The trainer's `RunConfig` for the flags `argv` (parsed, then unparsed again for the other tests)."""
    from absl import flags

    from trainers import train as program

    flags.FLAGS.unparse_flags()
    flags.FLAGS(["train", *argv])
    try:
        return program.config_from_flags()
    finally:
        flags.FLAGS.unparse_flags()


def test_flags_make_the_run_config_and_vae_defaults_to_one_component():
    config = _config_from_flags("--model_dir=/tmp/x", "--method=vae", "--hidden_units=64,32", "--epochs=3")
    assert config.method == "vae" and config.num_components == 1
    assert config.hidden_units == (64, 32) and config.epochs == 3 and config.model_dir == "/tmp/x"


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(method="vae", num_components=2), "--num_components=1"),
        (dict(model_dir=""), "--model_dir is required"),
        (dict(epochs=0), "--epochs"),
        (dict(lambda_kl=-1.0), "--lambda_kl"),
        (dict(hidden_units=()), "--hidden_units"),
        (dict(architecture="conv", conv_filters=(8,)), "--conv_filters"),
        (dict(method="nope"), "--method"),
        (dict(iwae_samples=0), "--iwae_samples"),
        (dict(validation_examples=-2), "--validation_examples"),
        (dict(early_stopping_patience=-1), "--early_stopping_patience"),
        (dict(image_every_epochs=-1), "--image_every_epochs"),
    ],
)
def test_invalid_settings_name_the_flag(changes, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(model_dir="/tmp/x").replace(**changes).validate()


def test_config_round_trips_through_json_and_ignores_resumable_fields_when_comparing(tmp_path):
    config = RunConfig(model_dir="a", hidden_units=(64, 32), method="mixture")
    config.save(tmp_path / "config.json")
    loaded = RunConfig.load(tmp_path / "config.json")
    assert loaded == config
    assert loaded.mismatches(config.replace(epochs=50, iwae_samples=5000, export_dir="", model_dir="b")) == {}
    assert loaded.mismatches(config.replace(learning_rate=0.01)) == {"learning_rate": (0.001, 0.01)}
    assert config.replace(method="rme", epochs_per_component=2).active_components_at(5) == 3
    assert loaded.mismatches(config.replace(early_stopping_patience=3, image_every_epochs=0)) == {}
    assert loaded.mismatches(config.replace(validation_examples=0)) == {"validation_examples": (-1, 0)}


def test_a_config_saved_before_validation_existed_resumes_without_a_hold_out(tmp_path):
    values = RunConfig(model_dir="a").to_dict()
    del values["validation_examples"], values["early_stopping_patience"], values["image_every_epochs"]
    (tmp_path / "config.json").write_text(json.dumps(values))
    loaded = RunConfig.load(tmp_path / "config.json")
    assert loaded.validation_examples == 0 and RunConfig().validation_examples == -1


def test_history_keeps_only_the_rows_of_saved_epochs(tmp_path):
    from tf_rmvae.run.directory import read_history, truncate_history

    path = tmp_path / "history.csv"
    path.write_text("epoch,loss,val_loss\n0,3.5,NA\n1,2.5,NA\n2,1.5,NA\n")
    truncate_history(str(path), 2)  # the run was killed after epoch 2's row but before its state was saved
    assert read_history(str(path)) == [{"epoch": 0, "loss": 3.5}, {"epoch": 1, "loss": 2.5}]
    truncate_history(str(path), 0)
    assert path.read_text() == ""


def test_nonfinite_policy_is_validated_and_reaches_the_model():
    from tf_rmvae.config import ConfigError, RunConfig
    from tf_rmvae.run import callbacks as run_callbacks
    from tf_rmvae.run import factory as model_factory

    with pytest.raises(ConfigError, match="nonfinite_inputs"):
        RunConfig(nonfinite_inputs="ignore").validate()
    config = RunConfig(nonfinite_inputs="skip", hidden_units=(8,), latent_dim=2)
    model = model_factory.build_model(config, (28, 28, 1), True)
    assert model.nonfinite_inputs == "skip"
    assert not any(type(c).__name__ == "NonFiniteInputGuard" for c in run_callbacks.make_callbacks(config))


def test_the_runs_bound_reaches_the_model_resolved():
    from tf_rmvae.config import RunConfig
    from tf_rmvae.run import factory as model_factory

    config = RunConfig(hidden_units=(8,), latent_dim=2)  # --bound=auto
    resolved = {name: model_factory.build_model(run, (28, 28, 1), True).bound for name, run in [
        ("default", config), ("paper", config.replace(bound="elbo")), ("mixture", config.replace(method="mixture"))]}
    assert resolved == {"default": "iw", "paper": "elbo", "mixture": "elbo"}


def test_the_runs_cap_reaches_the_model_and_every_negative_cap_is_uncapped():
    from tf_rmvae.config import RunConfig
    from tf_rmvae.run import factory as model_factory

    config = RunConfig(hidden_units=(8,), latent_dim=2)
    caps = [model_factory.build_model(config.replace(max_log_ratio=cap), (28, 28, 1), True).rme.max_log_ratio
            for cap in (5.0, 2.5, -1.0, -3.0)]
    assert caps == [5.0, 2.5, None, None]


def test_the_shared_trunk_default_and_flag_reach_the_encoder():
    from tf_rmvae.run import factory as model_factory

    config = _config_from_flags("--model_dir=/tmp/x", "--noshared_trunk", "--num_components=3", "--hidden_units=16")
    assert not config.shared_trunk
    defaults = RunConfig()
    assert defaults.shared_trunk and defaults.num_components == 3 and defaults.epochs_per_component == 0
    counts = {}
    for shared in (True, False):
        model = model_factory.build_model(config.replace(shared_trunk=shared), (28, 28, 1), True)
        model.encoder.ensure_built((None, 28, 28, 1))
        assert model.encoder.shared_trunk == shared
        counts[shared] = sum(int(np.prod(v.shape)) for v in model.encoder.networks.trainable_variables)
    # One 784-16 trunk instead of three, the same three heads.
    assert counts[False] - counts[True] == 2 * (784 * 16 + 16)
    # One component: the trunk and its head are one network, built as M = 1 independent networks (a VAE's weights
    # do not depend on the setting).
    vae_config = config.replace(method="vae", num_components=1, shared_trunk=True)
    vae = model_factory.build_model(vae_config, (28, 28, 1), True)
    assert not vae.encoder.shared_trunk


def test_a_config_saved_before_the_shared_trunk_default_keeps_independent_networks(tmp_path):
    values = RunConfig(model_dir="a", num_components=4).to_dict()
    del values["shared_trunk"]
    (tmp_path / "config.json").write_text(json.dumps(values))
    loaded = RunConfig.load(tmp_path / "config.json")
    assert not loaded.shared_trunk and loaded.num_components == 4
    assert loaded.mismatches(RunConfig(model_dir="a", num_components=4)) == {"shared_trunk": (False, True)}
