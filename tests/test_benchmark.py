"""The benchmark harness end to end (quick mode), its paired statistics, the speed benchmark and SA-VAE."""

import dataclasses
import json
import math
import os
import shutil
import sys

import numpy as np
import pytest

# benchmarks/ is not installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_rmvae  # noqa: E402
from benchmarks import amortization, cell_store, compare, frontier, harness, plots, speed  # noqa: E402
from benchmarks import cells as run_cells  # noqa: E402
from tf_rmvae.models.semi_amortized import SemiAmortizedVAE  # noqa: E402
from tf_rmvae.run import evaluation  # noqa: E402

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


@pytest.mark.slow
def test_quick_harness_runs_every_method_end_to_end(tmp_path, capsys):
    config = run_cells.quick_config(
        output_dir=str(tmp_path), lambdas=(0.3,), bounds=("elbo", "iw"), savae_steps=(1, 2), eval_epochs=(1,))
    rows = harness.run_benchmark(config)
    labels = [r["label"] for r in rows]
    assert {r["method"] for r in rows} == set(run_cells.ALL_METHODS)
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
    # A run still going: finished_only writes what is finished, marked partial, with the missing cells named.
    bigger = dataclasses.replace(config, seeds=(0, 1))
    partial = harness.run_benchmark(bigger, finished_only=True)
    with open(tmp_path / "quick.partial.json") as f:
        stored_partial = json.load(f)
    assert stored_partial["partial"] and len(partial) == len(rows)
    assert stored_partial["missing"] == [c.key for c in run_cells.cells(bigger) if c.seed == 1]
    # Another table over the same cells: its own file, and the cells still count as finished.
    harness.run_benchmark(dataclasses.replace(config, methods=("vae",), table_name="vae_only"), finished_only=True)
    with open(tmp_path / "vae_only.partial.json") as f:
        assert [r["label"] for r in json.load(f)["rows"]] == ["vae"]
    with open(tmp_path / "quick.partial.json") as f:
        assert json.load(f) == stored_partial
    # Resume: a rerun loads every finished cell instead of training it again.
    capsys.readouterr()
    again = harness.run_benchmark(config)
    assert capsys.readouterr().out.count("finished earlier: loaded") == len(rows)
    assert [r["test_log_likelihood"] for r in again] == [r["test_log_likelihood"] for r in rows]
    assert len(plots.make_plots(rows, str(tmp_path / "plots"))) == 3
    paths = frontier.write_frontier(rows, None, "rme_M2_lambda0.3", str(tmp_path / "frontier"))
    assert all(os.path.getsize(p) > 0 for p in paths)
    with open(paths[0]) as f:
        table = f.read()
    assert all(f"| {label} |" in table for label in labels) and "epoch 1 | epoch 2" in table
    # --only: the named models alone (display names in the plots' legends); a name no table has is an error.
    names = frontier.parse_only(f"{labels[0]}=First model; {labels[1]}")
    assert names == {labels[0]: "First model", labels[1]: labels[1]}
    only = frontier.write_frontier(rows, None, None, str(tmp_path / "frontier_only"), names)
    with open(only[0]) as f:
        table = f.read()
    assert all((f"| {label} |" in table) == (label in names) for label in labels) and len(labels) > 2
    with pytest.raises(ValueError, match="no results file has"):
        frontier.write_frontier(rows, None, None, str(tmp_path / "typo"), {"vae_typo": "x"})
    # benchmarks.compare pairs stored cells per seed, at the end and along the curve (eval_epochs=(1,)).
    [row] = compare.compare(str(tmp_path / "quick_cells"), labels[1], labels[0])
    assert row["seed"] == 0 and set(row["curve"]) == {1}
    assert row["log_likelihood"][0] == pytest.approx(rows[0]["paired_diff_vs"][labels[1]], rel=1e-5)
    assert row["log_likelihood"][1] == pytest.approx(rows[0]["paired_se_vs"][labels[1]], rel=1e-5)
    assert f"{labels[0]} minus {labels[1]}" in compare.main(["--cells_dir", str(tmp_path / "quick_cells"),
                                                                 labels[1], labels[0]])
    with pytest.raises(ValueError, match="No seed with cells of both"):
        compare.compare(str(tmp_path / "quick_cells"), labels[1], "vae_typo")
    # A model's cells may come from another cells directory (CELLS_DIR:LABEL), named for the tables and the plot;
    # --plot draws the differences along training, the last at the finished model's final epoch.
    shutil.copytree(tmp_path / "quick_cells", tmp_path / "other_cells")
    shutil.rmtree(tmp_path / "other_cells" / f"{labels[0]}_seed0" / "curve")
    [other] = compare.compare(str(tmp_path / "quick_cells"), labels[1], f"{tmp_path / 'other_cells'}:{labels[0]}")
    assert other["log_likelihood"] == row["log_likelihood"] and other["curve"] == {} and other["epochs"] == 2
    assert compare.difference_curve(row) == ([1, 2], [row["curve"][1][0], row["log_likelihood"][0]])
    text = compare.main(["--cells_dir", str(tmp_path / "quick_cells"), f"{labels[1]}=ref", f"{labels[0]}=first",
                         f"{tmp_path / 'other_cells'}:{labels[0]}=copy", "--plot", str(tmp_path / "diff.png")])
    assert "first minus ref" in text and "copy minus ref" in text
    assert compare.named("runs/lr=1e-3:rme=RME") == ("RME", "runs/lr=1e-3:rme")
    assert compare.named("runs/lr=1e-3:rme") == ("rme", "runs/lr=1e-3:rme")
    assert os.path.getsize(tmp_path / "diff.png") > 0
    # Rows of another table (no paired difference to the reference) are paired from the cells' per-digit arrays.
    reference = rows[1]["label"]
    stripped = [dict(r, paired_diff_vs={}, paired_se_vs={}) for r in rows]
    repaired = frontier.pair_with_reference(stripped, reference, str(tmp_path / "quick_cells"))
    assert repaired[0]["paired_diff_vs"][reference] == pytest.approx(rows[0]["paired_diff_vs"][reference], rel=1e-5)
    assert repaired[0]["paired_se_vs"][reference] == pytest.approx(rows[0]["paired_se_vs"][reference], rel=1e-5)
    assert reference not in repaired[1]["paired_diff_vs"] and stripped[0]["paired_diff_vs"] == {}
    assert frontier.unique_rows(rows + stripped) == rows  # a row shared by two tables counts once
    other_settings = dict(rows[1], test_log_likelihood=rows[1]["test_log_likelihood"] - 0.5)  # e.g. another cap
    with pytest.raises(ValueError, match=f"Two rows named {reference} .seed 0. with different results"):
        frontier.unique_rows(rows + [other_settings])


def _row(label, seed, log_likelihood, ms100, elbo=-100.0):
    return dict(label=label, seed=seed, test_log_likelihood=log_likelihood, test_elbo=elbo,
                inference_ms_batch100=ms100, inference_ms_batch1=ms100 / 10, epoch_time_s=1.0)


def _trained_by(method, m=1, lambda_kl=None, epochs_per_component=25, **cell):
    """The resolved run configuration of a benchmark cell of 100 epochs (as a finished cell stores it)."""
    config = run_cells.BenchmarkConfig(epochs=100, epochs_per_component=epochs_per_component, jit_compile=False)
    schedule = "stagewise" if method in ("rme", "boosting") else None
    return run_cells.run_config(config, run_cells.Cell(method, m, lambda_kl, 0, schedule, **cell), "cells").resolved()


def test_frontier_keeps_models_no_other_beats_at_equal_or_lower_cost():
    rows = [_row("vae", 0, -95.0, 1.0), _row("vae", 1, -95.2, 1.0), _row("iwae_k4", 0, -94.0, 1.0),
            _row("rme_M4_lambda0.3", 0, -94.5, 2.0), _row("savae", 0, -93.0, 20.0)]
    entries = {e["label"]: e for e in frontier.summarize(rows, None)}
    assert entries["vae"]["log_likelihood"] == pytest.approx(-95.1)
    assert entries["vae"]["gap"] == pytest.approx(4.9)
    assert {label for label, e in entries.items() if e["frontier"]} == {"iwae_k4", "savae"}
    # Side-by-side speed measurements replace the cells' own times, matched by what the model runs at test time,
    # as the run configurations that trained the rows say (not their labels).
    runs = {("vae", 0): _trained_by("vae"), ("vae", 1): _trained_by("vae"), ("iwae_k4", 0): _trained_by("iwae", 4),
            ("rme_M4_lambda0.3", 0): _trained_by("rme", 4, 0.3), ("savae", 0): _trained_by("savae", refine_steps=10)}
    speed_json = {"modes": {"function": {"inference_ms": {
        "vae_encoder": {"1": 0.1, "100": 0.5}, "rme_encoder_M4": {"1": 0.2, "100": 0.4},
        "savae_10": {"1": 3.0, "100": 9.0}}}}}
    entries = {e["label"]: e for e in frontier.summarize(rows, speed_json, runs=runs)}
    assert entries["iwae_k4"]["inference_ms_100"] == 0.5 and entries["savae"]["inference_ms_1"] == 3.0
    assert entries["rme_M4_lambda0.3"]["frontier"]  # now cheaper than iwae at batch 100
    with pytest.raises(ValueError, match="No stored run configuration of vae .seeds .1.."):
        frontier.summarize(rows, speed_json, runs={k: v for k, v in runs.items() if k != ("vae", 1)})
    with pytest.raises(ValueError, match="The seeds of vae were trained as different models"):
        frontier.summarize(rows, speed_json, runs=runs | {("vae", 1): runs["iwae_k4", 0]})
    assert frontier.speed_name(_trained_by("savae", refine_steps=2)) == "savae_2"
    assert frontier.speed_name(_trained_by("vae_equal_params", 4)) == "vae_equal_params_encoder_M4"
    assert frontier.speed_name(_trained_by("mixture", 4, bound="iw")) == "rme_encoder_M4"
    shared_m8 = _trained_by("rme", 8, 0.3, bound="iw", shared_trunk=True)
    assert frontier.speed_name(shared_m8) == "rme_shared_encoder_M8"
    assert frontier.speed_name(_trained_by("piwae", 3, num_samples=5)) == "vae_encoder"  # PIWAE serves its VAE encoder
    # Training steps timed side by side where speed times them; "-" in the table where it does not.
    speed_json["modes"]["function"]["train_step_ms"] = {"vae": 2.0, "iwae_k4": 5.0, "rme_M4": 9.0}
    entries = {e["label"]: e for e in frontier.summarize(rows, speed_json, runs=runs)}  # RME's step timed on the ELBO
    assert entries["iwae_k4"]["train_step_ms"] == 5.0 and entries["rme_M4_lambda0.3"]["train_step_ms"] == 9.0
    assert np.isnan(entries["savae"]["train_step_ms"])
    table = frontier.frontier_table(list(entries.values()), None)
    assert "| 5.0 |" in table and "| - |" in table
    assert frontier.train_step_name(shared_m8, "auto") == "rme_shared_M8"
    assert frontier.train_step_name(_trained_by("vae"), "auto") == "vae"
    assert frontier.train_step_name(_trained_by("iwae", 16), "auto") == "iwae_k16"
    assert frontier.train_step_name(_trained_by("iwae", 16, encoder_gradient="dreg"), "auto") is None
    assert frontier.train_step_name(_trained_by("vae_equal_params", 4), "auto") is None
    # only RME trained on the bound (and component criterion) its step was timed on
    assert frontier.train_step_name(_trained_by("rme", 4, 0.3, bound="iw"), "elbo") is None
    assert frontier.train_step_name(_trained_by("rme", 4, 0.3), "auto") is None
    # other component criteria and samples per slot name their own entries (speed's `sampled_shared`)
    variant = dict(bound="iw", shared_trunk=True, component_bound="iw", num_samples=4)
    assert frontier.train_step_name(_trained_by("rme", 4, 1.0, **variant), "auto") == "rme_shared_M4_ciw_S4"
    assert frontier.train_step_name(_trained_by("rme", 4, 0.3, bound="iw", component_bound="iw"),
                                    "auto") == "rme_M4_ciw"
    assert frontier.train_step_name(_trained_by("mixture", 4)) is None
    # the stage length does not change the step; a stage as long as the run (no join), DReG or per-example
    # proportions do, and the sweep schedule is another step
    assert frontier.train_step_name(_trained_by("rme", 4, 1.0, 34, **variant), "auto") == "rme_shared_M4_ciw_S4"
    assert frontier.train_step_name(_trained_by("rme", 4, 1.0, 100, **variant), "auto") is None
    assert frontier.train_step_name(_trained_by("rme", 4, 1.0, encoder_gradient="dreg", **variant), "auto") is None
    assert frontier.train_step_name(_trained_by("rme", 8, 1.0, bound="iw", shared_trunk=True,
                                                per_example_proportions=True), "auto") is None
    assert frontier.train_step_name(shared_m8.replace(schedule="sweep"), "auto") is None


@pytest.mark.slow
def test_speed_benchmark_tiny_prints_ratios(capsys):
    # Times the default RME's training step, and a shared-trunk encoder beside the others.
    result = speed.main(["--tiny", "--output", "", "--bound", "auto", "--shared_components", "3",
                         "--sampled_shared", "2x2", "--dreg", "--two_pass"])
    out = capsys.readouterr().out
    assert "rme_shared_encoder_M3: b1=" in out
    # ... and its training step beside IWAE's with as many decoder passes (k = 3)
    steps = result["modes"]["function"]["train_step_ms"]
    # ... and shared-trunk RME with two samples per slot and importance-weighted component criteria, and the DReG
    # twins beside their plain twins
    # ... and, with two backward passes through the decoder, those whose encoder trains on a loss of its own
    one_pass = {"vae", "rme_M2", "rme_shared_M3", "iwae_k3", "rme_shared_M2_ciw_S2", "iwae_dreg_k3",
                "rme_shared_M2_ciw_S2_dreg"}
    assert set(steps) == one_pass | {f"{name}_twopass" for name in one_pass - {"vae", "iwae_k3"}}
    assert "ratio train_rme_shared_M2_ciw_S2_dreg_twopass/train_rme_shared_M2_ciw_S2_dreg@8" in out
    assert "ratio train_iwae_dreg_k3/train_iwae_k3@8" in out
    assert "ratio train_rme_shared_M2_ciw_S2_dreg/train_rme_shared_M2_ciw_S2@8" in out
    assert all(np.isfinite(t) and t > 0 for t in steps.values())
    assert result["config"]["bound"] == "auto" and speed.SpeedConfig().bound == "elbo"
    assert "ratio rme_M2/vae_encoder@1" in out and "ratio train_rme_M2/train_vae@8" in out
    assert "PASS" in out or "FAIL" in out
    targets = result["modes"]["function"]["targets"]
    assert len(targets) == 4 and all(np.isfinite(t["value"]) and t["value"] > 0 for t in targets)


def _tiny_savae(**kwargs):
    encoder = tf_rmvae.GaussianEncoder(4, hidden_units=(32,), seed=0)
    return SemiAmortizedVAE(encoder, tf_rmvae.BernoulliDecoder((28, 28, 1), hidden_units=(32,)), **kwargs)


@pytest.mark.slow
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
    log_px = model.log_likelihood(x[:8], iwae_samples=50, chunk_size=25).numpy()
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


@pytest.mark.slow
def test_fixed_decoder_study_trains_encoders_only_and_reports_gaps(tmp_path):
    config = amortization.AmortizationConfig(
        methods=("vae", "rme", "rme_shared"), decoder_epochs=1, encoder_epochs=2, epochs_per_component=1,
        num_components=2, floor_steps=5, hidden_units=(32,), latent_dim=4, train_examples=256, eval_examples=32,
        iwae_samples=20, elbo_samples=10, output_dir=str(tmp_path), verbose=0,
    )
    rows = {r["method"]: r for r in amortization.run(config, log=lambda _: None)}
    assert set(rows) == {"vae", "rme", "rme_shared", "optimised_gaussian"}
    for r in rows.values():
        assert np.isfinite(r["elbo"]) and r["inference_gap"] >= -1e-6  # the reference is the best estimate
    assert rows["optimised_gaussian"]["amortization_gap"] == 0
    assert rows["vae"]["amortization_gap"] > 0  # the floor improves on the amortized encoder it starts from
    assert rows["rme_shared"]["label"] == "rme_M2_lambda0.3_shared"
    # A rerun under the same run name loads what it stored, and refuses results of other settings.
    again = {r["method"]: r for r in amortization.run(config, log=lambda _: None)}
    assert again["rme"]["elbo"] == rows["rme"]["elbo"]
    with pytest.raises(ValueError, match="num_samples|label"):
        amortization.run(dataclasses.replace(config, num_samples=2, component_bound="iw"), log=lambda _: None)
    with pytest.raises(ValueError, match="decoder_epochs: stored 1, now 2"):
        amortization.run(dataclasses.replace(config, decoder_epochs=2), log=lambda _: None)
    # Encoders train against the stored decoder, frozen (`decoder_from`), each in its run directory, where a finished
    # run is loaded, not trained again; the mixture's components join on schedule.
    cells_dir = str(tmp_path / "amortization_cells")
    decoder = amortization.train_decoder(config, cells_dir)  # loaded, not retrained
    assert decoder == os.path.join(cells_dir, "decoder_vae.weights.h5")
    vae = harness.build_model(config.benchmark_config(1), amortization._cell(config, "vae"))
    vae.load_weights(decoder)
    model = amortization.train_encoder(config, "rme", decoder, cells_dir)
    assert all(np.array_equal(a, b) for a, b in zip(vae.decoder.get_weights(), model.decoder.get_weights()))
    assert not model.decoder.trainable  # and Adam's two moments per encoder variable only, besides its counters
    assert len(model.optimizer.variables) == 2 + 2 * len(model.encoder.trainable_variables)
    assert int(model.encoder.num_active_components.numpy()) == 2 and not model.encoder.shared_trunk
    # The optional shared-trunk RME: one trunk, M heads.
    shared = amortization.train_encoder(config, "rme_shared", decoder, cells_dir)
    assert shared.encoder.shared_trunk and int(shared.encoder.num_active_components.numpy()) == 2
    with pytest.raises(ValueError, match="unknown method"):
        amortization._cell(config, "rme_typo")
    # Variant e's options reach the RME rows only.
    sampled = dataclasses.replace(config, num_samples=4, component_bound="iw")
    assert amortization._cell(sampled, "rme_shared").label == "rme_M2_lambda0.3_shared_ciw_S4"
    assert amortization._cell(sampled, "vae").label == "vae"
    assert amortization._cell(sampled, "iwae").label == "iwae_k2"
    variant_e = amortization.train_encoder(sampled, "rme_shared", decoder, str(tmp_path / "variant_e_cells"))
    assert (variant_e.num_samples, variant_e.component_bound) == (4, "iw")
    assert int(variant_e.encoder.num_active_components.numpy()) == 2


@pytest.mark.slow
def test_the_fixed_decoder_study_trains_bit_for_bit_as_its_own_loop_did(tmp_path):
    """The study's models train by `training.fit` (the decoder's VAE, then each encoder with `decoder_from`) exactly
    as by the loop it kept before (version 0.x to 02d39fe, copied here): same seeds, same batches, same weights."""
    config = amortization.AmortizationConfig(
        methods=("vae", "iwae", "savae", "rme_shared"), decoder_epochs=1, encoder_epochs=2, num_components=2,
        savae_steps=2, hidden_units=(8,), latent_dim=2, train_examples=200, output_dir=str(tmp_path), verbose=0)
    cells_dir = str(tmp_path / "cells")

    from tf_rmvae.data import load_dataset

    def old_fit(model, method, epochs):
        bench, cell = config.benchmark_config(epochs), amortization._cell(config, method)
        train = load_dataset(bench.dataset, "train", bench.batch_size, seed=config.seed,
                                           take=config.train_examples, drop_remainder=True)
        callbacks = []
        if run_cells.adds_components(cell):
            callbacks.append(tf_rmvae.ComponentSchedule(
                epochs_per_component=run_cells.epochs_per_component(bench, cell)))
        model.fit(train, epochs=epochs, callbacks=callbacks, verbose=0)

    def old_model(method, epochs):
        keras.utils.set_random_seed(config.seed)
        return harness.build_model(config.benchmark_config(epochs), amortization._cell(config, method))

    decoder_file = amortization.train_decoder(config, cells_dir)
    vae = old_model("vae", config.decoder_epochs)
    old_fit(vae, "vae", config.decoder_epochs)
    fitted = harness.build_model(config.benchmark_config(1), amortization._cell(config, "vae"))
    fitted.load_weights(decoder_file)
    for a, b in zip(vae.weights, fitted.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)
    for method in config.methods:
        new = amortization.train_encoder(config, method, decoder_file, cells_dir)
        old = old_model(method, config.encoder_epochs)
        old.decoder.set_weights(vae.decoder.get_weights())
        old.decoder.trainable = False
        old.compile(optimizer=keras.optimizers.Adam(config.benchmark_config(1).learning_rate))
        old.optimizer.build(old.trainable_variables)
        old_fit(old, method, config.encoder_epochs)
        assert len(old.weights) == len(new.weights)
        for a, b in zip(old.weights, new.weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=f"{method}: {a.path}")


def test_shared_trunk_cells_have_many_heads_for_few_parameters():
    config = run_cells.quick_config(methods=("rme", "mixture", "vae"), num_components=(8,), shared_trunk=True)
    cells = {c.label: c for c in run_cells.cells(config)}
    assert set(cells) == {"rme_M8_lambda0.3_shared", "rme_M8_lambda1_shared", "mixture_M8_shared", "vae"}

    def encoder_parameters(cell):
        model = harness.build_model(config, cell)
        return sum(int(np.prod(v.shape)) for v in model.encoder.trainable_weights)

    shared = encoder_parameters(cells["rme_M8_lambda0.3_shared"])
    separate = encoder_parameters(run_cells.Cell("rme", 8, 0.3, 0, "stagewise"))
    assert encoder_parameters(cells["vae"]) < shared < separate / 3


def test_per_example_proportion_cells_are_labelled_and_build_the_head():
    config = run_cells.quick_config(methods=("rme", "iwae"), num_components=(2,), per_example_proportions=True)
    cells = {c.label: c for c in run_cells.cells(config)}
    assert set(cells) == {"rme_M2_lambda0.3_epsx", "rme_M2_lambda1_epsx", "iwae_k2"}
    model = harness.build_model(config, cells["rme_M2_lambda0.3_epsx"])
    assert model.encoder.per_example_proportions and model.encoder.mixing.offset_head is not None
    assert not harness.build_model(config, cells["iwae_k2"]).encoder.per_example_proportions
    # The option enters a cell's fingerprint only when on: cells run before it existed still match.
    plain = run_cells.quick_config(methods=("rme",), num_components=(2,))
    assert "per_example_proportions" not in json.dumps(cell_store.fingerprint(plain, run_cells.cells(plain)[0]))


def test_importance_weighted_component_cells_are_rme_only_and_labelled():
    config = run_cells.quick_config(methods=("rme", "iwae"), num_components=(2,), lambdas=(0.3,), bounds=("iw",),
                                  component_bounds=("elbo", "iw"))
    cells = {c.label: c for c in run_cells.cells(config)}
    assert set(cells) == {"rme_M2_lambda0.3_iw", "rme_M2_lambda0.3_iw_ciw", "iwae_k2"}
    assert harness.build_model(config, cells["rme_M2_lambda0.3_iw"]).rme.component_bound == "elbo"
    assert harness.build_model(config, cells["rme_M2_lambda0.3_iw_ciw"]).rme.component_bound == "iw"
    assert harness.build_model(config, cells["iwae_k2"]).rme.component_bound == "elbo"
    # Like every later option, it enters a cell's fingerprint only when on.
    plain = run_cells.quick_config(methods=("rme",), num_components=(2,))
    assert "component_bound" not in json.dumps(cell_store.fingerprint(plain, run_cells.cells(plain)[0]))
    assert "component_bound" in json.dumps(cell_store.fingerprint(config, cells["rme_M2_lambda0.3_iw_ciw"]))
    # The baselines of the same run keep their fingerprints: their finished cells are reused, not retrained.
    without = run_cells.quick_config(methods=("rme", "iwae"), num_components=(2,), lambdas=(0.3,), bounds=("iw",))
    iwae = [c for c in run_cells.cells(without) if c.method == "iwae"][0]
    assert cell_store.fingerprint(config, cells["iwae_k2"]) == cell_store.fingerprint(without, iwae)


def test_samples_per_slot_cells_are_mixture_only_and_labelled():
    config = run_cells.quick_config(methods=("rme", "iwae", "vae"), num_components=(2,), lambdas=(1.0,),
                                  bounds=("iw",), num_samples=3)
    cells = {c.label: c for c in run_cells.cells(config)}
    assert set(cells) == {"rme_M2_lambda1_iw_S3", "iwae_k2", "vae"}
    assert harness.build_model(config, cells["rme_M2_lambda1_iw_S3"]).rme.num_samples == 3
    assert harness.build_model(config, cells["iwae_k2"]).rme.num_samples == 2  # IWAE keeps k = M
    # One sample (the old behaviour) leaves a cell's fingerprint as it was; more enter the mixture cells' only.
    plain = run_cells.quick_config(methods=("rme", "iwae", "vae"), num_components=(2,), lambdas=(1.0,),
                                 bounds=("iw",))
    plain_cells = {c.label: c for c in run_cells.cells(plain)}
    assert "num_samples" not in json.dumps(cell_store.fingerprint(plain, plain_cells["rme_M2_lambda1_iw"]))
    assert "num_samples" in json.dumps(cell_store.fingerprint(config, cells["rme_M2_lambda1_iw_S3"]))
    for label in ("iwae_k2", "vae"):
        assert cell_store.fingerprint(config, cells[label]) == cell_store.fingerprint(plain, plain_cells[label])
    with pytest.raises(ValueError, match="num_samples"):
        run_cells.quick_config(num_samples=0)


def test_schedule_in_label_names_the_cells_whose_components_join_and_keeps_their_fingerprint():
    plain = run_cells.quick_config(methods=("rme", "boosting", "iwae", "mixture"), num_components=(2,),
                                   lambdas=(1.0,), epochs=6, epochs_per_component=3)
    named = dataclasses.replace(plain, schedule_in_label=True)
    plain_cells, named_cells = run_cells.cells(plain), run_cells.cells(named)
    assert [c.label for c in named_cells] == ["rme_M2_lambda1_epc3", "boosting_M2_epc3", "iwae_k2", "mixture_M2"]
    # The name is the only difference: a cell stored under the plain label loads (once moved) under the new one.
    for old, new in zip(plain_cells, named_cells):
        assert cell_store.fingerprint(plain, old) == cell_store.fingerprint(named, new)
    # The spread schedule (epochs_per_component = 0) is named by the epochs it gives, 6 // 2 = 3, and is the same
    # cell as the explicit 3 (one label, one fingerprint); another schedule is another cell.
    spread = dataclasses.replace(named, epochs_per_component=0)
    assert run_cells.cells(spread)[0].label == "rme_M2_lambda1_epc3"
    assert cell_store.fingerprint(spread, run_cells.cells(spread)[0]) == cell_store.fingerprint(named, named_cells[0])
    assert cell_store.fingerprint(dataclasses.replace(named, epochs_per_component=2), named_cells[0]) != \
        cell_store.fingerprint(named, named_cells[0])
    assert run_cells.cells(dataclasses.replace(named, epochs_per_component=2))[0].label == "rme_M2_lambda1_epc2"


def test_time_functions_calls_the_models_in_turn_in_every_round():
    calls = []
    functions = {name: (lambda x, n=name: calls.append(n) or tf.constant(x)) for name in ("a", "b", "c")}
    times = evaluation.time_functions(functions, 1.0, repeats=4, warmup=1)
    assert set(times) == {"a", "b", "c"} and all(t >= 0 for t in times.values())
    # Warm-up, then one call of each per round, each round starting one function later.
    assert calls == ["a", "b", "c"] + ["a", "b", "c"] + ["b", "c", "a"] + ["c", "a", "b"] + ["a", "b", "c"]
    assert evaluation.time_functions({}, 1.0) == {}


def test_a_negative_harness_cap_builds_an_uncapped_criterion():
    cell = run_cells.Cell("rme", 2, 1.0, 0, "stagewise")
    capped = harness.build_model(run_cells.quick_config(methods=("rme",), num_components=(2,)), cell)
    uncapped = harness.build_model(
        run_cells.quick_config(methods=("rme",), num_components=(2,), rme_max_log_ratio=-1.0), cell)
    assert capped.max_log_ratio == 5.0 and uncapped.max_log_ratio is None


def test_a_finished_cell_matches_runs_that_differ_only_in_settings_it_does_not_read(tmp_path):
    run = run_cells.quick_config(methods=("rme", "iwae"), num_components=(2,), lambdas=(1.0,), epochs=4)
    other = dataclasses.replace(run, epochs_per_component=3, shared_trunk=True)
    cells = {c.label: c for c in run_cells.cells(run)}
    other_cells = {c.label: c for c in run_cells.cells(other)}
    # IWAE reads neither the component schedule nor the trunk; RME reads both.
    assert cell_store.fingerprint(run, cells["iwae_k2"]) == cell_store.fingerprint(other, other_cells["iwae_k2"])
    rme = cells["rme_M2_lambda1"]
    # The schedule counts exactly where components join one at a time: stagewise RME and boosting with M > 1.
    reschedule = dataclasses.replace(run, epochs_per_component=3)
    for cell, reads_schedule in [
        (rme, True), (run_cells.Cell("boosting", 2, None, 0, "stagewise"), True),
        (run_cells.Cell("rme", 2, 1.0, 0, "sweep"), False), (run_cells.Cell("rme", 1, 1.0, 0, "stagewise"), False),
        (run_cells.Cell("mixture", 2, None, 0, None), False),
    ]:
        assert run_cells.adds_components(cell) == reads_schedule
        assert (cell_store.fingerprint(run, cell) != cell_store.fingerprint(reschedule, cell)) == reads_schedule, cell
    # A cell stored before the rule, with the unread settings in its fingerprint, still loads.
    stored = dict(cell_store.fingerprint(run, cells["iwae_k2"]), epochs_per_component=7, shared_trunk=True)
    cell_dir = tmp_path / "iwae_k2_seed0"
    cell_dir.mkdir()
    (cell_dir / "result.json").write_text(json.dumps(dict(fingerprint=stored, row={"label": "iwae_k2"})))
    np.savez(cell_dir / "per_example.npz", elbo=np.zeros(3), log_likelihood=np.ones(3))
    row, arrays = cell_store.load_finished(other, other_cells["iwae_k2"], str(cell_dir))
    assert row == {"label": "iwae_k2"} and arrays["log_likelihood"].tolist() == [1.0, 1.0, 1.0]
    # A cell stored under another label (moved and renamed) loads under the name the run gives it.
    (cell_dir / "result.json").write_text(json.dumps(dict(fingerprint=stored, row={"label": "old_name"})))
    assert cell_store.load_finished(other, other_cells["iwae_k2"], str(cell_dir))[0] == {"label": "iwae_k2"}
    stored_rme = dict(cell_store.fingerprint(run, rme), epochs_per_component=7)
    (cell_dir / "result.json").write_text(json.dumps(dict(fingerprint=stored_rme, row={})))
    assert cell_store.load_finished(run, rme, str(cell_dir)) is None  # RME's schedule differs: retrained


def test_the_difference_plot_draws_finished_seeds_only():
    finished = dict(seed=0, log_likelihood=(0.1, 0.01), elbo=(1.0, 0.2), curve={10: (0.2, 0.01)}, epochs=100)
    training = dict(seed=1, log_likelihood=None, elbo=None, curve={10: (0.3, 0.01)}, epochs=None)
    assert compare.finished_curves([finished, training]) == [([10, 100], [0.2, 0.1])]
    assert compare.finished_curves([training]) == []


def test_estimator_and_no_join_cells_are_labelled_and_build_their_models():
    config = run_cells.quick_config(methods=("iwae", "piwae", "rme", "mixture"), num_components=(3,), lambdas=(1.0,),
                                    bounds=("iw",), component_bounds=("elbo", "iw"), num_samples=5,
                                    encoder_gradients=("reparam", "dreg", "gdreg"), epochs=4, epochs_per_component=4)
    cells = {c.label: c for c in run_cells.cells(config)}
    # DReG applies to rme only on importance-weighted criteria, to mixture on the "iw" bound, the generalized DReG to
    # the mixture only; a stage as long as the run never joins.
    assert set(cells) == {"iwae_k3", "iwae_dreg_k3", "piwae_M3_K5", "piwae_dreg_M3_K5", "rme_M3_lambda1_iw_S5_nojoin",
                          "rme_M3_lambda1_iw_ciw_S5_nojoin", "rme_M3_lambda1_iw_ciw_S5_nojoin_dreg",
                          "mixture_M3_iw_S5", "mixture_M3_iw_S5_dreg", "mixture_M3_iw_S5_gdreg"}
    generalized = harness.build_model(config, cells["mixture_M3_iw_S5_gdreg"]).rme
    assert (generalized.encoder_gradient, generalized.criterion.reads_transports) == ("gdreg", True)
    with pytest.raises(ValueError, match="gdreg applies to mixture only"):  # not silently no cell
        run_cells.cells(dataclasses.replace(config, encoder_gradients=("gdreg",)))
    piwae = harness.build_model(config, cells["piwae_dreg_M3_K5"]).rme
    assert (piwae.num_samples, piwae.encoder_groups, piwae.encoder_gradient) == (15, 3, "dreg")
    assert harness.build_model(config, cells["iwae_dreg_k3"]).rme.encoder_gradient == "dreg"
    assert harness.build_model(config, cells["rme_M3_lambda1_iw_ciw_S5_nojoin_dreg"]).rme.criterion.dreg
    mixture = harness.build_model(config, cells["mixture_M3_iw_S5_dreg"]).rme
    assert (mixture.bound, mixture.encoder_gradient, mixture.criterion.reads_mixture) == ("iw", "dreg", True)
    # The new fields enter a fingerprint only when they differ from the old behaviour: stored cells still load.
    joining = dataclasses.replace(config, epochs_per_component=1, encoder_gradients=("reparam",))
    plain = {c.label: c for c in run_cells.cells(joining)}
    for label in ("iwae_k3", "rme_M3_lambda1_iw_ciw_S5", "mixture_M3_iw_S5"):
        stored = json.dumps(cell_store.fingerprint(joining, plain[label]))
        assert "encoder_gradient" not in stored and '"joins"' not in stored
    assert "joins" in json.dumps(cell_store.fingerprint(config, cells["rme_M3_lambda1_iw_ciw_S5_nojoin"]))


def _tiny_run(tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path), methods=("rme",), lambdas=(0.3,), num_components=(2,), bounds=("iw",),
                  component_bounds=("iw",), num_samples=2, encoder_gradients=("dreg",), shared_trunk=True,
                  train_examples=128, eval_examples=16, iwae_samples=4, iwae_chunk=4, eval_batch_size=16,
                  hidden_units=(8,), latent_dim=2)
    return run_cells.quick_config(**{**values, **overrides})


def _weights(config, cell, path):
    model = harness.build_model(config, cell)
    model.load_weights(path)
    return model.get_weights()


def test_the_trainer_trains_a_cells_run_configuration_to_the_benchmarks_weights(tmp_path):
    config = _tiny_run(tmp_path, seeds=(1,))
    [cell] = run_cells.cells(config)
    harness.run_benchmark(config, log=lambda line: None)
    # The cell's final weights are its run directory's last state (no copy beside the row).
    assert not os.path.exists(tmp_path / "quick_cells" / cell.key / "final.weights.h5")
    benchmark = _weights(config, cell, tmp_path / "quick_cells" / cell.key / "backup" / "latest.weights.h5")
    # The same RunConfig, trained (and evaluated) by the trainer's own entry point, in another directory.
    run = run_cells.run_config(config, cell, str(tmp_path / "trainer_run"))
    assert (run.seed, run.resolved_noise_seed, run.validation_examples, run.data_order) == (1, 0, 0, "reshuffled")
    with open(tmp_path / "quick_cells" / cell.key / "result.json") as f:
        stored = json.load(f)
    assert stored["run_identity"] == run.identity() and stored["row"]["label"] == cell.label
    assert tf_rmvae.config.RunConfig.from_dict(stored["run_config"]).identity() == run.identity()
    from tf_rmvae.run.training import train

    metrics = train(run)
    assert metrics["completed"] and metrics["epochs_completed"] == config.epochs
    trainer = _weights(config, cell, tmp_path / "trainer_run" / "backup" / "latest.weights.h5")
    assert len(trainer) == len(benchmark) > 0
    assert all(np.array_equal(a, b) for a, b in zip(trainer, benchmark))
    # The seed's noise matters: the trainer's default (noise seed = seed) trains other weights.
    other = train(run.replace(model_dir=str(tmp_path / "seeded_noise"), noise_seed=-1))
    assert other["epochs_completed"] == config.epochs
    seeded = _weights(config, cell, tmp_path / "seeded_noise" / "backup" / "latest.weights.h5")
    assert not all(np.array_equal(a, b) for a, b in zip(seeded, benchmark))


class _Interrupt(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        if epoch == 1:
            raise KeyboardInterrupt


@pytest.mark.slow
def test_an_interrupted_cell_resumes_from_its_run_directorys_checked_state(tmp_path):
    config = _tiny_run(tmp_path, methods=("vae",), seeds=(0,))
    [cell] = run_cells.cells(config)
    cell_dir = str(tmp_path / "quick_cells" / cell.key)
    from tf_rmvae.run import directory as run_dir
    from tf_rmvae.run import training

    with pytest.raises(KeyboardInterrupt):  # killed after epoch 1's state was saved
        training.fit(run_cells.run_config(config, cell, cell_dir), callbacks=[_Interrupt()])
    assert run_dir.saved_epoch(cell_dir) == 1 and not os.path.exists(os.path.join(cell_dir, "result.json"))
    [row] = harness.run_benchmark(config, log=lambda line: None)
    assert row["epochs"] == 2 and run_dir.saved_epoch(cell_dir) == 2
    assert len(run_dir.read_history(os.path.join(cell_dir, "history.csv"))) == 2  # epoch 1 kept, epoch 2 trained
    # A cell whose training settings changed while it was unfinished is refused, not resumed with the wrong state.
    os.remove(os.path.join(cell_dir, "result.json"))
    with pytest.raises(tf_rmvae.config.ConfigError, match="different settings"):
        harness.run_benchmark(dataclasses.replace(config, learning_rate=0.01), log=lambda line: None)
    # Without resume, the cell starts over.
    [again] = harness.run_benchmark(dataclasses.replace(config, learning_rate=0.01, resume=False),
                                    log=lambda line: None)
    assert again["epochs"] == 2 and len(run_dir.read_history(os.path.join(cell_dir, "history.csv"))) == 2


def test_every_method_is_a_run_configuration_the_factory_builds():
    config = run_cells.quick_config(lambdas=(0.3,), bounds=("elbo", "iw"), encoder_gradients=("reparam", "dreg"),
                                    component_bounds=("elbo", "iw"), num_samples=2)
    cells = run_cells.cells(config)
    assert {c.method for c in cells} == set(run_cells.ALL_METHODS)
    for cell in cells:
        run = run_cells.run_config(config, cell, "unused")
        assert run.noise_seed == 0 and run.seed == cell.seed and run.export_dir == ""
        model = harness.build_model(config, cell)
        if cell.method == "savae":
            assert isinstance(model, SemiAmortizedVAE) and model.refine_steps == cell.refine_steps
            continue
        assert model.rme.noise_seed == 0
    equal = run_cells.run_config(config, run_cells.Cell("vae_equal_params", 2, None, 0, None), "unused")
    assert (equal.method, equal.num_components, equal.encoder_parameters_of) == ("vae", 1, 2)
    piwae = run_cells.run_config(config, run_cells.Cell("piwae", 2, None, 0, None, num_samples=2), "unused")
    assert (piwae.bound, piwae.num_samples, piwae.encoder_groups) == ("iw", 4, 2)


@pytest.mark.slow
def test_a_cell_interrupted_under_backup_and_restore_is_adopted_and_resumed(tmp_path):
    config = _tiny_run(tmp_path, methods=("vae",), seeds=(0,))
    [cell] = run_cells.cells(config)
    cell_dir = tmp_path / "quick_cells" / cell.key
    from tf_rmvae import data as rm_data
    from tf_rmvae.run import directory as run_dir

    # What the harness left before cells were run configurations: Keras's backup of epoch 1, no config.json.
    model = harness.build_model(config, cell)
    train = rm_data.load_dataset(config.dataset, "train", config.batch_size, seed=cell.seed,
                                 take=config.train_examples, drop_remainder=True)
    backup = keras.callbacks.BackupAndRestore(str(cell_dir / "backup"), delete_checkpoint=False)
    with pytest.raises(KeyboardInterrupt):
        model.fit(train, epochs=2, callbacks=[backup, _Interrupt()], verbose=0)
    assert run_dir.saved_epoch(str(cell_dir)) == 1 and not (cell_dir / "config.json").exists()
    [row] = harness.run_benchmark(config, log=lambda line: None)
    assert row["epochs"] == 2 and run_dir.saved_epoch(str(cell_dir)) == 2
    assert len(run_dir.read_history(str(cell_dir / "history.csv"))) == 1  # only epoch 2 trained here


def test_paired_ratio_takes_each_rounds_ratio_so_a_slowdown_between_rounds_cancels():
    # Round 2 ran on a loaded machine for `a`, round 3 for `b`: the ratio of medians (10 / 0.5) says 20, each round 2.
    a, b = [1.0, 10.0, 10.0], [0.5, 0.5, 5.0]
    assert evaluation.paired_ratio(a, b) == pytest.approx(np.median([2.0, 20.0, 2.0]))
    assert np.median(a) / np.median(b) == pytest.approx(20.0)
    rounds = evaluation.time_rounds({"x": lambda v: v, "y": lambda v: v}, 1.0, repeats=5, warmup=1)
    assert {name: len(times) for name, times in rounds.items()} == {"x": 5, "y": 5}
    assert evaluation.time_rounds({}, 1.0) == {}
