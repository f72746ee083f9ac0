"""The benchmark harness end to end (quick mode), its paired statistics, the speed benchmark and SA-VAE."""

import json
import math
import os
import sys

import numpy as np
import pytest

# benchmarks/ is not installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_rmvae  # noqa: E402
from benchmarks import harness, plots, speed  # noqa: E402
from tf_rmvae import evaluation  # noqa: E402
from tf_rmvae.semi_amortized import SemiAmortizedVAE  # noqa: E402

NUMERIC_FIELDS = ("test_elbo", "test_log_likelihood", "test_log_likelihood_se", "train_elbo", "wall_time_s",
                  "epochs", "seed", "iwae_samples", "num_components")
REQUIRED_FIELDS = NUMERIC_FIELDS + ("dataset", "method", "lambda_kl", "paired_se_vs", "paired_diff_vs",
                                    "mixture_weights", "component_entropies", "device")


def test_paired_statistics_match_numpy():
    rng = np.random.default_rng(0)
    a = rng.normal(-90, 5, size=500)
    b = a + rng.normal(0.3, 0.5, size=500)  # strongly correlated with a
    diff, se = evaluation.paired_difference(a, b)
    assert diff == pytest.approx(np.mean(a - b))
    assert se == pytest.approx(np.std(a - b, ddof=1) / np.sqrt(500))
    unpaired_se = math.hypot(evaluation.mean_and_se(a)[1], evaluation.mean_and_se(b)[1])
    assert se < unpaired_se / 5  # pairing removes the shared per-digit variance
    stats = evaluation.paired_comparisons({"a": a, "b": b, "c": np.zeros(500)})
    assert stats["a"]["b"][0] == pytest.approx(-stats["b"]["a"][0])
    assert stats["a"]["b"][1] == pytest.approx(stats["b"]["a"][1])
    assert set(stats["c"]) == {"a", "b"}
    assert evaluation.mean_and_se([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0 / np.sqrt(3)))
    with pytest.raises(ValueError):
        evaluation.paired_difference(a, b[:10])


def test_quick_harness_runs_every_method_end_to_end(tmp_path, capsys):
    config = harness.quick_config(
        output_dir=str(tmp_path), lambdas=(0.3,), bounds=("elbo", "iw"), savae_steps=(1, 2), eval_epochs=(1,))
    rows = harness.run_benchmark(config)
    labels = [r["label"] for r in rows]
    assert {r["method"] for r in rows} == set(harness.ALL_METHODS)
    assert {"rme_M2_lambda0.3", "rme_M2_lambda0.3_iw", "mixture_M2_iw", "savae1", "savae2", "iwae_k2",
            "vae_equal_params_M2"} <= set(labels)
    by_label = {r["label"]: r for r in rows}
    assert by_label["rme_M2_lambda0.3_iw"]["bound"] == "iw" and by_label["iwae_k2"]["bound"] == "iw"
    assert by_label["savae1"]["savae_steps"] == 1
    # The equal-parameter VAE's one encoder is about as large as the mixture's M = 2 encoders.
    equal, mixture = by_label["vae_equal_params_M2"], by_label["mixture_M2"]
    assert equal["encoder_parameters"] == pytest.approx(mixture["encoder_parameters"], rel=0.02)
    assert by_label["vae"]["encoder_parameters"] < 0.6 * equal["encoder_parameters"]
    # The learning curve: epoch 1 from the callback, the last epoch from the final evaluation.
    for row in rows:
        assert [p["epoch"] for p in row["curve"]] == [1, 2]
        assert row["curve"][-1]["test_log_likelihood"] == row["test_log_likelihood"]
        assert row["test_inference_gap"] == pytest.approx(row["test_log_likelihood"] - row["test_elbo"])
        assert row["inference_ms_batch1"] > 0
    with open(tmp_path / "quick.json") as f:
        stored = json.load(f)
    assert stored["rows"] == json.loads(json.dumps(rows))
    for row in stored["rows"]:
        assert set(REQUIRED_FIELDS) <= set(row), set(REQUIRED_FIELDS) - set(row)
        for field in NUMERIC_FIELDS:
            assert np.isfinite(row[field]), (row["label"], field)
        others = set(labels) - {row["label"]}
        assert set(row["paired_se_vs"]) == others and set(row["paired_diff_vs"]) == others
        assert all(np.isfinite(v) and v >= 0 for v in row["paired_se_vs"].values())
        assert len(row["mixture_weights"]) == row["num_components"]
        assert sum(row["mixture_weights"]) == pytest.approx(1.0, abs=1e-4)
        assert all(np.isfinite(row["component_entropies"]))
        assert row["test_log_likelihood"] >= row["test_elbo"] - 5  # IWAE bound is (nearly) above the ELBO
    # Paired statistics agree with a numpy computation on the stored per-example arrays.
    a_dir = tmp_path / "quick_cells" / f"{rows[0]['label']}_seed0"
    b_dir = tmp_path / "quick_cells" / f"{rows[1]['label']}_seed0"
    a = np.load(a_dir / "per_example.npz")["log_likelihood"]
    b = np.load(b_dir / "per_example.npz")["log_likelihood"]
    assert rows[0]["paired_diff_vs"][rows[1]["label"]] == pytest.approx(np.mean(a - b), rel=1e-5)
    assert rows[0]["paired_se_vs"][rows[1]["label"]] == pytest.approx(np.std(a - b, ddof=1) / np.sqrt(len(a)))
    # Resume: a rerun loads every finished cell instead of training it again.
    capsys.readouterr()
    again = harness.run_benchmark(config)
    assert capsys.readouterr().out.count("finished earlier: loaded") == len(rows)
    assert [r["test_log_likelihood"] for r in again] == [r["test_log_likelihood"] for r in rows]
    assert len(plots.make_plots(rows, str(tmp_path / "plots"))) == 3


def test_speed_benchmark_tiny_prints_ratios(capsys):
    result = speed.main(["--tiny", "--output", ""])
    out = capsys.readouterr().out
    assert "ratio rme_M2/vae_encoder@1" in out and "ratio train_rme_M2/train_vae@8" in out
    assert "PASS" in out or "FAIL" in out
    targets = result["modes"]["function"]["targets"]
    assert len(targets) == 4 and all(np.isfinite(t["value"]) and t["value"] > 0 for t in targets)


def _tiny_savae(**kwargs):
    encoder = tf_rmvae.GaussianEncoder(4, hidden_units=(32,), seed=0)
    return SemiAmortizedVAE(encoder, tf_rmvae.BernoulliDecoder((28, 28, 1), hidden_units=(32,)), **kwargs)


def test_savae_refinement_increases_per_example_elbo():
    rng = np.random.default_rng(0)
    x = (rng.random((64, 28, 28, 1)) < 0.2).astype(np.float32)
    model = _tiny_savae(refine_steps=10, refine_lr=0.05)
    model.compile(keras.optimizers.Adam(1e-3))
    model.fit(x, batch_size=32, epochs=1, verbose=0)
    tf.random.set_seed(0)
    amortized = model.amortized_elbo(x, num_samples=50).numpy()
    refined = model.elbo(x, num_samples=50).numpy()
    gain, se = evaluation.paired_difference(refined, amortized)
    assert gain > 3 * se and gain > 0
    assert np.mean(refined > amortized) > 0.7
    log_px = model.log_likelihood(x[:8], num_samples=50, chunk_size=25).numpy()
    assert log_px.shape == (8,) and np.all(np.isfinite(log_px))


def test_savae_unrolled_training_reaches_the_encoder_and_round_trips_config():
    model = _tiny_savae(refine_steps=2)
    model.compile(keras.optimizers.Adam(1e-3))
    x = (np.random.default_rng(1).random((32, 28, 28, 1)) < 0.2).astype(np.float32)
    model.ensure_built(x.shape)
    before = [v.numpy().copy() for v in model.encoder.trainable_variables]
    logs = model.train_on_batch(x, return_dict=True)
    assert np.isfinite(logs["elbo"]) and "refinement_gain" in logs
    assert any(not np.allclose(b, v.numpy()) for b, v in zip(before, model.encoder.trainable_variables))
    clone = SemiAmortizedVAE.from_config(model.get_config())
    assert clone.refine_steps == 2 and clone.encoder_objective == "unrolled"
    with pytest.raises(TypeError, match="GaussianEncoder"):
        SemiAmortizedVAE(tf_rmvae.RecursiveMixtureEncoder(4, 1), tf_rmvae.BernoulliDecoder((28, 28, 1)))
