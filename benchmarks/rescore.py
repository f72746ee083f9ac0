"""Scores the final models of finished benchmark cells at the standard protocol: K importance samples (5000) on every
test digit (10000), in chunks, under the one fixed binarization every cell is evaluated on; the per-digit arrays go
to `<cell>/scored/K<K>_N<N>.npz` (and a summary `.json`), where `benchmarks.compare --scoring` pairs them.

    python -m benchmarks.rescore --cells_dir benchmarks/results/budget100_cells \
        rme_M3_lambda1_iw_shared_ciw_S5_dreg iwae_dreg_k16 --seeds 0,1

A cell is rebuilt from the run configuration its `result.json` stores, by the library's factory from its run
directory with the last epoch's state (`backup/latest.weights.h5`); a cell stored before it stored its run
configuration, from its fingerprint with the `final.weights.h5` the harness kept then (`rebuild`). Neither is
committed: scoring happens on the machine that trained the cell. The test
digits' first `eval_examples` are the ones the cell was scored on while training: the summary repeats that score
on them, at the new K, as a check.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Sequence

import numpy as np

from benchmarks import cell_files
from tf_rmvae.files import write_json_atomic


def scoring_name(iwae_samples: int, examples: int) -> str:
    """`K<K>_N<N>`: how a cell's final model was scored (`cell_files.scored_path`)."""
    return f"K{iwae_samples}_N{examples}"


def rebuild(directory: str):
    """The model of the finished cell in `directory` with its final weights, and the run configuration that trained
    it (`cell_settings.trained_run_config`), built by the library's factory.

    A cell that stores its run configuration was trained by the run code: its model comes from its run directory
    (`factory.load_trained_model`) with the last epoch's state (`backup/`), once the directory's config is checked
    to be the cell's. An older cell is built from the run configuration its fingerprint gives and loads the
    `final.weights.h5` the harness kept then.
    """
    from benchmarks import cell_settings
    from tf_rmvae import data as rm_data  # TensorFlow: only when a model is scored
    from tf_rmvae.run import directory as run_dir
    from tf_rmvae.run import factory

    stored = cell_settings.stored_result(directory)
    run = cell_settings.trained_run_config(directory, jit_compile="auto", stored=stored)
    if "run_config" in stored:
        saved = run_dir.saved_config(directory)
        if saved is None or saved.mismatches(run):
            raise ValueError(f"{directory} holds no run directory of the run that trained its result (config.json "
                             f"{'missing' if saved is None else 'of another run'}): it cannot be scored again.")
        state = os.path.join(directory, run_dir.BACKUP_DIR, run_dir.STATE_FILE)
        epoch = run_dir.saved_epoch(directory)
        if epoch != run.epochs:
            raise FileNotFoundError(f"{state} holds epoch {epoch}, not the final epoch {run.epochs} (missing or "
                                    "damaged): score the cell on the machine that trained it.")
        return factory.load_trained_model(directory, checkpoint=state), run
    weights = cell_files.final_weights_path(directory)
    if not os.path.exists(weights):
        raise FileNotFoundError(f"{weights} is missing: only cells trained since final weights are kept can be "
                                "scored again (on the machine that trained them).")
    spec = rm_data.get_dataset_spec(run.dataset)
    model = factory.build_compiled_model(run, spec.image_shape, spec.binary)
    model.load_weights(weights)
    return model, run


def score_cell(directory: str, iwae_samples: int, examples: int, chunk: int, batch_size: int, x_test) -> dict:
    """Scores one cell (see the module docstring); returns its summary (also written beside the arrays)."""
    from tf_rmvae.run import evaluation

    model, run = rebuild(directory)
    test = evaluation.evaluate(model, x_test, iwae_samples, chunk_size=chunk, batch_size=batch_size, seed=0)
    name = scoring_name(iwae_samples, len(x_test))
    path = cell_files.scored_path(directory, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path + ".npz", elbo=test["elbo"], log_likelihood=test["log_likelihood"])
    first = min(run.eval_examples or len(x_test), len(x_test))
    with np.load(os.path.join(directory, cell_files.PER_EXAMPLE_FILE)) as trained:
        at_training = float(np.mean(trained["log_likelihood"][:first]))
    summary = dict(
        iwae_samples=iwae_samples, eval_examples=len(x_test), test_elbo=test["elbo_mean"], test_elbo_se=test["elbo_se"],
        test_log_likelihood=test["log_likelihood_mean"], test_log_likelihood_se=test["log_likelihood_se"],
        eval_time_s=test["eval_time_s"],
        # The digits the cell was scored on while training, at its K and at this one (K = 5000 is tighter).
        first_digits=first, first_digits_log_likelihood=float(np.mean(test["log_likelihood"][:first])),
        first_digits_log_likelihood_at_training=at_training, training_iwae_samples=run.iwae_samples,
    )
    write_json_atomic(path + ".json", summary)
    return summary


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("labels", nargs="+", help="cell labels to score")
    parser.add_argument("--cells_dir", required=True, help="the harness's cells directory")
    parser.add_argument("--seeds", default="0", help="comma list of training seeds")
    parser.add_argument("--iwae_samples", type=int, default=5000, help="importance samples K")
    parser.add_argument("--eval_examples", type=int, default=0, help="test digits (0: the whole test split)")
    parser.add_argument("--chunk", type=int, default=100, help="importance samples drawn at once")
    parser.add_argument("--batch_size", type=int, default=100, help="test digits per batch")
    parser.add_argument("--dataset", default="rmvae_mnist")
    parser.add_argument("--overwrite", action="store_true", help="score again a cell already scored so")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is imported
    from tf_rmvae import data as rm_data

    # The harness's binarization (seed 0) of the test split: its first digits are the ones every cell was scored on.
    x_test = rm_data.load_numpy(args.dataset, "test", take=args.eval_examples or None, seed=0)
    summaries = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for label in args.labels:
            directory = cell_files.cell_dir(args.cells_dir, label, seed)
            path = cell_files.scored_path(directory, scoring_name(args.iwae_samples, len(x_test))) + ".json"
            if os.path.exists(path) and not args.overwrite:
                with open(path) as f:
                    summary = json.load(f)
            else:
                start = time.perf_counter()
                summary = score_cell(directory, args.iwae_samples, len(x_test), args.chunk, args.batch_size, x_test)
                print(f"[{label} seed {seed}] scored in {time.perf_counter() - start:.0f} s", flush=True)
            summaries.append(dict(label=label, seed=seed, **summary))
            print(f"{label} seed {seed}: log p(x) {summary['test_log_likelihood']:.2f} +- "
                  f"{summary['test_log_likelihood_se']:.2f} (K={summary['iwae_samples']}, N={summary['eval_examples']})"
                  f"; first {summary['first_digits']} digits {summary['first_digits_log_likelihood']:.2f} "
                  f"(K={summary['training_iwae_samples']} at training: "
                  f"{summary['first_digits_log_likelihood_at_training']:.2f})", flush=True)
    return summaries


if __name__ == "__main__":
    main()
