"""Fault injection (issue 12): bad inputs are refused clearly, a broken model is never exported, a run is never lost
or corrupted, and every user error of the trainer exits with status 2 and one line before anything is written.

Runs are tiny (4 steps an epoch, 20 test digits) and in-process where possible; one finished run is shared (copied
by the tests that damage it). The sections follow the items of the issue."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from absl import flags

import tf_rmvae
from tests.helpers import mnist_digits, tiny_model
from tf_rmvae import export
from tf_rmvae.config import RunConfig
from tf_rmvae.models.semi_amortized import SemiAmortizedVAE
from tf_rmvae.run import directory as run_dir
from tf_rmvae.run import factory as model_factory
from tf_rmvae.run import final_evaluation as run_evaluation
from tf_rmvae.run import training
from tf_rmvae.run.guards import ExportRefused, chance_log_likelihood

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Independent component networks (the default before the shared trunk, what older run directories hold): the
# trainer's other end-to-end tests run the default shared trunk.
TINY = dict(hidden_units=(16,), latent_dim=4, num_components=2, epochs_per_component=1, batch_size=50,
            train_examples=200, eval_examples=20, iwae_samples=4, verbose=0, epochs=1, shared_trunk=False)
TINY_FLAGS = ["--hidden_units=16", "--latent_dim=4", "--num_components=2", "--epochs_per_component=1",
              "--batch_size=50", "--train_examples=200", "--eval_examples=20", "--iwae_samples=4", "--verbose=0",
              "--epochs=1", "--noshared_trunk"]
STEPS = 200 // 50


def tiny_config(model_dir, **changes) -> RunConfig:
    return RunConfig(model_dir=str(model_dir), **dict(TINY, **changes))


def run_main(argv, capsys) -> tuple[int, str]:
    """`trainers.train.main` in this process with `argv` flags: (exit status, stderr)."""
    from absl import flags

    from trainers import train as program

    flags.FLAGS.unparse_flags()
    flags.FLAGS(["train", *argv])
    capsys.readouterr()
    try:
        program.main(["train"])
        status = 0
    except SystemExit as exit_:
        status = exit_.code
    finally:
        flags.FLAGS.unparse_flags()
    captured = capsys.readouterr()
    sys.stdout.write(captured.out)  # left for the test to read
    return status, captured.err


def assert_one_error_line(stderr: str, *fragments: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


class umask:
    """Context manager: the process umask set to `mask`."""

    def __init__(self, mask: int):
        self.mask = mask

    def __enter__(self):
        self.previous = os.umask(self.mask)

    def __exit__(self, *exc_info):
        os.umask(self.previous)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished one-epoch run with the default export (written under umask 022)."""
    model_dir = tmp_path_factory.mktemp("finished") / "run"
    with umask(0o022):
        metrics = training.train(tiny_config(model_dir))
    return model_dir, metrics


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A private copy of the finished run, to damage."""
    copy = tmp_path / "run"
    shutil.copytree(finished_run[0], copy)
    return copy


def compiled(model, jit_compile=False):
    model.compile(optimizer=keras.optimizers.Adam(1e-3), jit_compile=jit_compile)
    return model


# ---------------------------------------------------------------------------------------------- 1. inputs
def test_tfds_style_uint8_images_are_scaled_exactly_like_the_pipeline_does():
    pixels = (mnist_digits(100) * 255).astype(np.uint8)
    batch = {"image": pixels, "label": np.arange(100) % 10}  # what tfds.load("mnist") yields, batched
    model = compiled(tiny_model("vae", hidden=16))
    np.testing.assert_array_equal(model._unpack(batch).numpy(), tf.cast(pixels, tf.float32).numpy() / np.float32(255))
    loss = model.fit(tf.data.Dataset.from_tensor_slices(batch).batch(50), epochs=1, verbose=0).history["loss"][0]
    assert 0 < loss < 1.5 * 784 * math.log(2)  # -ELBO of binary digits near chance, not the -1e5 of raw 0..255


@pytest.mark.parametrize("call", ["fit", "evaluate", "elbo", "log_likelihood", "savae_elbo"])
def test_float_pixels_outside_the_unit_range_are_refused(call):
    raw = mnist_digits(20) * 255.0  # the usual mistake: intensities not divided by 255
    model = SemiAmortizedVAE(tf_rmvae.GaussianEncoder(4, hidden_units=(16,)),
                             tf_rmvae.BernoulliDecoder((28, 28, 1), hidden_units=(16,)), refine_steps=1) \
        if call == "savae_elbo" else compiled(tiny_model("rme", hidden=16))
    actions = {
        "fit": lambda: model.fit(raw, batch_size=10, epochs=1, verbose=0),
        "evaluate": lambda: model.evaluate(raw, batch_size=10, verbose=0),
        "elbo": lambda: model.elbo(raw),
        "log_likelihood": lambda: model.log_likelihood(raw, iwae_samples=4),
        "savae_elbo": lambda: model.elbo(raw),
    }
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"images must lie in \[0, 1\]"):
        actions[call]()


@pytest.mark.parametrize("source", ["dataset", "numpy"])
def test_under_xla_fit_still_refuses_out_of_range_pixels(source):
    """XLA compiles `tf.debugging.Assert` into a no-op: the data are checked outside the compiled step."""
    raw = mnist_digits(20) * 255.0
    model = compiled(tiny_model("vae", hidden=16), jit_compile=True)  # XLA drops in-graph assertions
    data = tf.data.Dataset.from_tensor_slices(raw).batch(10) if source == "dataset" else raw
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError), match=r"images must lie in \[0, 1\]"):
        model.fit(data, batch_size=None if source == "dataset" else 10, epochs=1, verbose=0)


@pytest.mark.parametrize(
    "element, message",
    [
        (lambda x, y: tf.reshape(x, [-1, 784]), r"flat vectors .*reshape"),
        (lambda x, y: y, r"labels only"),
        (lambda x, y: {"pixels": x, "label": y}, r"needs an 'image' entry"),
    ],
    ids=["flat", "labels_only", "dict_without_image"],
)
def test_malformed_batches_are_refused_with_a_message_saying_what_to_do(element, message):
    data = tf.data.Dataset.from_tensor_slices((mnist_digits(20), np.arange(20))).batch(10).map(element)
    with pytest.raises(ValueError, match=message):
        compiled(tiny_model("rme", hidden=16)).fit(data, epochs=1, verbose=0)


# ---------------------------------------------------------------------------------------------- 2. broken models
@pytest.mark.slow
def test_a_diverged_run_stops_with_an_error_exits_1_and_exports_nothing(tmp_path, capsys):
    model_dir = tmp_path / "run"
    status, stderr = run_main([f"--model_dir={model_dir}", *TINY_FLAGS, "--learning_rate=1e6"], capsys)
    assert status == 1
    assert_one_error_line(stderr, "diverged", "--learning_rate")
    assert not (model_dir / "export").exists() and not (model_dir / "metrics.json").exists()
    assert run_dir.saved_epoch(str(model_dir)) == 0  # no state of a diverged epoch


@pytest.mark.slow
def test_a_run_with_non_finite_test_metrics_is_neither_exported_nor_marked_finished(run_copy, monkeypatch):
    shutil.rmtree(run_copy / "export")
    (run_copy / "metrics.json").unlink()  # as if killed during evaluation: the rerun only evaluates and exports
    evaluate_run = run_evaluation.evaluate_run
    monkeypatch.setattr(run_evaluation, "evaluate_run",
                        lambda *args: dict(evaluate_run(*args), elbo_mean=float("nan")))
    with pytest.raises(ExportRefused, match=r"not finite \(elbo_mean=nan\).*not exported"):
        training.train(tiny_config(run_copy))
    assert not (run_copy / "export").exists() and not (run_copy / "metrics.json").exists()


def test_a_model_below_chance_is_refused_unless_asked_for():
    model = tiny_model("rme", hidden=16)
    test = {"elbo_mean": -9550.0, "log_likelihood_mean": -9000.0}  # what --learning_rate=10 produced
    with pytest.raises(ExportRefused, match=r"below chance \(-543.43.*--export_below_chance"):
        run_evaluation.check_test_metrics(model, tiny_config("run"), test)
    run_evaluation.check_test_metrics(model, tiny_config("run", export_below_chance=True), test)
    run_evaluation.check_test_metrics(model, tiny_config("run", export_dir=""), test)  # nothing to serve
    with pytest.raises(ExportRefused, match="not finite"):
        run_evaluation.check_test_metrics(model, tiny_config("run", export_below_chance=True),
                                          dict(test, elbo_mean=math.inf))


def test_chance_level_follows_the_decoder_and_image_size():
    assert chance_log_likelihood(tf_rmvae.BernoulliDecoder((28, 28, 1))) == pytest.approx(-784 * math.log(2))
    assert chance_log_likelihood(tf_rmvae.GaussianDecoder((32, 32, 3))) == 0.0


# ---------------------------------------------------------------------------------------------- 3, 4. exports
@pytest.mark.slow
def test_the_default_export_lands_in_the_run_directory(finished_run):
    model_dir, metrics = finished_run
    assert RunConfig(model_dir="runs/x").resolved_export_dir == os.path.join("runs/x", "export")
    assert metrics["exports"]["model"] == str(model_dir / "export" / "rmvae_mnist_rme" / "1")


@pytest.mark.slow
def test_exports_and_published_versions_are_readable_as_the_umask_says(finished_run, tmp_path):
    version_dir = finished_run[1]["exports"]["model"]
    assert stat.S_IMODE(os.stat(version_dir).st_mode) == 0o755  # exported under umask 022, not mkdtemp's 0700
    with umask(0o027):
        published = export.publish(version_dir, str(tmp_path / "saved_models"))
    assert published == str(tmp_path / "saved_models" / "rmvae_mnist_rme" / "1")
    assert stat.S_IMODE(os.stat(published).st_mode) == 0o750
    assert export.read_metadata(published)["published_from"] == os.path.abspath(version_dir)
    assert os.path.isfile(os.path.join(published, "saved_model.pb"))


@pytest.mark.slow
def test_the_publish_program_is_quiet_numbers_the_next_version_and_never_copies_a_model_twice(finished_run, tmp_path):
    version_dir = finished_run[1]["exports"]["model"]
    base = tmp_path / "served"
    export.publish(version_dir, str(base))  # version 1; the same model published again is version 1 too
    (base / "rmvae_mnist_rme" / "1" / "variables" / "variables.index").write_bytes(b"another model")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    expected = [f"published {version_dir} as {base / 'rmvae_mnist_rme' / '2'}",
                f"{version_dir} is already published as {base / 'rmvae_mnist_rme' / '2'} (identical model); nothing "
                "copied"]
    for line in expected:
        result = subprocess.run([sys.executable, "-m", "trainers.publish", version_dir, f"--base_dir={base}"],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip() == line
        assert result.stderr == ""  # no TensorFlow start-up logs (CUDA stubs, absl pre-init warnings)
    assert export.existing_versions(str(base / "rmvae_mnist_rme")) == [1, 2]


# ---------------------------------------------------------------------------------------------- 5. lock
HOLD_LOCK = textwrap.dedent("""
    import fcntl, os, socket, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what tf_rmvae.run.directory.RunLock does, without importing TensorFlow
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\\n".encode(), 0)
    print("locked", flush=True)
    time.sleep(300)
""")


@pytest.mark.slow
def test_a_second_trainer_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(run_copy):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run_copy / ".lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(run_dir.RunDirLocked, match=rf"in use by another trainer \(pid {holder.pid} on"):
            training.train(tiny_config(run_copy))
        command = [sys.executable, "-m", "trainers.train", f"--model_dir={run_copy}", *TINY_FLAGS]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert f"error: {run_copy} is in use by another trainer (pid {holder.pid}" in result.stderr
    finally:
        holder.kill()
        holder.wait()
    assert training.train(tiny_config(run_copy))["skipped"]  # the dead holder's lock file is simply taken over


# ---------------------------------------------------------------------------------------------- 6. resume state
def _restored_epoch(model_dir) -> int:
    model = model_factory.build_compiled_model(tiny_config(model_dir), (28, 28, 1), True)
    return run_dir.restore(model, str(model_dir), STEPS)


@pytest.mark.slow
def test_a_truncated_backup_resumes_from_the_newest_intact_checkpoint(run_copy):
    backup = run_copy / "backup" / "latest.weights.h5"
    backup.write_bytes(backup.read_bytes()[: backup.stat().st_size // 2])
    metrics = training.train(tiny_config(run_copy, epochs=2, export_dir=""))
    assert metrics["resumed_from_epoch"] == 1 and metrics["optimizer_iterations"] == 2 * STEPS
    assert [row["epoch"] for row in metrics["history"]] == [0, 1]


@pytest.mark.slow
def test_an_edited_epoch_count_is_refused_by_the_optimizer_step_check(run_copy):
    with h5py.File(run_copy / "backup" / "latest.weights.h5", "r+") as f:
        metadata = json.loads(f.attrs[run_dir.METADATA_ATTR])
        f.attrs[run_dir.METADATA_ATTR] = json.dumps(dict(metadata, epoch=3))  # claims 3 epochs, made 1 x 4 steps
    assert _restored_epoch(run_copy) == 1  # the checkpoint of epoch 1, not the edited backup
    (run_copy / "checkpoints" / "epoch_001.weights.h5").unlink()
    with pytest.raises(run_dir.ResumeStateError, match="claims 3 epochs but its optimizer made 4 steps"):
        _restored_epoch(run_copy)  # nothing intact left: refused, not silently retrained from scratch


@pytest.mark.slow
def test_the_state_is_one_atomic_file_a_crash_mid_save_leaves_the_previous_one(run_copy, monkeypatch):
    assert sorted(os.listdir(run_copy / "backup")) == ["latest.weights.h5"]  # weights and metadata together
    model = model_factory.build_compiled_model(tiny_config(run_copy), (28, 28, 1), True)
    run_dir.restore(model, str(run_copy), STEPS)

    def killed(path):
        raise KeyboardInterrupt("killed after writing the new state, before renaming it into place")

    monkeypatch.setattr(run_dir, "_fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        run_dir.write_state(model, str(run_copy / "backup" / "latest.weights.h5"), run_dir.state_metadata(2, STEPS, 8))
    monkeypatch.undo()
    assert run_dir.read_metadata(str(run_copy / "backup" / "latest.weights.h5"))["epoch"] == 1
    assert _restored_epoch(run_copy) == 1


# ---------------------------------------------------------------------------------------------- 7. serving memory
@pytest.mark.slow
def test_log_likelihood_signature_takes_empty_and_large_batches_in_bounded_slices(finished_run):
    version_dir = finished_run[1]["exports"]["model"]
    assert export.read_metadata(version_dir)["limits"]["log_likelihood_batch"] == 100
    signature = tf.saved_model.load(version_dir).signatures["log_likelihood"]
    empty = signature(images=tf.zeros([0, 28, 28, 1]), num_samples=tf.constant(4))["log_likelihood"]
    assert empty.shape == (0,)
    values = signature(images=tf.constant(mnist_digits(230)), num_samples=tf.constant(4))["log_likelihood"]
    assert values.shape == (230,) and np.all(np.isfinite(values.numpy()))


def test_slices_never_exceed_their_size_and_reassemble_the_batch():
    largest = tf.Variable(0)

    def per_example_sum(x):
        with tf.control_dependencies([largest.assign(tf.maximum(largest, tf.shape(x)[0]))]):
            return tf.reduce_sum(x, axis=[1, 2, 3])

    x = tf.random.stateless_uniform([230, 28, 28, 1], seed=[1, 2])
    result = tf.function(lambda images: export.map_in_slices(per_example_sum, images, 100))(x)
    np.testing.assert_allclose(result.numpy(), tf.reduce_sum(x, axis=[1, 2, 3]).numpy(), rtol=1e-6)
    assert int(largest.numpy()) == 100
    assert tiny_model("rme", hidden=16).log_likelihood(np.zeros([0, 28, 28, 1], np.float32)).shape == (0,)


# ---------------------------------------------------------------------------------------------- 8. CLI errors
USER_ERRORS = {  # case: (flags, what the one error line says); {tmp} is the test's temporary directory
    "unknown_dataset": (["--dataset=nope"], "Unknown dataset 'nope'"),
    "unavailable_dataset": (["--dataset=mnist"], "could not be downloaded"),
    "nan_flag": (["--max_log_ratio=nan"], "--max_log_ratio must be a finite number; got nan"),
    "inf_flag": (["--learning_rate=inf"], "--learning_rate must be a finite number"),
    "unwritable_model_dir": (["--model_dir={tmp}/a_file/run"], "is a file"),
    "unwritable_export_dir": (["--export_dir={tmp}/a_file/exports"], "is a file"),
    "holdout_above_the_split": (["--validation_examples=70000"], "Cannot hold out 70000"),
    "holdout_of_the_whole_split": (["--validation_examples=60000"], "Cannot hold out 60000"),
    "holdout_leaving_less_than_a_batch": (["--validation_examples=59950", "--train_examples=0", "--batch_size=100"],
                                          "--batch_size=100 is larger than the 50 training examples"),
    "train_examples_overlapping_the_holdout": (["--validation_examples=59900"],
                                               "--train_examples=200 is more than the 100 training examples"),
    "patience_without_validation": (["--validation_examples=0", "--early_stopping_patience=2"],
                                    "--early_stopping_patience=2 stops on the validation bound"),
    "model_dir_name_too_long": (["--model_dir={tmp}/" + "x" * 300], "300 bytes long; this filesystem allows 255"),
    "model_dir_near_the_path_limit": (["--model_dir={tmp}/" + "/".join(["d" * 200] * 19)], "the files written below"),
}


@pytest.mark.parametrize("case", sorted(USER_ERRORS))
def test_user_errors_exit_2_with_one_line_before_anything_is_written(case, tmp_path, monkeypatch, capsys):
    from tf_rmvae.data import pipeline

    def no_network(spec, data_dir):
        raise pipeline.DatasetUnavailableError(f"Dataset {spec.name!r} is not prepared and could not be downloaded.")

    if case == "unavailable_dataset":
        monkeypatch.setattr(pipeline, "_prepared_builder", no_network)
    (tmp_path / "a_file").write_text("not a directory")
    flags, message = USER_ERRORS[case]
    status, stderr = run_main([f"--model_dir={tmp_path}/run", *TINY_FLAGS, *(f.format(tmp=tmp_path) for f in flags)],
                              capsys)
    assert status == 2
    assert_one_error_line(stderr, message)
    assert os.listdir(tmp_path) == ["a_file"]  # so a corrected rerun there is not refused as "a different run"


@pytest.mark.slow
def test_a_truncated_config_exits_2_with_one_line(run_copy, capsys):
    config = run_copy / "config.json"
    config.write_text(config.read_text()[:40])
    status, stderr = run_main([f"--model_dir={run_copy}", *TINY_FLAGS], capsys)
    assert status == 2
    assert_one_error_line(stderr, "config.json is not a readable run configuration")


# ---------------------------------------------------------------------------------------------- 9. disk full
@pytest.mark.slow
def test_disk_full_while_saving_the_backup_keeps_the_previous_state_and_exits_1(run_copy, monkeypatch, capsys):
    save_weights = keras.Model.save_weights

    def fills_the_disk(model, path, *args, **kwargs):
        if path.endswith("latest.weights.h5"):  # epoch 2's backup (its checkpoint still fits)
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return save_weights(model, path, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save_weights", fills_the_disk)
    status, stderr = run_main([f"--model_dir={run_copy}", *TINY_FLAGS, "--epochs=2"], capsys)
    assert status == 1
    assert_one_error_line(stderr, "No space left on device", "intact", "rerun the same command")
    monkeypatch.undo()
    leftovers = sorted(name for sub in ("backup", "checkpoints") for name in os.listdir(run_copy / sub)
                       if not name.startswith("best."))  # the best-validation checkpoint is saved on its own
    assert leftovers == ["epoch_001.weights.h5", "epoch_002.weights.h5", "latest.weights.h5"]  # no temporary file
    assert run_dir.saved_epoch(str(run_copy)) == 1  # the backup still holds epoch 1, whole
    metrics = training.train(tiny_config(run_copy, epochs=2, export_dir=""))  # space freed: the same command
    assert metrics["resumed_from_epoch"] == 2  # from the newest intact state, epoch 2's checkpoint
    assert metrics["completed"] and metrics["epochs_completed"] == 2 and metrics["optimizer_iterations"] == 2 * STEPS


@pytest.mark.slow
def test_a_state_that_cannot_fit_is_refused_before_hdf5_writes_anything(run_copy, monkeypatch):
    """On a really full disk HDF5 failed mid-write and the process died of a segfault (tried on a small tmpfs):
    a save is refused up front when the free space is smaller than the state."""
    model = model_factory.build_compiled_model(tiny_config(run_copy), (28, 28, 1), True)
    run_dir.restore(model, str(run_copy), STEPS)
    almost_full = os.statvfs_result((4096, 4096, 1000, 20, 20, 1000, 900, 900, 0, 255))  # 80 KiB free

    def must_not_write(*args):
        raise AssertionError("HDF5 was asked to write a state that cannot fit")

    monkeypatch.setattr(run_dir.os, "statvfs", lambda path: almost_full)
    monkeypatch.setattr(run_dir, "_save_weights", must_not_write)
    backup = str(run_copy / "backup" / "latest.weights.h5")
    with pytest.raises(run_dir.DiskFullError, match=r"needs about .* MiB, 0.1 MiB are free; the previously saved"):
        run_dir.write_state(model, backup, run_dir.state_metadata(2, STEPS, 2 * STEPS))
    monkeypatch.undo()
    assert os.listdir(run_copy / "backup") == ["latest.weights.h5"] and run_dir.read_metadata(backup)["epoch"] == 1


# ---------------------------------------------------------------------------------------------- 10. README code
def readme_python_blocks() -> list[str]:
    """The Python code blocks of README.md, in order."""
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.S | re.M)


def _check_own_vae(namespace, printed):
    losses = json.loads(printed.strip().splitlines()[-1])
    assert len(losses) == 2 and 100 < losses[1] < losses[0] < 600, printed  # -ELBO, not compile()'s idle 0.0
    assert namespace["history"].history["loss"] == pytest.approx(losses, abs=0.5)


def _check_own_rme(namespace, printed):
    model = namespace["model"]
    assert int(model.encoder.num_active_components) == 3
    assert -600 < float(model.elbo_tracker.result()) < -60


def _check_fit(namespace, printed):
    match = re.fullmatch(r"(-?\d+\.\d) nats on 200 digits", printed.strip().splitlines()[-1])
    assert match and -543.4 < float(match.group(1)) < -60, printed  # better than chance
    assert namespace["log_px"].shape == (200,)
    model = namespace["model"]  # the recommended model the comment names: 3 heads on one trunk, 5 samples, lambda 1,
    assert int(model.encoder.num_active_components) == 3 and model.encoder.max_components == 3  # DReG components
    assert model.encoder.shared_trunk and model.rme.num_samples == 5 and model.rme.lambda_kl == 1.0
    assert model.rme.criterion.dreg


README_CHECKS = [_check_own_vae, _check_fit, _check_own_rme]  # one per block, in order


@pytest.mark.parametrize("index", range(len(README_CHECKS)))
def test_every_readme_python_block_runs_as_written_and_gives_what_it_says(index, capsys):
    blocks = readme_python_blocks()
    assert len(blocks) == len(README_CHECKS), "a README Python block without its check here"
    namespace = {"__name__": f"readme_block_{index}"}
    exec(compile(blocks[index], f"README.md python block {index + 1}", "exec"), namespace)  # noqa: S102
    README_CHECKS[index](namespace, capsys.readouterr().out)


# ---------------------------------------------------------------------------------------------- 11. round 2
def run_program(args, module="trainers.train", console_script=False) -> subprocess.CompletedProcess:
    """A program in a new process (`console_script`: started as `rmvae-train` is, its main module not ours)."""
    start = ["-c", f"import sys; sys.argv[0] = 'rmvae'; from {module} import run; run()"] if console_script \
        else ["-m", module]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, *start, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_help_of_the_console_script_lists_the_trainers_flags():
    result = run_program(["--help"], console_script=True)
    assert result.returncode == 0
    assert result.stdout.startswith("Trains a Recursive Mixture Estimation VAE")
    for flag in ("--model_dir", "--epochs", "--validation_examples", "--tf_log_level"):
        assert f"  {flag}:" in result.stdout, result.stdout[-2000:]


@pytest.mark.parametrize("args, message", [
    (["--method=foo", "--model_dir=x"], "value should be one of <rme|vae|mixture|boosting|savae>"),
    (["--epochs=abc", "--model_dir=x"], "--epochs=abc"),
    (["--no_such_flag", "--model_dir=x"], "no_such_flag"),
])
def test_flag_errors_exit_2_with_one_error_line(args, message, capsys):
    from trainers import (
        cli,
        train,  # noqa: F401  (defines the flags)
    )

    try:
        with pytest.raises(SystemExit) as exit_:
            cli.parse_flags(["train", *args])
    finally:
        flags.FLAGS.unparse_flags()
    assert exit_.value.code == 2
    assert_one_error_line(capsys.readouterr().err, message)


def test_the_programs_exit_2_on_a_flag_error_and_without_the_required_model_dir(tmp_path):
    result = run_program(["--epochs=abc", f"--model_dir={tmp_path}/run"], console_script=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert_one_error_line(result.stderr, "--epochs=abc")
    result = run_program(["--epochs=2"])
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "--model_dir is required")
    result = run_program(["--model_dir=x", "stray"])
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "unexpected arguments 'stray'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("damage", ["", '{"epoch": 0, "val', '{"epoch": 0, "value": "abc", "monitor": "val_loss"}',
                                    '"a string"'], ids=["empty", "truncated", "string_value", "not_an_object"])
@pytest.mark.slow
def test_a_damaged_best_record_stops_resume_and_extension_with_one_line_naming_it(run_copy, damage, capsys):
    (run_copy / "checkpoints" / "best.json").write_text(damage)
    config_before = (run_copy / "config.json").read_text()
    for extra in (["--epochs=2"], ["--epochs=1"]):  # an extension; a resume (the metrics gone)
        if extra == ["--epochs=1"]:
            (run_copy / "metrics.json").unlink()
        status, stderr = run_main([f"--model_dir={run_copy}", *TINY_FLAGS, *extra], capsys)
        assert status == 1
        assert_one_error_line(stderr, "checkpoints/best.json is damaged", "the resume state is intact",
                              "Delete best.json and best.weights.h5")
    assert (run_copy / "config.json").read_text() == config_before


@pytest.mark.slow
def test_a_damaged_metrics_file_is_rewritten_by_evaluating_the_saved_run_again(run_copy, capsys):
    (run_copy / "metrics.json").write_text('{"completed": tr')
    status, stderr = run_main([f"--model_dir={run_copy}", *TINY_FLAGS, "--export_dir="], capsys)
    assert status == 0, stderr
    metrics = json.loads((run_copy / "metrics.json").read_text())
    assert metrics["completed"] and metrics["epochs_completed"] == 1 and metrics["resumed_from_epoch"] == 1


def test_json_state_is_flushed_to_disk_before_it_replaces_the_old_file(tmp_path, monkeypatch):
    from tf_rmvae import files

    synced = []
    monkeypatch.setattr(files.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")))
    files.write_json_atomic(tmp_path / "best.json", {"epoch": 1})
    assert synced == [str(tmp_path / "best.json.tmp"), str(tmp_path)]  # the data, then the rename
    assert json.loads((tmp_path / "best.json").read_text()) == {"epoch": 1}


@pytest.mark.slow
def test_a_full_disk_at_export_exits_1_saying_what_is_intact(run_copy, monkeypatch, capsys):
    shutil.rmtree(run_copy / "export")
    (run_copy / "metrics.json").unlink()  # as if killed during evaluation: the rerun evaluates and exports

    def full(*args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, "export/.tmp-1/variables; No space left on device")

    monkeypatch.setattr(export, "export_model", full)
    status, stderr = run_main([f"--model_dir={run_copy}", *TINY_FLAGS], capsys)
    assert status == 1
    assert_one_error_line(stderr, "No space left on device while exporting", "the trained state is intact",
                          "rerun the same command")
    assert not (run_copy / "metrics.json").exists()


@pytest.mark.slow
def test_a_run_interrupted_after_2_epochs_refuses_fewer_epochs_without_rewriting_its_config(run_copy, capsys):
    training.train(tiny_config(run_copy, epochs=2, export_dir=""))
    (run_copy / "metrics.json").unlink()  # as if interrupted after its second epoch
    config_before = (run_copy / "config.json").read_text()
    status, stderr = run_main([f"--model_dir={run_copy}", *TINY_FLAGS, "--epochs=1"], capsys)
    assert status == 2
    assert_one_error_line(stderr, "holds 2 completed epochs, more than --epochs=1", "--epochs=2 or more")
    assert (run_copy / "config.json").read_text() == config_before


@pytest.mark.slow
def test_an_early_stopped_run_extended_says_why_nothing_was_trained(finished_run, capsys):
    from trainers import train as program

    metrics = dict(finished_run[1], skipped=True, stopped_early=True, epochs_completed=3)
    program._report(tiny_config("runs/x", epochs=10, early_stopping_patience=2), metrics)
    line = capsys.readouterr().out.splitlines()[0]
    assert "(already finished: stopped early" in line and "--early_stopping_patience=2" in line, line


def test_ctrl_c_exits_130_with_one_line_saying_how_to_resume(tmp_path, monkeypatch, capsys):
    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", interrupted)
    status, stderr = run_main([f"--model_dir={tmp_path}/run", *TINY_FLAGS], capsys)
    assert status == 130
    assert_one_error_line(stderr, "interrupted", "rerun the same command to resume")


@pytest.mark.slow
def test_a_moved_run_directory_reports_its_own_export_path(run_copy, capsys):
    saved = json.loads((run_copy / "metrics.json").read_text())
    assert saved["exports"]["model"] == os.path.join("export", "rmvae_mnist_rme", "1")
    assert saved["figures"]["samples.png"] == "samples.png"
    status, _ = run_main([f"--model_dir={run_copy}", *TINY_FLAGS], capsys)
    assert status == 0
    assert f"exported model: {run_copy / 'export' / 'rmvae_mnist_rme' / '1'}" in capsys.readouterr().out


@pytest.mark.parametrize("make, message", [
    (lambda: tf_rmvae.RecursiveMixtureEncoder(4, 2, hidden_units=(0,)), "hidden_units must be integer widths >= 1"),
    (lambda: tf_rmvae.GaussianEncoder(2.5, hidden_units=(16,)), "latent_dim must be an integer >= 1; got 2.5"),
    (lambda: tf_rmvae.RecursiveMixtureEncoder(4, 2, hidden_units=(16, -3)), "hidden_units must be integer widths"),
    (lambda: tf_rmvae.ComponentNetworks(True, 4), "max_components must be an integer >= 1"),
], ids=["zero_width", "fractional_latent", "negative_width", "bool_components"])
def test_the_library_refuses_what_the_command_line_refuses(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_images_without_a_channel_axis_are_refused_naming_the_fix():
    with pytest.raises(ValueError, match=re.escape("without the channel axis. Add it, e.g. `x[..., None]`")):
        compiled(tiny_model("vae", hidden=16)).fit(mnist_digits(20)[..., 0], batch_size=10, epochs=1, verbose=0)


def test_a_saved_model_loads_after_a_bare_import_of_the_package(tmp_path):
    path = tmp_path / "vae.keras"
    model = compiled(tiny_model("rme", hidden=16))
    model.fit(mnist_digits(20), batch_size=10, epochs=1, verbose=0)
    model.save(path)
    script = f"import keras, tf_rmvae; print(type(keras.models.load_model({str(path)!r})).__name__)"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "RecursiveMixtureVAE"


@pytest.mark.slow
def test_the_serving_example_is_quiet(finished_run):
    result = run_program([f"--model_dir={finished_run[1]['exports']['model']}"], module="trainers.serving_example")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr == "" and result.stdout.startswith("request (image abbreviated):")
