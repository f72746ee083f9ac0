"""The run's callbacks in process (fast): the best-validation checkpoint and early stopping across a resume, the
TensorBoard images and grouped mixture scalars, and the programs' log-level parsing."""

from __future__ import annotations

import glob
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import mnist_digits, tiny_model
from tf_rmvae.choices import resolve_best_monitor
from tf_rmvae.config import RunConfig
from tf_rmvae.files import DamagedFileError
from tf_rmvae.run import directory as run_dir
from tf_rmvae.run import report
from tf_rmvae.run.best_checkpoint import BestCheckpoint, load_best, read_best, stop_reached
from tf_rmvae.run.callbacks import make_callbacks
from tf_rmvae.run.summaries import GroupedTensorBoard, ImageSummaries, grouped_name
from trainers import quiet

VALUES = [-300.0, -250.0, -260.0, -240.0, -245.0, -241.0, -239.0]  # best after epochs 0, 1, 3 and 6 (0-based)


def _dense_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    return model


def _epochs(callback: BestCheckpoint, model: keras.Model, epochs: range) -> list[int]:
    """Drives `callback` through `epochs` (0-based) with `VALUES`, changing the weights every epoch like training;
    returns the epochs after which it asked to stop (it stops at the first)."""
    callback.set_model(model)
    callback.on_train_begin()
    stops = []
    for epoch in epochs:
        model.layers[0].kernel.assign(np.full((3, 2), float(epoch), np.float32))
        callback.on_epoch_end(epoch, {"val_elbo": VALUES[epoch], "elbo": 0.0})
        if model.stop_training:
            stops.append(epoch)
            break
    return stops


def test_best_checkpoint_keeps_the_best_epoch_and_its_weights(tmp_path):
    model = _dense_model()
    _epochs(BestCheckpoint(str(tmp_path)), model, range(len(VALUES)))
    assert read_best(str(tmp_path)) == {"epoch": 6, "value": -239.0, "monitor": "val_elbo", "mode": "max"}
    fresh = _dense_model(seed=1)
    assert load_best(fresh, str(tmp_path))["epoch"] == 6
    np.testing.assert_array_equal(fresh.layers[0].kernel.numpy(), np.full((3, 2), 6.0))
    assert load_best(_dense_model(), str(tmp_path / "none")) is None


def test_early_stopping_after_patience_epochs_without_a_better_value(tmp_path):
    model = _dense_model()
    model.stop_training = False
    assert _epochs(BestCheckpoint(str(tmp_path), patience=2), model, range(len(VALUES))) == [5]
    assert read_best(str(tmp_path))["epoch"] == 3  # epochs 4 and 5 were not better


def test_best_value_epoch_and_stopping_survive_an_interruption(tmp_path):
    uninterrupted, resumed = tmp_path / "a", tmp_path / "b"
    model = _dense_model()
    model.stop_training = False
    assert _epochs(BestCheckpoint(str(uninterrupted), patience=2), model, range(len(VALUES))) == [5]

    first = _dense_model()
    first.stop_training = False
    assert _epochs(BestCheckpoint(str(resumed), patience=2), first, range(0, 5)) == []  # killed after epoch 4
    assert read_best(str(resumed))["epoch"] == 3
    second = _dense_model(seed=2)  # a new process: a new callback and model, state from the files alone
    second.stop_training = False
    assert _epochs(BestCheckpoint(str(resumed), patience=2), second, range(5, len(VALUES))) == [5]
    assert read_best(str(resumed)) == read_best(str(uninterrupted))
    assert stop_reached(read_best(str(resumed)), 6, patience=2) and not stop_reached(None, 6, patience=2)
    assert not stop_reached(read_best(str(resumed)), 6, patience=0)


def test_a_minimised_monitor_keeps_its_lowest_epoch(tmp_path):
    model = _dense_model()
    callback = BestCheckpoint(str(tmp_path), monitor="val_loss", mode="min")
    callback.set_model(model)
    callback.on_train_begin()
    for epoch, value in enumerate(VALUES):
        callback.on_epoch_end(epoch, {"val_loss": -value, "val_elbo": 0.0})
    assert read_best(str(tmp_path)) == {"epoch": 6, "value": 239.0, "monitor": "val_loss", "mode": "min"}


def test_a_resumed_run_keeps_the_monitor_its_record_names(tmp_path):
    # A run started when the best checkpoint compared the validation ELBO (a record without its mode), resumed by a
    # version that monitors the validation loss: it goes on comparing the ELBO, so epoch 3's -240 stays the best
    # until epoch 6's -239, whatever the losses say.
    model = _dense_model()
    model.stop_training = False
    _epochs(BestCheckpoint(str(tmp_path)), model, range(0, 5))
    record = read_best(str(tmp_path))
    (tmp_path / "best.json").write_text(
        '{"epoch": %d, "value": %r, "monitor": "val_elbo"}' % (record["epoch"], record["value"]))
    callback = BestCheckpoint(str(tmp_path), monitor="val_loss", mode="min", patience=2)
    callback.set_model(model)
    callback.on_train_begin()
    assert (callback.monitor, callback.mode) == ("val_elbo", "max")
    callback.on_epoch_end(5, {"val_elbo": VALUES[5], "val_loss": -1000.0})
    assert read_best(str(tmp_path))["epoch"] == 3
    callback.on_epoch_end(6, {"val_elbo": VALUES[6], "val_loss": 1000.0})
    assert read_best(str(tmp_path)) == {"epoch": 6, "value": -239.0, "monitor": "val_elbo", "mode": "max"}


def test_a_record_without_a_mode_or_with_a_wrong_one_fails_clearly(tmp_path):
    callback = BestCheckpoint(str(tmp_path), monitor="val_loss", mode="min")
    callback.set_model(_dense_model())
    # A library user's record of "val_loss" from before records named their mode: the callback's own mode holds.
    (tmp_path / "best.json").write_text('{"epoch": 2, "value": 100.0, "monitor": "val_loss"}')
    callback.on_train_begin()
    assert (callback.monitor, callback.mode) == ("val_loss", "min")
    callback.on_epoch_end(3, {"val_loss": 90.0})
    assert read_best(str(tmp_path))["epoch"] == 3
    # Another monitor without its mode cannot be compared; nor can a record with a mode that is not one.
    (tmp_path / "best.json").write_text('{"epoch": 2, "value": 100.0, "monitor": "val_kl"}')
    with pytest.raises(ValueError, match="records monitor 'val_kl' without its mode"):
        callback.on_train_begin()
    (tmp_path / "best.json").write_text('{"epoch": 2, "value": 100.0, "monitor": "val_loss", "mode": "up"}')
    with pytest.raises(DamagedFileError, match=r"best.json is damaged \(mode 'up' is not 'max' or 'min'\)"):
        callback.on_train_begin()


def test_the_best_checkpoint_compares_the_bound_each_run_trains():
    assert resolve_best_monitor("rme", "auto") == resolve_best_monitor("vae", "iw") == ("val_loss", "min")
    assert resolve_best_monitor("rme", "elbo") == resolve_best_monitor("mixture", "auto") == ("val_elbo", "max")
    config = RunConfig(hidden_units=(8,), latent_dim=2)  # --bound=auto
    for run, expected in [(config, ("val_loss", "min")), (config.replace(bound="elbo"), ("val_elbo", "max")),
                          (config.replace(method="vae", num_components=1), ("val_elbo", "max"))]:
        [best] = [c for c in make_callbacks(run, validation=True) if isinstance(c, BestCheckpoint)]
        assert (best.monitor, best.mode) == expected


def test_the_lines_name_the_monitor_and_give_the_bound_not_the_loss():
    best = {"epoch": 9, "value": 99.56, "monitor": "val_loss", "mode": "min"}
    line = report.training_line(10, 12, 0, 399.0, best, True, 2)
    assert line == ("10 of 12 epochs in 399 s; best validation importance-weighted bound -99.56 after epoch 10; "
                    "stopped early (no better validation importance-weighted bound in 2 epochs)")
    elbo = {"epoch": 0, "value": -104.2, "monitor": "val_elbo", "mode": "max"}
    assert "best validation ELBO -104.20 after epoch 1" in report.training_line(1, 1, 0, 1.0, elbo, False, 0)
    assert "stopped early" in report.training_line(3, 5, 0, 1.0, None, True, 2)


def test_best_checkpoint_without_validation_logs_fails_clearly(tmp_path):
    callback = BestCheckpoint(str(tmp_path))
    callback.set_model(_dense_model())
    callback.on_train_begin()
    with pytest.raises(KeyError, match="val_elbo"):
        callback.on_epoch_end(0, {"elbo": -100.0})


def _summaries(run_dir: str) -> dict[str, list[tf.compat.v1.Summary.Value]]:
    """`{tag: [values]}` over every event file of a TensorBoard run directory."""
    found: dict[str, list] = {}
    for path in glob.glob(os.path.join(run_dir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, value))
    return found


def test_checkpoints_are_kept_and_tried_by_epoch_past_epoch_999(tmp_path):
    # As text "epoch_1000" sorts before "epoch_998": pruning would delete the newest and resuming try the oldest.
    model = _dense_model()
    model.optimizer.build(model.trainable_variables)
    callback = run_dir.SaveState(str(tmp_path / "backup"), str(tmp_path / "checkpoints"), keep=2)
    callback.set_model(model)
    callback.set_params({"steps": 1})
    for epoch in range(996, 1001):  # 0-based: saves epochs 997 ... 1001
        callback.on_epoch_end(epoch)
    kept = sorted(os.listdir(tmp_path / "checkpoints"))
    assert kept == ["epoch_1000.weights.h5", "epoch_1001.weights.h5"]
    candidates = [os.path.relpath(p, tmp_path) for p in run_dir.state_candidates(str(tmp_path))]
    assert candidates == [os.path.join("backup", run_dir.STATE_FILE), os.path.join("checkpoints", kept[1]),
                          os.path.join("checkpoints", kept[0])]
    assert run_dir.read_metadata(str(tmp_path / "checkpoints" / kept[1]))["epoch"] == 1001


@pytest.mark.slow
def test_tensorboard_images_and_grouped_mixture_scalars(tmp_path):
    model = tiny_model(components=2, hidden=16, latent_dim=4)
    model.compile(optimizer=keras.optimizers.Adam(1e-3))
    x = mnist_digits(64)
    log_dir = str(tmp_path / "logs")
    callbacks = [GroupedTensorBoard(log_dir, write_graph=False), ImageSummaries(log_dir, x[:6], every_epochs=2)]
    model.fit(x, epochs=3, batch_size=32, validation_data=(x[:32],), callbacks=callbacks, verbose=0, shuffle=False)

    train, validation = _summaries(os.path.join(log_dir, "train")), _summaries(os.path.join(log_dir, "validation"))
    for tag in ("reconstructions", "samples"):
        assert [step for step, _ in train[tag]] == [1, 2]  # after epochs 2 and 3 (the last), 0-based steps
        value = train[tag][0][1]
        assert value.metadata.plugin_data.plugin_name == "images"
        width, height, png = tf.make_ndarray(value.tensor)
        assert tf.io.decode_png(png).shape[-1] == 1 and int(height) > 28 and int(width) > 28
    grid = tf.io.decode_png(tf.make_ndarray(train["reconstructions"][0][1].tensor)[2]).numpy()
    assert grid.shape[:2] == (2 * 28 + 1, 8 * 29 - 1)  # a row of 6 digits and one of their reconstructions
    for tag in ("mixture/weight_0", "mixture/weight_1", "mixture/entropy_0", "mixture/entropy_1"):
        assert [step for step, _ in train[tag]] == [0, 1, 2], tag
    assert "mixture/entropy_1" in validation and "mixture/weight_1" not in validation
    assert not [tag for tag in {**train, **validation} if "weight_0" in tag and not tag.startswith("mixture/")]
    assert "custom_scalars__config__" in train and "epoch_elbo" in validation


def test_only_per_component_metrics_are_grouped():
    assert grouped_name("weight_3") == ("train", "mixture/weight_3")
    assert grouped_name("val_entropy_0") == ("validation", "mixture/entropy_0")
    assert grouped_name("val_weight_0") is None and grouped_name("elbo") is None
    assert grouped_name("weight_x") is None


@pytest.mark.parametrize(
    "argv, environ, level",
    [
        ([], {}, 3),
        (["--tf_log_level=0"], {}, 0),
        (["--tf_log_level", "1", "--epochs=2"], {"TF_CPP_MIN_LOG_LEVEL": "3"}, 1),
        ([], {"TF_CPP_MIN_LOG_LEVEL": "2"}, 2),
        (["--tf_log_level=9"], {}, 3),
    ],
)
def test_log_level_comes_from_the_flag_then_the_environment(argv, environ, level):
    assert quiet.requested_level(["prog", *argv], environ) == level

