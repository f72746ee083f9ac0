"""Scoring finished benchmark cells again (`benchmarks.rescore`) and pairing the scores (`benchmarks.compare`)."""

import json
import os
import shutil
import sys

import numpy as np
import pytest

# benchmarks/ is not installed
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import cell_files, compare, harness, rescore  # noqa: E402
from benchmarks import cells as run_cells  # noqa: E402


@pytest.mark.slow
def test_rescore_rebuilds_the_final_models_and_compare_pairs_their_scores(tmp_path):
    config = run_cells.quick_config(output_dir=str(tmp_path), methods=("rme", "iwae"), lambdas=(1.0,),
                                    bounds=("iw",), component_bounds=("iw",), shared_trunk=True, num_samples=2,
                                    encoder_gradients=("dreg",))
    rows = harness.run_benchmark(config)
    cells_dir = str(tmp_path / "quick_cells")
    labels = [row["label"] for row in rows]
    assert labels == ["rme_M2_lambda1_iw_shared_ciw_S2_dreg", "iwae_dreg_k2"]
    for label in labels:  # the final weights are the run directory's last state, not a copy beside the row
        directory = cell_files.cell_dir(cells_dir, label, 0)
        assert os.path.exists(os.path.join(directory, "backup", "latest.weights.h5"))
        assert not os.path.exists(cell_files.final_weights_path(directory))

    # Scored as training scored them (same K, digits, chunks and noise seed): the rebuilt models give the same
    # per-digit numbers, so the weights and the settings were both restored.
    same = ["--cells_dir", cells_dir, *labels, "--iwae_samples", str(config.iwae_samples), "--eval_examples",
            str(config.eval_examples), "--chunk", str(config.iwae_chunk), "--batch_size", str(config.eval_batch_size)]
    summaries = rescore.main(same)
    scoring = rescore.scoring_name(config.iwae_samples, config.eval_examples)
    for summary in summaries:
        trained = cell_files.per_example(cells_dir, summary["label"], 0)
        scored = cell_files.per_example(cells_dir, summary["label"], 0, scoring=scoring)
        np.testing.assert_allclose(scored["elbo"], trained["elbo"], atol=1e-3)
        np.testing.assert_allclose(scored["log_likelihood"], trained["log_likelihood"], atol=1e-3)
        assert summary["first_digits_log_likelihood"] == pytest.approx(
            summary["first_digits_log_likelihood_at_training"], abs=1e-3)
    # A larger K on more digits: a tighter bound on the digits training scored (on average), and a paired table.
    more = ["--cells_dir", cells_dir, *labels, "--iwae_samples", "200", "--eval_examples", "128"]
    scored_more = {summary["label"]: summary for summary in rescore.main(more)}
    for summary in scored_more.values():
        assert summary["eval_examples"] == 128 and summary["first_digits"] == config.eval_examples
        assert summary["first_digits_log_likelihood"] > summary["first_digits_log_likelihood_at_training"]
    with open(cell_files.scored_path(cell_files.cell_dir(cells_dir, labels[0], 0), "K200_N128") + ".json") as f:
        assert json.load(f)["iwae_samples"] == 200
    (row,) = compare.compare(cells_dir, labels[1], labels[0], scoring="K200_N128")
    a = cell_files.per_example(cells_dir, labels[0], 0, scoring="K200_N128")["log_likelihood"]
    b = cell_files.per_example(cells_dir, labels[1], 0, scoring="K200_N128")["log_likelihood"]
    assert row["log_likelihood"][0] == pytest.approx(np.mean(a - b)) and row["curve"] == {}
    # A cell stored before cells stored their run configuration: rebuilt from its fingerprint, with the final weights
    # the harness kept beside the row then; the same scores.
    old = cell_files.cell_dir(cells_dir, labels[0], 0)
    model, run = rescore.rebuild(old)
    model.save_weights(cell_files.final_weights_path(old))
    with open(os.path.join(old, "result.json")) as f:
        stored = json.load(f)
    with open(os.path.join(old, "result.json"), "w") as f:
        json.dump(dict(fingerprint=stored["fingerprint"], row=stored["row"]), f)
    shutil.rmtree(os.path.join(old, "backup"))
    os.remove(os.path.join(old, "config.json"))
    rebuilt, run_again = rescore.rebuild(old)
    assert run_again.identity() == run.identity() == stored["run_identity"]
    assert all(np.array_equal(a, b) for a, b in zip(rebuilt.get_weights(), model.get_weights()))
    again = rescore.main(["--overwrite", *more[:2], labels[0], *more[4:]])
    assert again[0]["test_log_likelihood"] == pytest.approx(scored_more[labels[0]]["test_log_likelihood"], abs=1e-3)
    # A cell without its final weights is refused with the reason: old (final.weights.h5), and new (the last state
    # of its run directory).
    os.remove(cell_files.final_weights_path(old))
    with pytest.raises(FileNotFoundError, match="final.weights.h5"):
        rescore.main(["--cells_dir", cells_dir, labels[0], "--iwae_samples", "10", "--overwrite"])
    os.remove(os.path.join(cell_files.cell_dir(cells_dir, labels[1], 0), "backup", "latest.weights.h5"))
    with pytest.raises(FileNotFoundError, match="not the final epoch"):
        rescore.main(["--cells_dir", cells_dir, labels[1], "--iwae_samples", "10", "--overwrite"])
