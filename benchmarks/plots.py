"""Plots of benchmark results: test log-likelihood vs number of components, vs lambda, and vs inference time.

    python -m benchmarks.plots benchmarks/results/cpu_budget.json [more.json ...] --out_dir benchmarks/results/plots

Points are means over seeds; error bars are the largest per-run standard error among the seeds.
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


def load_rows(paths: Sequence[str]) -> list[dict]:
    rows = []
    for path in paths:
        with open(path) as f:
            rows.extend(json.load(f)["rows"])
    return rows


def finish(fig, ax, xlabel: str, ylabel: str, path: str, legend_size: int | None = None) -> None:
    """Labels the axes, adds the legend (if `legend_size`), saves the figure to `path` and closes it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if legend_size:
        ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def palette(n: int) -> list:
    """`n` colours, distinct for up to 20 (matplotlib's default cycle repeats after 10, so two models of a larger
    figure would share one)."""
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _aggregate(rows: list[dict], key) -> dict:
    """`{group: (mean log-likelihood, s.e.)}` over seeds of the rows grouped by `key(row)`."""
    groups = defaultdict(list)
    for row in rows:
        groups[key(row)].append(row)
    return {
        group: (float(np.mean([r["test_log_likelihood"] for r in members])),
                float(max(r["test_log_likelihood_se"] for r in members)))
        for group, members in groups.items()
    }


def plot_vs_components(rows: list[dict], path: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 4))
    curves = defaultdict(list)
    for (name, m), (mean, se) in _aggregate(
        rows, lambda r: (r["method"] if r["lambda_kl"] is None else f"{r['method']} lambda={r['lambda_kl']:g}",
                         r["num_components"])
    ).items():
        curves[name].append((m, mean, se))
    for name, points in sorted(curves.items()):
        points.sort()
        ms, means, ses = zip(*points)
        style = "o--" if len(points) == 1 else "o-"
        ax.errorbar(ms, means, yerr=ses, fmt=style, capsize=3, label=name)
    finish(fig, ax, "number of components M", "test log-likelihood (nats)", path, legend_size=7)


def plot_vs_lambda(rows: list[dict], path: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 4))
    rme = [r for r in rows if r["method"] == "rme" and r["lambda_kl"] is not None]
    curves = defaultdict(list)
    for (m, lam), (mean, se) in _aggregate(rme, lambda r: (r["num_components"], r["lambda_kl"])).items():
        curves[m].append((lam, mean, se))
    for m, points in sorted(curves.items()):
        points.sort()
        lams, means, ses = zip(*points)
        ax.errorbar(lams, means, yerr=ses, fmt="o-", capsize=3, label=f"rme M={m}")
    for method in ("vae", "savae"):
        base = [r["test_log_likelihood"] for r in rows if r["method"] == method]
        if base:
            ax.axhline(float(np.mean(base)), linestyle=":", color="gray" if method == "vae" else "black", label=method)
    finish(fig, ax, "lambda", "test log-likelihood (nats)", path, legend_size=7)


def plot_vs_inference_time(rows: list[dict], path: str) -> None:
    fig, ax = plt.subplots(figsize=(5, 4))
    for row in rows:
        ax.scatter(row["inference_ms_batch100"], row["test_log_likelihood"], s=20)
        ax.annotate(row["label"], (row["inference_ms_batch100"], row["test_log_likelihood"]), fontsize=6)
    ax.set_xscale("log")
    finish(fig, ax, "inference time per batch of 100 (ms, log scale)", "test log-likelihood (nats)", path)


def make_plots(rows: list[dict], out_dir: str) -> list[str]:
    """Writes the three plots as PNG files into `out_dir`; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in (
        "loglik_vs_components.png", "loglik_vs_lambda.png", "loglik_vs_inference_time.png")]
    plot_vs_components(rows, paths[0])
    plot_vs_lambda(rows, paths[1])
    plot_vs_inference_time(rows, paths[2])
    return paths


def main(argv: Sequence[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", nargs="+", help="JSON files written by the harness")
    parser.add_argument("--out_dir", default="benchmarks/results/plots")
    args = parser.parse_args(argv)
    paths = make_plots(load_rows(args.results), args.out_dir)
    print("\n".join(paths))
    return paths


if __name__ == "__main__":
    main()
