"""Paired comparisons of stored benchmark cells (issue 11): models against a reference, per training seed, at the
end of training and at every evaluated epoch, with the mean over seeds. The paired differences that
docs/results.md quotes come from here (or from `benchmarks.frontier`'s table, which has the final ones).

    python -m benchmarks.compare --cells_dir benchmarks/results/budget100_cells iwae_k16 \
        rme_M4_lambda1_iw_shared_ciw_S4 rme_M8_lambda1_iw_shared

Each difference is `model - reference` over the same test digits, with its paired standard error; that covers the
test digits only (two training runs of one configuration differ by more). Numpy only, no training.
"""

from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np

from benchmarks import cell_files


def evaluated_epochs(cells_dir: str, label: str, seed: int) -> list[int]:
    """Epochs along training at which the cell stored its per-digit arrays."""
    return cell_files.curve_epochs(cell_files.cell_dir(cells_dir, label, seed))


def _paired(mine: dict | None, theirs: dict | None, key: str) -> tuple[float, float] | None:
    return None if mine is None or theirs is None else cell_files.paired_difference(mine[key], theirs[key])


def compare(cells_dir: str, reference: str, model: str) -> list[dict]:
    """One dict per seed both have cells for: `log_likelihood` and `elbo` as `(diff, paired s.e.)` at the end (None
    where either is unfinished) and `curve`, `{epoch: (diff, s.e.)}` of log p(x) at the epochs both evaluated."""
    seeds = sorted(set(cell_files.stored_seeds(cells_dir, reference))
                   & set(cell_files.stored_seeds(cells_dir, model)))
    if not seeds:
        raise ValueError(f"{cells_dir} has no seed with cells of both {reference!r} and {model!r}.")
    result = []
    for seed in seeds:
        mine = cell_files.per_example(cells_dir, model, seed)
        theirs = cell_files.per_example(cells_dir, reference, seed)
        epochs = sorted(set(evaluated_epochs(cells_dir, model, seed))
                        & set(evaluated_epochs(cells_dir, reference, seed)))
        curve = {e: _paired(cell_files.per_example(cells_dir, model, seed, e),
                            cell_files.per_example(cells_dir, reference, seed, e), "log_likelihood") for e in epochs}
        result.append(dict(seed=seed, log_likelihood=_paired(mine, theirs, "log_likelihood"),
                           elbo=_paired(mine, theirs, "elbo"), curve=curve))
    return result


def comparison_table(reference: str, model: str, per_seed: list[dict]) -> str:
    """Markdown: one row per seed (log p(x), ELBO, curve), then the mean over the finished seeds."""
    epochs = sorted({e for row in per_seed for e in row["curve"]})
    show = lambda pair: "-" if pair is None else f"{pair[0]:+.2f} ({pair[1]:.2f})"  # noqa: E731
    lines = [f"{model} minus {reference} (paired s.e.)", "",
             "| seed | log p(x) | ELBO | " + " | ".join(f"epoch {e}" for e in epochs) + " |",
             "| --- | --- | --- |" + " --- |" * len(epochs)]
    for row in per_seed:
        cells = [show(row["curve"].get(e)) for e in epochs]
        lines.append(f"| {row['seed']} | {show(row['log_likelihood'])} | {show(row['elbo'])} | "
                     + " | ".join(cells) + " |")
    finals = [row["log_likelihood"][0] for row in per_seed if row["log_likelihood"] is not None]
    if len(finals) > 1:
        spread = np.std(finals, ddof=1) / np.sqrt(len(finals))
        lines.append(f"\nmean over {len(finals)} seeds: {np.mean(finals):+.2f} (s.e. between seeds {spread:.2f})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("reference", help="the label the others are compared against, e.g. iwae_k16")
    parser.add_argument("models", nargs="+", help="labels of the models to compare")
    parser.add_argument("--cells_dir", required=True, help="the harness's cells directory")
    args = parser.parse_args(argv)
    text = "\n\n".join(comparison_table(args.reference, m, compare(args.cells_dir, args.reference, m))
                       for m in args.models)
    print(text)
    return text


if __name__ == "__main__":
    main()
