"""The trainer under `tf.distribute` (issue 6), CPU only, in subprocesses: two `MultiWorkerMirroredStrategy` workers on
127.0.0.1 (uninterrupted, then with a worker killed and the job restarted), a killed and resumed single-device run that
ends with the weights of an uninterrupted one, `MirroredStrategy` over 2 logical CPUs, mixed precision, flag errors.

Every run uses the same tiny settings, so all of them are compared with one uninterrupted single-device run."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from tf_rmvae.config import RunConfig
from tf_rmvae.run.directory import saved_epoch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 3
TINY = [
    "--hidden_units=16", "--latent_dim=4", "--num_components=2", "--epochs_per_component=1", "--batch_size=50",
    "--train_examples=400", "--eval_examples=50", "--iwae_samples=4", "--verbose=2", "--export_dir=",
    f"--epochs={EPOCHS}", "--eps_search_every=3", "--validation_examples=100", "--image_every_epochs=0",
]
STEPS_PER_EPOCH = 400 // 50
SCHEDULE = [float(RunConfig(num_components=2, epochs_per_component=1).active_components_at(e)) for e in range(EPOCHS)]
LOSSES = ("loss", "elbo", "kl", "criterion", "weight_1")
TIMEOUT = 300  # a guard against hangs: a run takes under a minute alone, minutes on a loaded 2-core machine


def _command(model_dir, *extra):
    return [sys.executable, "-m", "trainers.train", f"--model_dir={model_dir}", *TINY, *extra]


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="", **extra)
    env.pop("TF_CONFIG", None)
    env.pop("RMVAE_CPU_DEVICES", None)
    env.update(extra)
    return env


def _run(command, **env):
    result = subprocess.run(command, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _history(model_dir):
    with open(os.path.join(model_dir, "history.csv"), newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", "NA")} for row in csv.DictReader(f)]


def _metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.json")) as f:
        return json.load(f)


def _saved_epoch(model_dir):
    return saved_epoch(str(model_dir))


def _weights(model_dir, path=("backup", "latest.weights.h5")):
    """Every array of the run's final state (`backup/latest.weights.h5`: model and optimizer variables)."""
    arrays = {}
    with h5py.File(os.path.join(model_dir, *path), "r") as f:
        f.visititems(lambda name, item: arrays.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset) else None)
    return arrays


def _assert_same_history(history, reference, rtol=1e-4):
    assert [row["epoch"] for row in history] == [row["epoch"] for row in reference]
    for key in LOSSES:
        np.testing.assert_allclose([row[key] for row in history], [row[key] for row in reference], rtol=rtol,
                                   atol=1e-4, err_msg=key)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


class Cluster:
    """Two `multi_worker_mirrored` trainer processes on 127.0.0.1 (worker 0 is the chief), on fresh ports."""

    def __init__(self, model_dir, log_dir, *extra):
        cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
        self.paths = [os.path.join(log_dir, f"worker{i}_{time.monotonic_ns()}.log") for i in range(2)]
        self.logs = [open(path, "w") for path in self.paths]
        self.processes = [
            subprocess.Popen(
                _command(model_dir, "--strategy=multi_worker_mirrored", *extra), cwd=REPO,
                env=_env(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})),
                stdout=log, stderr=subprocess.STDOUT,
            )
            for i, log in enumerate(self.logs)
        ]

    def wait(self, timeout=TIMEOUT):
        deadline = time.monotonic() + timeout
        for process in self.processes:
            process.wait(timeout=max(deadline - time.monotonic(), 1))
        return [process.returncode for process in self.processes]

    def output(self, index):
        with open(self.paths[index]) as f:
            return f.read()

    def stop(self):
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait()
        for log in self.logs:
            log.close()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted single-device run of the tiny settings."""
    model_dir = tmp_path_factory.mktemp("reference") / "run"
    _run(_command(model_dir))
    return model_dir


@pytest.mark.slow
def test_two_workers_train_the_schedule_and_match_one_device(tmp_path, reference):
    model_dir = tmp_path / "run"
    cluster = Cluster(model_dir, tmp_path)
    try:
        codes = cluster.wait()
        assert codes == [0, 0], cluster.output(0)[-3000:] + cluster.output(1)[-3000:]
    finally:
        cluster.stop()
    assert "the chief writes the metrics" in cluster.output(1)
    metrics = _metrics(model_dir)
    assert metrics["completed"] and metrics["epochs_completed"] == EPOCHS and metrics["resumed_from_epoch"] == 0
    assert metrics["strategy"] == "multi_worker_mirrored" and metrics["replicas"] == 2
    assert metrics["optimizer_iterations"] == EPOCHS * STEPS_PER_EPOCH
    for key in ("elbo_mean", "elbo_se", "log_likelihood_mean", "log_likelihood_se"):
        assert math.isfinite(metrics["test"][key]), key
    assert metrics["test"]["active_components"] == SCHEDULE[-1]
    history = _history(model_dir)
    assert [row["active_components"] for row in history] == SCHEDULE
    # The global batch of 50 split over 2 workers, averaged over them: the single-device run's numbers.
    _assert_same_history(history, _history(reference))
    assert math.isclose(metrics["test"]["elbo_mean"], _metrics(reference)["test"]["elbo_mean"], rel_tol=1e-4)
    assert not (model_dir / "backup" / "tmp.weights.h5").exists()  # only the chief writes the backup


@pytest.mark.slow
def test_a_killed_worker_and_the_restarted_job_resume_from_the_backup(tmp_path, reference):
    model_dir = tmp_path / "run"
    # 8 batches x 0.4 s: an epoch takes over 3 s, so the kill lands inside an epoch.
    cluster = Cluster(model_dir, tmp_path, "--debug_batch_sleep=0.4")
    try:
        deadline = time.monotonic() + TIMEOUT
        while _saved_epoch(model_dir) < 1:
            assert all(p.poll() is None for p in cluster.processes), cluster.output(0)[-3000:]
            assert time.monotonic() < deadline, "no epoch saved in time"
            time.sleep(0.1)
        time.sleep(1.5)  # well inside the next epoch
        cluster.processes[1].send_signal(signal.SIGKILL)
        cluster.processes[1].wait()
        # The chief cannot go on without its peer (its collectives fail or block): the whole job is restarted, as a
        # cluster manager restarts every task of a failed MultiWorkerMirroredStrategy job.
        try:
            cluster.processes[0].wait(timeout=5)
        except subprocess.TimeoutExpired:
            cluster.processes[0].kill()
    finally:
        cluster.stop()
    assert cluster.processes[1].returncode == -signal.SIGKILL
    saved = _saved_epoch(model_dir)
    assert 1 <= saved < EPOCHS
    assert not (model_dir / "metrics.json").exists()

    restarted = Cluster(model_dir, tmp_path, "--debug_batch_sleep=0.4")
    try:
        codes = restarted.wait()
        assert codes == [0, 0], restarted.output(0)[-3000:] + restarted.output(1)[-3000:]
    finally:
        restarted.stop()
    assert f"Epoch {saved}/" not in restarted.output(0) and f"Epoch {saved + 1}/{EPOCHS}" in restarted.output(0)
    metrics = _metrics(model_dir)
    assert metrics["resumed_from_epoch"] == saved and metrics["epochs_completed"] == EPOCHS
    assert metrics["optimizer_iterations"] == EPOCHS * STEPS_PER_EPOCH
    history = _history(model_dir)
    assert [row["active_components"] for row in history] == SCHEDULE  # every epoch once, at its stage
    # Resumed at the saved epoch with that epoch's data: the uninterrupted run's numbers.
    _assert_same_history(history, _history(reference))


@pytest.mark.slow
def test_a_killed_and_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, reference):
    model_dir = tmp_path / "run"
    command = _command(model_dir, "--debug_batch_sleep=0.4")
    process = subprocess.Popen(command, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TIMEOUT
        while _saved_epoch(model_dir) < 1:
            assert process.poll() is None, "the run ended before its first epoch was saved"
            assert time.monotonic() < deadline, "no epoch saved in time"
            time.sleep(0.1)
        time.sleep(1.5)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    saved = _saved_epoch(model_dir)
    assert 1 <= saved < EPOCHS

    _run(command)
    assert _metrics(model_dir)["resumed_from_epoch"] == saved
    resumed, uninterrupted = _weights(model_dir), _weights(reference)
    assert resumed.keys() == uninterrupted.keys() and len(resumed) > 10
    for name, value in uninterrupted.items():
        np.testing.assert_allclose(resumed[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    _assert_same_history(_history(model_dir), _history(reference), rtol=1e-6)
    # Validation too: the same values every epoch, hence the same best epoch, value and weights.
    np.testing.assert_allclose([row["val_elbo"] for row in _history(model_dir)],
                               [row["val_elbo"] for row in _history(reference)], rtol=1e-6)
    best, reference_best = (json.loads(open(os.path.join(d, "checkpoints", "best.json")).read())
                            for d in (model_dir, reference))
    assert best["epoch"] == reference_best["epoch"] and math.isclose(best["value"], reference_best["value"],
                                                                     rel_tol=1e-6)
    assert _metrics(model_dir)["validation"]["best"]["epoch"] == best["epoch"]
    best_weights = _weights(model_dir, ("checkpoints", "best.weights.h5"))
    for name, value in _weights(reference, ("checkpoints", "best.weights.h5")).items():
        np.testing.assert_allclose(best_weights[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_mirrored_over_two_logical_cpus_matches_one_device(tmp_path, reference):
    model_dir = tmp_path / "run"
    _run(_command(model_dir, "--strategy=mirrored", "--epochs=1"), RMVAE_CPU_DEVICES="2")
    metrics = _metrics(model_dir)
    assert metrics["replicas"] == 2 and metrics["strategy"] == "mirrored"
    _assert_same_history(_history(model_dir), _history(reference)[:1])


@pytest.mark.slow
def test_mixed_precision_run_is_finite(tmp_path):
    model_dir = tmp_path / "run"
    _run(_command(model_dir, "--mixed_precision=mixed_bfloat16", "--epochs=1"))
    metrics = _metrics(model_dir)
    assert metrics["mixed_precision"] == "mixed_bfloat16"
    assert all(math.isfinite(metrics["test"][k]) for k in ("elbo_mean", "log_likelihood_mean"))
    assert math.isfinite(_history(model_dir)[0]["loss"])


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--strategy=tpu"], "no TPU found"),
        (["--strategy=mirrored", "--batch_size=51"], "multiple of the 2 replicas"),
        (["--batch_size=500"], "an epoch would have no step"),
    ],
)
def test_impossible_hardware_settings_fail_clearly(tmp_path, extra, message):
    result = subprocess.run(_command(tmp_path / "run", "--epochs=1", *extra), cwd=REPO, capture_output=True,
                            text=True, env=_env(RMVAE_CPU_DEVICES="2"), timeout=TIMEOUT)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-3000:]


def test_the_strategy_may_change_on_resume_but_the_precision_may_not():
    config = RunConfig(model_dir="a")
    assert config.mismatches(config.replace(strategy="multi_worker_mirrored")) == {}
    assert config.mismatches(config.replace(mixed_precision="mixed_float16")) == {
        "mixed_precision": ("float32", "mixed_float16")}
