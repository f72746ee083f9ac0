"""The accuracy-cost frontier: test log-likelihood against inference and training cost, and over epochs.

    python -m benchmarks.frontier benchmarks/results/budget12.json --speed benchmarks/results/speed_frontier.json \
        --reference rme_M4_lambda0.3 --out_dir benchmarks/results/frontier_budget12

Inputs: a harness JSON (rows of one or more seeds) and a `benchmarks.speed` JSON (inference times measured side by
side in one process; the harness's per-cell times are taken on a shared machine at different moments, so they
are only a fallback). Writes `frontier.md` (one table row per model: mean over seeds, paired differences to the
reference per seed, costs, whether the model is on the frontier) and three plots: log p(x) against inference time
at batch 1 and 100, against training seconds per epoch, and the learning curves (log p(x) against epochs).
A model's entries in the speed JSON are found from the run configuration that trained it, as its finished cell
stores it (`benchmarks.cell_settings`; the cells of `--cells_dir`, or of each table's own run): a label only
names a model, it is never read for settings.

`--only "vae=VAE;iwae_k8=IWAE k = 8;..."` keeps only the named models (a name after `=` replaces the label in the
plots, which then get a legend instead of per-point labels): a figure readable at a glance, e.g. the README's.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import cell_files, cell_settings  # noqa: E402
from benchmarks.plots import finish, load_rows, palette  # noqa: E402
from tf_rmvae.config import RunConfig  # noqa: E402


def speed_name(run: RunConfig) -> str:
    """The `benchmarks.speed` inference entry that times the test-time inference of the model `run` trains."""
    if run.method == "savae":
        return f"savae_{run.refine_steps}"
    if run.method == "vae":
        if run.encoder_parameters_of:
            return f"vae_equal_params_encoder_M{run.encoder_parameters_of}"
        return "vae_encoder"  # IWAE's (and PIWAE's) test-time inference is the plain VAE encoder's pass
    shared = run.shared_trunk  # one trunk and M heads (the harness's `--shared_trunk`)
    return f"rme_{'shared_' if shared else ''}encoder_M{run.num_components}"


def train_step_name(run: RunConfig, bound: str = "auto") -> str | None:
    """The `benchmarks.speed` training-step entry that times the model `run` trains (absent where speed did not
    time it), or None where no entry can: speed times the VAE, IWAE k (`iwae_k<k>`, reparameterised gradients),
    and RME's stage-wise step on one bound (`bound`, its config's; "auto" is RME's "iw") with every component
    joining and the mixing proportions shared, so an RME run maps only if it trained on that bound. Importance-
    weighted component criteria and S samples per slot are named as speed's `sampled_shared` entries
    (`rme_shared_M4_ciw_S4`); the schedule's stage length does not change the step.
    """
    plain_vae = run.method == "vae" and not run.encoder_parameters_of and run.encoder_groups == 1
    if plain_vae and run.resolved_encoder_gradient == "reparam":
        if run.resolved_bound == "iw":
            return f"iwae_k{run.resolved_num_samples}"
        return "vae" if run.resolved_num_samples == 1 else None
    joins = run.resolved_epochs_per_component < run.epochs  # a stage as long as the run: the no-join control
    if (run.method != "rme" or run.schedule != "stagewise" or run.per_example_proportions or not joins
            or run.resolved_encoder_gradient != "reparam"
            or (run.resolved_bound == "iw") != (bound in ("auto", "iw"))):
        return None
    criteria = "_ciw" if run.resolved_component_bound == "iw" else ""
    samples = f"_S{run.resolved_num_samples}" if run.resolved_num_samples != 1 else ""
    return f"rme_{'shared_' if run.shared_trunk else ''}M{run.num_components}{criteria}{samples}"


def stored_runs(tables: Sequence[str], cells_dir: str | None = None) -> dict[tuple[str, int], RunConfig]:
    """`{(label, seed): the run configuration that trained the row's cell}` for every row of the harness tables:
    read from the finished cell (`cell_settings.trained_run_config`) in `cells_dir`, or where that is None in the
    cells directory of the table's own run (`<output_dir>/<run_name>_cells`, as its config names them)."""
    runs = {}
    for path in tables:
        with open(path) as f:
            table = json.load(f)
        directory = cells_dir or os.path.join(table["config"]["output_dir"], f"{table['config']['run_name']}_cells")
        for row in table["rows"]:
            key = (row["label"], row["seed"])
            if key not in runs:
                runs[key] = cell_settings.trained_run_config(cell_files.cell_dir(directory, *key))
    return runs


def unique_rows(rows: list[dict]) -> list[dict]:
    """The first row of each (label, seed): tables over the same cells may share rows. A label names a cell only
    within one run's settings (e.g. not RME's cap), so two rows of one (label, seed) with different results are
    refused: they are different models, and the frontier's pairing by label would mix them up."""
    first = {}
    for row in rows:
        key = (row["label"], row["seed"])
        if key in first and first[key]["test_log_likelihood"] != row["test_log_likelihood"]:
            raise ValueError(f"Two rows named {row['label']} (seed {row['seed']}) with different results "
                             f"({first[key]['test_log_likelihood']:.2f} and {row['test_log_likelihood']:.2f}): "
                             "tables of runs with different settings; pass one of them.")
        first.setdefault(key, row)
    return list(first.values())


def pair_with_reference(rows: list[dict], reference: str, cells_dir: str) -> list[dict]:
    """Rows with the paired difference to `reference` filled in where their own table lacks it.

    Rows from several harness tables (e.g. a second `--table_name` over the same cells) carry paired differences
    only to the rows of their own table; the per-digit arrays in `cells_dir/<label>_seed<seed>/per_example.npz`
    pair any two cells evaluated on the same test digits.
    """
    paired = []
    for row in rows:
        row = dict(row, paired_diff_vs=dict(row.get("paired_diff_vs", {})),
                   paired_se_vs=dict(row.get("paired_se_vs", {})))
        if row["label"] != reference and reference not in row["paired_diff_vs"]:
            mine = cell_files.per_example(cells_dir, row["label"], row["seed"])
            theirs = cell_files.per_example(cells_dir, reference, row["seed"])
            if mine is not None and theirs is not None:
                a, b = mine["log_likelihood"], theirs["log_likelihood"]
                if a.shape == b.shape:  # cells evaluated on other digits do not pair
                    diff, se = cell_files.paired_difference(a, b)
                    row["paired_diff_vs"][reference], row["paired_se_vs"][reference] = diff, se
        paired.append(row)
    return paired


def summarize(rows: list[dict], speed: dict | None, mode: str = "function",
              runs: dict[tuple[str, int], RunConfig] | None = None) -> list[dict]:
    """One entry per model label: mean test log p(x) and inference gap over seeds, costs, per-seed rows. With
    `speed`, each model's entries there are found from the run configurations that trained its rows (`runs`,
    `stored_runs`); every seed's must name the same ones."""
    measured_mode = (speed or {}).get("modes", {}).get(mode, {})
    inference = measured_mode.get("inference_ms", {})
    train_steps = measured_mode.get("train_step_ms", {})
    timed_bound = (speed or {}).get("config", {}).get("bound", "elbo")
    groups = defaultdict(list)
    for row in rows:
        groups[row["label"]].append(row)
    entries = []
    for label, members in groups.items():
        inference_name, train_step = _speed_entries(label, members, runs, timed_bound) if speed else (None, None)
        measured = inference.get(inference_name, {})
        entries.append(dict(
            label=label,
            rows=sorted(members, key=lambda r: r["seed"]),
            log_likelihood=float(np.mean([r["test_log_likelihood"] for r in members])),
            gap=float(np.mean([r["test_log_likelihood"] - r["test_elbo"] for r in members])),
            inference_ms_1=measured.get("1", np.mean([r.get("inference_ms_batch1", np.nan) for r in members])),
            inference_ms_100=measured.get("100", np.mean([r["inference_ms_batch100"] for r in members])),
            epoch_s=float(np.mean([r["epoch_time_s"] for r in members])),
            train_step_ms=train_steps.get(train_step, np.nan),
        ))
    entries.sort(key=lambda e: -e["log_likelihood"])
    for entry in entries:  # on the frontier: no other model is better in log p(x) and at most as costly
        entry["frontier"] = not any(
            other["log_likelihood"] > entry["log_likelihood"]
            and other["inference_ms_100"] <= entry["inference_ms_100"] for other in entries
        )
    return entries


def _speed_entries(label: str, members: list[dict], runs: dict | None, timed_bound: str) -> tuple[str, str | None]:
    """`(speed_name, train_step_name)` of the model whose rows are `members`, from their run configurations."""
    missing = [r["seed"] for r in members if (label, r["seed"]) not in (runs or {})]
    if missing:
        raise ValueError(f"No stored run configuration of {label} (seeds {missing}) to find its speed entries: "
                         "read the finished cells (`stored_runs`, --cells_dir).")
    names = {(speed_name(runs[label, r["seed"]]), train_step_name(runs[label, r["seed"]], timed_bound))
             for r in members}
    if len(names) > 1:
        raise ValueError(f"The seeds of {label} were trained as different models ({sorted(names, key=str)}).")
    return names.pop()


def frontier_table(entries: list[dict], reference: str | None) -> str:
    """Markdown table of `summarize`'s entries, with paired differences to `reference` per seed."""
    lines = [
        f"| model | seeds | test log p(x) | inference gap | minus {reference or '-'}: diff (paired s.e.) per seed "
        "| inference ms, batch 1 | batch 100 | train s/epoch | train step ms | frontier |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in entries:
        versus = "; ".join(
            f"{r['paired_diff_vs'][reference]:+.2f} ({r['paired_se_vs'][reference]:.2f})"
            for r in e["rows"] if reference in r.get("paired_diff_vs", {})
        )
        lines.append(
            f"| {e['label']} | {','.join(str(r['seed']) for r in e['rows'])} | {e['log_likelihood']:.2f} | "
            f"{e['gap']:.2f} | {versus} | {e['inference_ms_1']:.3f} | {e['inference_ms_100']:.3f} | "
            f"{e['epoch_s']:.1f} | {_or_dash(e['train_step_ms'], '.1f')} | {'yes' if e['frontier'] else ''} |"
        )
    return "\n".join(lines)


def _or_dash(value: float, spec: str) -> str:
    return "-" if np.isnan(value) else format(value, spec)


def learning_curves(rows: list[dict]) -> dict[str, dict[int, list[float]]]:
    """`{label: {epoch: [test log p(x) of each seed]}}` from the rows' `curve` points."""
    curves = defaultdict(lambda: defaultdict(list))
    for row in rows:
        for point in row.get("curve", []):
            curves[row["label"]][point["epoch"]].append(point["test_log_likelihood"])
    return curves


def curve_table(rows: list[dict]) -> str:
    """Markdown table of test log p(x) at every evaluated epoch, mean over seeds."""
    curves = learning_curves(rows)
    epochs = sorted({e for curve in curves.values() for e in curve})
    lines = ["| model | " + " | ".join(f"epoch {e}" for e in epochs) + " |", "| --- |" + " --- |" * len(epochs)]
    for label, curve in sorted(curves.items()):
        cells = [f"{np.mean(curve[e]):.2f}" if e in curve else "" for e in epochs]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_only(spec: str) -> dict[str, str]:
    """`"label=Name;label2"` -> `{label: display name}` (the label itself where no name is given)."""
    names = {}
    for item in filter(None, (part.strip() for part in spec.split(";"))):
        label, _, name = item.partition("=")
        names[label.strip()] = name.strip() or label.strip()
    return names


def _scatter(entries: list[dict], cost: str, xlabel: str, path: str, names: dict[str, str] | None = None) -> None:
    """Log p(x) against `cost`; each model labelled at its point, or (with `names`) in a legend."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for e, color in zip(entries, palette(len(entries))):
        seeds = [r["test_log_likelihood"] for r in e["rows"]]
        ax.errorbar(e[cost], e["log_likelihood"], yerr=[[e["log_likelihood"] - min(seeds)],
                    [max(seeds) - e["log_likelihood"]]], fmt="o" if e["frontier"] else "x", capsize=2,
                    color=color, label=names[e["label"]] if names else None)
        if not names:
            ax.annotate(e["label"], (e[cost], e["log_likelihood"]), fontsize=6, xytext=(3, 2),
                        textcoords="offset points")
    ax.set_xscale("log")
    finish(fig, ax, xlabel, "test log-likelihood (nats; bars: range over seeds)", path,
           legend_size=7 if names else None)


def plot_curves(rows: list[dict], path: str, names: dict[str, str] | None = None) -> None:
    curves = learning_curves(rows)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for (label, curve), color in zip(sorted(curves.items()), palette(len(curves))):
        epochs = sorted(curve)
        ax.plot(epochs, [np.mean(curve[e]) for e in epochs], "o-", label=(names or {}).get(label, label),
                markersize=3, color=color)
    finish(fig, ax, "epoch", "test log-likelihood (nats, mean over seeds)", path, legend_size=6)


def write_frontier(rows: list[dict], speed: dict | None, reference: str | None, out_dir: str,
                   names: dict[str, str] | None = None,
                   runs: dict[tuple[str, int], RunConfig] | None = None) -> list[str]:
    """Writes `frontier.md` and the plots into `out_dir`; returns the paths. With `names` ({label: display
    name}), only those models, named so in the plots. `runs`: the rows' run configurations (`summarize`)."""
    if names:
        missing = sorted(set(names) - {r["label"] for r in rows})
        if missing:
            raise ValueError(f"--only names models that no results file has: {missing}.")
        rows = [r for r in rows if r["label"] in names]
    os.makedirs(out_dir, exist_ok=True)
    entries = summarize(rows, speed, runs=runs)
    paths = [os.path.join(out_dir, name) for name in (
        "frontier.md", "loglik_vs_inference_batch1.png", "loglik_vs_inference_batch100.png",
        "loglik_vs_train_time.png", "loglik_vs_epochs.png")]
    source = "benchmarks.speed (side by side)" if speed else "the harness cells (shared machine)"
    with open(paths[0], "w") as f:
        f.write(f"Inference times from {source}; train s/epoch from the harness cells (a shared machine); train step "
                "ms (batch 100, every component active) from benchmarks.speed, measured one model after another on "
                "an otherwise idle machine ('-': not timed there).\n\n")
        f.write(frontier_table(entries, reference) + "\n\n" + curve_table(rows) + "\n")
    _scatter(entries, "inference_ms_1", "inference time, batch 1 (ms, log scale)", paths[1], names)
    _scatter(entries, "inference_ms_100", "inference time, batch of 100 (ms, log scale)", paths[2], names)
    _scatter(entries, "epoch_s", "training seconds per epoch (log scale)", paths[3], names)
    plot_curves(rows, paths[4], names)
    return paths


def main(argv: Sequence[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", help="harness JSON files")
    parser.add_argument("--speed", default=None, help="benchmarks.speed JSON")
    parser.add_argument("--reference", default=None, help="label the paired differences are taken against")
    parser.add_argument("--out_dir", default="benchmarks/results/frontier")
    parser.add_argument("--cells_dir", default=None,
                        help="the harness cells directory: the rows' stored settings (default: each table's own "
                        "run's cells), and pairs rows of other tables with --reference")
    parser.add_argument("--only", default=None,
                        help='only these models, with display names: "label=Name;label2=Name 2" (module docstring)')
    args = parser.parse_args(argv)
    speed = None
    if args.speed:
        with open(args.speed) as f:
            speed = json.load(f)
    rows = unique_rows(load_rows(args.results))
    if args.cells_dir and args.reference:
        rows = pair_with_reference(rows, args.reference, args.cells_dir)
    runs = stored_runs(args.results, args.cells_dir) if speed else None
    paths = write_frontier(rows, speed, args.reference, args.out_dir, parse_only(args.only) if args.only else None,
                           runs)
    print("\n".join(paths))
    return paths


if __name__ == "__main__":
    main()
