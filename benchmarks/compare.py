"""Paired comparisons of stored benchmark cells: models against a reference, per training seed, at the
end of training and at every evaluated epoch, with the mean over seeds; optionally a plot of the differences
along training. The paired differences that docs/results.md quotes come from here (or from `benchmarks.frontier`'s
table, which has the final ones).

    python -m benchmarks.compare --cells_dir benchmarks/results/budget100_cells iwae_k16 \
        "rme_M4_lambda1_iw_shared_ciw_S4=variant e" "rme_M4_lambda1_iw_shared_ciw_S4_epc34=no last join" \
        --plot /tmp/against_iwae_k16.png

A model or the reference is a cell label, read from `--cells_dir`, or `CELLS_DIR:LABEL`, read from that directory
(cells of one label with other settings live in another run's directory), and may be named for the tables and the
plot, `LABEL=NAME` or `CELLS_DIR:LABEL=NAME` (as `benchmarks.frontier --only` names them). Each difference is
`model - reference` over the same test digits, with its paired standard error; that covers the test digits only
(two training runs of one configuration differ by more). Numpy (and matplotlib for --plot) only, no training.
"""

from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np

from benchmarks import cell_files


def resolve(spec: str, cells_dir: str) -> tuple[str, str]:
    """`LABEL` or `CELLS_DIR:LABEL` -> `(cells directory, label)`; a bare label is read from `cells_dir`."""
    directory, colon, label = spec.rpartition(":")
    return (directory, label) if colon else (cells_dir, spec)


def named(spec: str) -> tuple[str, str]:
    """`SPEC=NAME` or `SPEC` -> `(name, spec)`; the name defaults to the label. Only an `=` after the cells
    directory names (a directory's own `=` does not)."""
    directory, colon, rest = spec.rpartition(":")
    label, equals, name = rest.partition("=")
    return (name if equals else label), directory + colon + label


def evaluated_epochs(cells_dir: str, label: str, seed: int) -> list[int]:
    """Epochs along training at which the cell stored its per-digit arrays."""
    return cell_files.curve_epochs(cell_files.cell_dir(cells_dir, label, seed))


def _paired(mine: dict | None, theirs: dict | None, key: str) -> tuple[float, float] | None:
    return None if mine is None or theirs is None else cell_files.paired_difference(mine[key], theirs[key])


def compare(cells_dir: str, reference: str, model: str, scoring: str | None = None) -> list[dict]:
    """One dict per seed both have cells for: `log_likelihood` and `elbo` as `(diff, paired s.e.)` at the end (None
    where either is unfinished), `epochs` (the epoch count both finished at; None if they differ or either is
    unfinished) and `curve`, `{epoch: (diff, s.e.)}` of log p(x) at the epochs both evaluated. `reference` and
    `model` as in `resolve`. `scoring` (e.g. "K5000_N10000") pairs the final models as `benchmarks.rescore` scored
    them instead (no curve)."""
    (model_dir, model), (reference_dir, reference) = resolve(model, cells_dir), resolve(reference, cells_dir)
    seeds = sorted(set(cell_files.stored_seeds(reference_dir, reference))
                   & set(cell_files.stored_seeds(model_dir, model)))
    if not seeds:
        raise ValueError(f"No seed with cells of both {reference!r} (in {reference_dir}) and {model!r} "
                         f"(in {model_dir}).")
    result = []
    for seed in seeds:
        mine = cell_files.per_example(model_dir, model, seed, scoring=scoring)
        theirs = cell_files.per_example(reference_dir, reference, seed, scoring=scoring)
        epochs = [] if scoring else sorted(set(evaluated_epochs(model_dir, model, seed))
                                           & set(evaluated_epochs(reference_dir, reference, seed)))
        curve = {e: _paired(cell_files.per_example(model_dir, model, seed, e),
                            cell_files.per_example(reference_dir, reference, seed, e), "log_likelihood")
                 for e in epochs}
        result.append(dict(seed=seed, log_likelihood=_paired(mine, theirs, "log_likelihood"),
                           elbo=_paired(mine, theirs, "elbo"), curve=curve,
                           epochs=_common_final_epoch(model_dir, model, reference_dir, reference, seed)))
    return result


def _common_final_epoch(model_dir: str, model: str, reference_dir: str, reference: str, seed: int) -> int | None:
    """The epoch count both cells finished at (so their final difference belongs at that epoch); else None."""
    epochs = cell_files.final_epoch(model_dir, model, seed)
    return epochs if epochs == cell_files.final_epoch(reference_dir, reference, seed) else None


def comparison_table(reference: str, model: str, per_seed: list[dict]) -> str:
    """Markdown: one row per seed (log p(x), ELBO, curve), then the mean over the finished seeds."""
    epochs = sorted({e for row in per_seed for e in row["curve"]})
    show = lambda pair: "-" if pair is None else f"{pair[0]:+.2f} ({pair[1]:.2f})"  # noqa: E731
    lines = [f"{model} minus {reference} (paired s.e.)", "",
             "| seed | log p(x) | ELBO |" + "".join(f" epoch {e} |" for e in epochs),
             "| --- | --- | --- |" + " --- |" * len(epochs)]
    for row in per_seed:
        cells = [show(row["curve"].get(e)) for e in epochs]
        lines.append(f"| {row['seed']} | {show(row['log_likelihood'])} | {show(row['elbo'])} |"
                     + "".join(f" {cell} |" for cell in cells))
    finals = [row["log_likelihood"][0] for row in per_seed if row["log_likelihood"] is not None]
    if len(finals) > 1:
        spread = np.std(finals, ddof=1) / np.sqrt(len(finals))
        lines.append(f"\nmean over {len(finals)} seeds: {np.mean(finals):+.2f} (s.e. between seeds {spread:.2f})")
    return "\n".join(lines)


def difference_curve(row: dict) -> tuple[list[int], list[float]]:
    """One seed's paired difference of log p(x) along training, the final one at the epoch both finished at."""
    points = {e: pair[0] for e, pair in row["curve"].items() if pair is not None}
    if row["log_likelihood"] is not None and row["epochs"] is not None:
        points[row["epochs"]] = row["log_likelihood"][0]
    epochs = sorted(points)
    return epochs, [points[e] for e in epochs]


def finished_curves(per_seed: list[dict]) -> list[tuple[list[int], list[float]]]:
    """`difference_curve` of every seed that finished on both sides (`compare`'s rows; a cell still training has no
    final score)."""
    return [difference_curve(row) for row in per_seed if row["log_likelihood"] is not None]


def plot_differences(reference: str, comparisons: dict[str, list[dict]], path: str) -> None:
    """Paired difference of test log p(x) against `reference` along training: a thin line per seed, a thick one
    for the mean over seeds at the epochs every seed reached (`comparisons`: model name -> `compare`'s rows). Only
    finished seeds (a final score on both sides) are drawn: a cell still training would cut the mean short."""
    import matplotlib.pyplot as plt

    from benchmarks.plots import finish, palette  # imports matplotlib (Agg): only where a plot is asked for

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axhline(0.0, color="black", linewidth=0.8)
    for (name, per_seed), color in zip(comparisons.items(), palette(len(comparisons))):
        curves = finished_curves(per_seed)
        if not curves:
            continue
        for epochs, diffs in curves:
            ax.plot(epochs, diffs, color=color, linewidth=0.8, alpha=0.5, marker=".")
        shared = sorted(set.intersection(*(set(epochs) for epochs, _ in curves)))
        mean = [np.mean([dict(zip(*curve))[e] for curve in curves]) for e in shared]
        seeds = f"{len(curves)} seed{'s' if len(curves) > 1 else ''}"
        ax.plot(shared, mean, color=color, linewidth=2.2, marker="o", label=f"{name} ({seeds})")
    finish(fig, ax, "epoch", f"test log p(x) minus {reference} (nats)", path, legend_size=7)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reference", help="[CELLS_DIR:]LABEL[=NAME] the others are compared against, e.g. iwae_k16")
    parser.add_argument("models", nargs="+", help="[CELLS_DIR:]LABEL[=NAME] of each model to compare")
    parser.add_argument("--cells_dir", required=True, help="the harness's cells directory")
    parser.add_argument("--plot", help="also plot the differences along training to this PNG")
    parser.add_argument("--scoring", help="pair the final models as benchmarks.rescore scored them, e.g. K5000_N10000")
    args = parser.parse_args(argv)
    reference_name, reference = named(args.reference)
    comparisons = {name: compare(args.cells_dir, reference, spec, args.scoring)
                   for name, spec in map(named, args.models)}
    text = "\n\n".join(comparison_table(reference_name, m, rows) for m, rows in comparisons.items())
    if args.plot:
        plot_differences(reference_name, comparisons, args.plot)
    print(text)
    return text


if __name__ == "__main__":
    main()
