"""Side-by-side benchmark of RME against the inference methods a user would pick instead (issues 8 and 11).

Every method gets the same data, encoder/decoder architecture, latent size, optimizer, epochs and seeds. Each cell
of the run (`benchmarks.cells`) trains, is evaluated on the same test digits (fixed binarization, so per-example
differences pair), and is stored in its own directory `<output_dir>/<run_name>_cells/<cell key>/`
(`benchmarks.cell_store`). A cell is a run configuration (`cells.run_config`) trained by the library's run code
(`tf_rmvae.run.training.fit`: the model factory, the callbacks, the run directory's checked resume state under
`backup/` and `checkpoints/`); the benchmark adds its evaluation: the curve at `eval_epochs`, the final per-digit
arrays and the row.

A rerun with `resume=True` skips finished cells and continues unfinished ones from their last saved epoch (an
unfinished cell whose training settings changed is refused by its run directory; a finished cell whose settings
changed trains again from scratch). When every
cell is done the run's rows, with paired statistics between all cells of the same seed, go to
`<output_dir>/<run_name>.json`.

    config = BenchmarkConfig(methods=("vae", "rme"), epochs=10, iwae_samples=1000, eval_examples=2000)
    rows = run_benchmark(config)
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import time
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from benchmarks import cell_files, cell_store
from benchmarks.cells import (
    BOUND_METHODS,
    SINGLE_COMPONENT_METHODS,
    BenchmarkConfig,
    Cell,
    adds_components,
    cells,
    epochs_per_component,
    run_config,
)
from tf_rmvae import data as rm_data
from tf_rmvae.run import directory as run_dir
from tf_rmvae.run import evaluation, training
from tf_rmvae.run import factory as model_factory


def device_description() -> str:
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"{len(gpus)} x GPU {details.get('device_name', gpus[0].name)}"
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores visible)"


# ---------------------------------------------------------------------- models
def build_model(config: BenchmarkConfig, cell: Cell) -> keras.Model:
    """The cell's model as its run configuration describes it (`cells.run_config`), compiled and built, with its
    optimizer built (untrained: `run_cell` trains it)."""
    spec = rm_data.get_dataset_spec(config.dataset)
    run = run_config(config, cell, model_dir="(in memory)").resolved()
    return model_factory.build_compiled_model(run, spec.image_shape, spec.binary)


def _finite(value):
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------- one cell
def run_cell(
    config: BenchmarkConfig, cell: Cell, x_test: np.ndarray, x_train_eval: np.ndarray, cell_dir: str
) -> tuple[dict, dict]:
    """Trains and evaluates one cell; returns its row and its per-example arrays (also saved in `cell_dir`)."""
    os.makedirs(cell_dir, exist_ok=True)
    run = run_config(config, cell, cell_dir)
    if not config.resume:
        clear_run(cell_dir)
    elif run_dir.has_state(cell_dir) and not os.path.exists(os.path.join(cell_dir, run_dir.CONFIG_FILE)):
        # A cell interrupted before cells were run configurations: Keras's BackupAndRestore left its state in the
        # run directory's layout (backup/latest.weights.h5 and training_metadata.json) for the model this config
        # builds; naming the config adopts it (the state is still checked when it loads).
        run.resolved().save(os.path.join(cell_dir, run_dir.CONFIG_FILE))

    def evaluate_test(model):
        return evaluation.evaluate(
            model, x_test, config.iwae_samples, chunk_size=config.iwae_chunk, batch_size=config.eval_batch_size,
            seed=cell.seed,
        )

    # Run before the resume state of the same epoch is saved, so a resumed run never lacks a point it passed.
    fitted = training.fit(run, callbacks=[cell_store.CurveEvaluation(config.eval_epochs, evaluate_test, cell_dir)])
    model, history, train_time = fitted.model, fitted.history, fitted.train_time_s
    epochs_run = max(1, len(history.epoch))
    # The final weights stay in the run directory (untracked: `backup/`, the last epoch's state), to be scored at the
    # standard protocol (`benchmarks.rescore`).

    test = evaluate_test(model)
    train_elbo = evaluation.per_example_elbo(model, x_train_eval, batch_size=max(config.eval_batch_size, 100))
    # Final mixture weights (per-example proportions: their mean), each component's mean entropy (nats).
    weights, entropies = evaluation.model_mixture_summary(model, x_test[:500])
    inference_s = evaluation.inference_time(model, x_test[:100], repeats=10)
    inference_1_s = evaluation.inference_time(model, x_test[:1], repeats=20)
    row = dict(
        dataset=config.dataset,
        method=cell.method,
        label=cell.label,
        schedule=cell.schedule,
        num_components=1 if cell.method in SINGLE_COMPONENT_METHODS else cell.num_components,
        matched_components=cell.num_components if cell.method in ("vae_equal_params", "iwae", "piwae") else None,
        lambda_kl=cell.lambda_kl,
        epochs=config.epochs,
        epochs_per_component=epochs_per_component(config, cell) if adds_components(cell) else None,
        seed=cell.seed,
        iwae_samples=config.iwae_samples,
        eval_examples=int(len(x_test)),
        test_elbo=test["elbo_mean"],
        test_elbo_se=test["elbo_se"],
        test_log_likelihood=test["log_likelihood_mean"],
        test_log_likelihood_se=test["log_likelihood_se"],
        test_inference_gap=test["log_likelihood_mean"] - test["elbo_mean"],
        curve=cell_store.load_curve(cell_dir) + [cell_store.curve_point(config.epochs, test)],
        train_elbo=float(np.mean(train_elbo)),
        train_test_elbo_gap=float(np.mean(train_elbo) - test["elbo_mean"]),
        mixture_weights=weights,
        component_entropies=entropies,
        final_train_metrics={k: _finite(float(v[-1])) for k, v in history.history.items()} if history.epoch else {},
        train_time_s=train_time,
        epoch_time_s=train_time / epochs_run,
        eval_time_s=test["eval_time_s"],
        inference_ms_batch100=1000.0 * inference_s,
        inference_ms_batch1=1000.0 * inference_1_s,
        wall_time_s=train_time + test["eval_time_s"],
        device=device_description(),
        savae_steps=cell.refine_steps if cell.method == "savae" else None,
        bound="iw" if cell.method in ("iwae", "piwae") else (cell.bound if cell.method in BOUND_METHODS else "elbo"),
        encoder_gradient=cell.encoder_gradient,
        encoder_parameters=sum(int(np.prod(v.shape)) for v in model.encoder.trainable_weights),
    )
    arrays = dict(elbo=test["elbo"], log_likelihood=test["log_likelihood"])
    cell_store.save_finished(config, cell, cell_dir, row, arrays, run)
    return row, arrays


def clear_run(cell_dir: str) -> None:
    """Removes the training run in `cell_dir` (its configuration, resume state, history, logs and curve, and the
    final weights an older harness kept and the scores of the model trained before), so the cell trains from
    scratch: a cell retrained under other settings, or a run that asks not to resume."""
    for name in (run_dir.CONFIG_FILE, run_dir.HISTORY_FILE, run_dir.METRICS_FILE, cell_files.FINAL_WEIGHTS_FILE):
        path = os.path.join(cell_dir, name)
        if os.path.exists(path):
            os.remove(path)
    for name in (run_dir.BACKUP_DIR, run_dir.CHECKPOINT_DIR, run_dir.LOG_DIR, cell_files.CURVE_DIR,
                 cell_files.SCORED_DIR):
        shutil.rmtree(os.path.join(cell_dir, name), ignore_errors=True)


# ---------------------------------------------------------------------- the run
def add_paired_statistics(rows: list[dict], per_example: list[dict]) -> None:
    """Adds `paired_diff_vs`/`paired_se_vs` (log-likelihood) and `paired_elbo_diff_vs`/`paired_elbo_se_vs` to each
    row, against every other row of the same seed (same test digits), keyed by the other row's label."""
    for seed in sorted({row["seed"] for row in rows}):
        members = [i for i, row in enumerate(rows) if row["seed"] == seed]
        for metric, prefix in (("log_likelihood", "paired"), ("elbo", "paired_elbo")):
            stats = evaluation.paired_comparisons({rows[i]["label"]: per_example[i][metric] for i in members})
            for i in members:
                others = stats[rows[i]["label"]]
                rows[i][f"{prefix}_diff_vs"] = {label: diff for label, (diff, _) in others.items()}
                rows[i][f"{prefix}_se_vs"] = {label: se for label, (_, se) in others.items()}


def load_eval_data(config: BenchmarkConfig) -> tuple[np.ndarray, np.ndarray]:
    """The test digits (fixed binarization, identical for every method and seed) and as many training digits."""
    x_test = rm_data.load_numpy(config.dataset, "test", take=config.eval_examples or None, seed=0,
                                data_dir=config.data_dir)
    x_train = rm_data.load_numpy(config.dataset, "train", take=min(len(x_test), 10000), seed=0,
                                 data_dir=config.data_dir)
    return x_test, x_train


def run_benchmark(
    config: BenchmarkConfig, log: Callable[[str], None] = print, finished_only: bool = False
) -> list[dict]:
    """Trains and evaluates every cell (skipping finished ones when `resume`), writes `<table_name>.json`
    (`table_name` defaults to `run_name`; the cells live in `<run_name>_cells/` either way).

    `finished_only` trains nothing: the finished cells go to `<table_name>.partial.json`, marked `"partial": true`
    with the keys of the missing cells (to commit the results of a run that is still going).
    """
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    start = time.perf_counter()
    x_test, x_train_eval = load_eval_data(config)
    cells_dir = os.path.join(config.output_dir, f"{config.run_name}_cells")
    rows, per_example, missing = [], [], []
    for cell in cells(config):
        cell_dir = os.path.join(cells_dir, cell.key)
        finished = cell_store.load_finished(config, cell, cell_dir) if config.resume else None
        if finished is None and finished_only:
            missing.append(cell.key)
            continue
        if finished is None:
            if os.path.exists(os.path.join(cell_dir, cell_files.RESULT_FILE)):  # finished under other settings
                clear_run(cell_dir)
            log(f"[{cell.key}] training {config.epochs} epochs")
            row, arrays = run_cell(config, cell, x_test, x_train_eval, cell_dir)
        else:
            log(f"[{cell.key}] finished earlier: loaded")
            row, arrays = finished
        log(
            f"[{cell.key}] test ELBO {row['test_elbo']:.2f}  log p(x) {row['test_log_likelihood']:.2f} "
            f"+- {row['test_log_likelihood_se']:.2f} (K={row['iwae_samples']})  weights "
            f"{np.round(row['mixture_weights'], 3).tolist()}  {row['epoch_time_s']:.1f} s/epoch"
        )
        rows.append(row)
        per_example.append(arrays)
    add_paired_statistics(rows, per_example)
    result = dict(
        run_name=config.run_name, config=config.to_json(), device=device_description(),
        hardware=dict(platform=platform.platform(), cpu_count=os.cpu_count(), tensorflow=tf.__version__,
                      keras=keras.__version__),
        started=started, total_wall_time_s=time.perf_counter() - start, rows=rows,
    )
    if finished_only:
        result.update(partial=True, missing=missing)
    os.makedirs(config.output_dir, exist_ok=True)
    table = config.table_name or config.run_name
    path = os.path.join(config.output_dir, f"{table}{'.partial' if finished_only else ''}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    log(f"wrote {path}")
    return rows


def summary_table(rows: list[dict]) -> str:
    """Markdown table of the rows (one line per cell) with paired differences against the first VAE row."""
    reference = next((r["label"] for r in rows if r["method"] == "vae"), None)
    lines = [
        "| model | seed | test ELBO | test log p(x) (K) | vs vae: diff (paired s.e.) | weights | s/epoch |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        versus = ""
        if reference and reference in r.get("paired_diff_vs", {}):
            versus = f"{r['paired_diff_vs'][reference]:+.2f} ({r['paired_se_vs'][reference]:.2f})"
        lines.append(
            f"| {r['label']} | {r['seed']} | {r['test_elbo']:.2f} | {r['test_log_likelihood']:.2f} "
            f"+- {r['test_log_likelihood_se']:.2f} ({r['iwae_samples']}) | {versus} | "
            f"{', '.join(f'{w:.2f}' for w in r['mixture_weights'])} | {r['epoch_time_s']:.1f} |"
        )
    return "\n".join(lines)
