"""Inference on one fixed decoder: approximation and amortization gaps, after Cremer, Li & Duvenaud,
"Inference Suboptimality in Variational Autoencoders" (ICML 2018).

1. A decoder is trained as part of a plain VAE for `decoder_epochs`, then frozen.
2. Every inference method trains a fresh encoder against that frozen decoder for `encoder_epochs` (same data,
   seeds and optimizer): the VAE encoder, the equal-parameter encoder, IWAE's encoder, RME's mixture (stage-wise)
   and SA-VAE (refinement steps on its own encoder); optionally (`--methods=...,rme_shared`) RME's mixture with one
   shared trunk and M heads. `--num_samples` and `--component_bound` apply to the RME rows (variant e: S samples
   of every component per step, each component on its importance-weighted bound); their line search stays on the
   ELBO, as the decoder is frozen and the study compares posteriors by their ELBO.
3. The floor: per-example optimised Gaussians, the trained VAE encoder's output refined by `floor_steps` gradient
   steps on each test example's own ELBO (SA-VAE's refinement run far longer).
4. On the test digits, per example: each method's ELBO (`elbo_samples` samples) and importance-weighted
   `log p(x)` (K = `iwae_samples`, the method's posterior as proposal). The reference `log p(x)` is, per example,
   the best of these estimates (each is a stochastic lower bound). Then

       inference gap     = log p(x) - ELBO(method)
       approximation gap = log p(x) - ELBO(optimised Gaussian)
       amortization gap  = ELBO(optimised Gaussian) - ELBO(method)   (< 0: better than any single Gaussian)

Every model is a run configuration (the method's benchmark cell, `cells.run_config`) trained by the library's run
code (`tf_rmvae.run.training.fit`): the decoder's VAE in `<run_name>_cells/decoder/`, each encoder in
`<run_name>_cells/<method>/` with `decoder_from` naming the decoder's weights (`RunConfig.decoder_from`: the
decoder frozen, the optimizer on the encoder only), so an interrupted piece resumes from its run directory's
checked state. Every finished piece is stored under `<output_dir>/<run_name>_cells/` and skipped on rerun (the
decoder's weights `decoder_vae.weights.h5`, one `per_example.npz` per method), each beside a `settings.json` of what
it depends on (`cell_settings`): a rerun whose settings differ (e.g. other `--num_samples` under the same
`--run_name`) is refused instead of loading a result of another configuration. `<output_dir>/<run_name>.json` gets
the table.

    python -m benchmarks.amortization --decoder_epochs=20 --encoder_epochs=20 --run_name=amortization
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Sequence

import keras
import numpy as np

from benchmarks.cells import BenchmarkConfig, Cell, adds_components, epochs_per_component, run_config
from tf_rmvae import data as rm_data
from tf_rmvae.config import RunConfig
from tf_rmvae.files import write_json_atomic
from tf_rmvae.layers.encoders import GaussianEncoder
from tf_rmvae.models.semi_amortized import SemiAmortizedVAE
from tf_rmvae.run import evaluation, training

METHODS = ("vae", "vae_equal_params", "iwae", "rme", "savae")
# Not in the default list (the committed study ran without it): RME with one shared trunk and M heads (variant b).
OPTIONAL_METHODS = ("rme_shared",)


@dataclasses.dataclass
class AmortizationConfig:
    """Everything the study depends on; the models are the benchmark cells' (`cells.run_config`), the encoders'
    with the decoder frozen (`RunConfig.decoder_from`), trained by `tf_rmvae.run.training.fit`."""

    methods: Sequence[str] = METHODS
    decoder_epochs: int = 20
    encoder_epochs: int = 20
    epochs_per_component: int = 0  # 0: encoder_epochs // M
    num_components: int = 4
    lambda_kl: float = 0.3
    num_samples: int = 1  # RME rows: samples per component and step
    component_bound: str = "elbo"  # RME rows: "iw" trains each component on its importance-weighted bound
    savae_steps: int = 10
    floor_steps: int = 100
    hidden_units: Sequence[int] = (200, 200)
    latent_dim: int = 32
    train_examples: int = 0
    eval_examples: int = 1000
    iwae_samples: int = 500
    elbo_samples: int = 100
    seed: int = 0
    output_dir: str = "benchmarks/results"
    run_name: str = "amortization"
    verbose: int = 2

    def benchmark_config(self, epochs: int) -> BenchmarkConfig:
        methods = tuple(dict.fromkeys(_cell(self, m).method for m in self.methods))  # rme_shared is an rme cell
        return BenchmarkConfig(
            methods=methods, lambdas=(self.lambda_kl,), num_components=(self.num_components,),
            epochs=epochs, epochs_per_component=self.epochs_per_component, seeds=(self.seed,),
            hidden_units=tuple(self.hidden_units), latent_dim=self.latent_dim, train_examples=self.train_examples,
            savae_steps=(self.savae_steps,), iwae_samples=self.iwae_samples, eval_examples=self.eval_examples,
        )


def _cell(config: AmortizationConfig, method: str) -> Cell:
    if method not in METHODS + OPTIONAL_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS + OPTIONAL_METHODS}.")
    shared = method == "rme_shared"
    method = "rme" if shared else method
    rme = method == "rme"
    m = 1 if method in ("vae", "savae") else config.num_components
    return Cell(method, m, config.lambda_kl if rme else None, config.seed, "stagewise" if rme else None,
                refine_steps=config.savae_steps if method == "savae" else None, shared_trunk=shared,
                component_bound=config.component_bound if rme else "elbo",
                num_samples=config.num_samples if rme else 1)


def run_config_of(config: AmortizationConfig, method: str, epochs: int, model_dir: str, **changes) -> RunConfig:
    """The run configuration that trains `method`'s model of the study for `epochs` in `model_dir` (its benchmark
    cell's, `cells.run_config`, with `changes` over it: `decoder_from` for the encoders)."""
    bench = config.benchmark_config(epochs)
    return run_config(bench, _cell(config, method), model_dir).replace(verbose=config.verbose, **changes).validate()


def decoder_settings(config: AmortizationConfig) -> dict:
    """What the stored decoder depends on."""
    return dict(decoder_epochs=config.decoder_epochs, hidden_units=[int(u) for u in config.hidden_units],
                latent_dim=config.latent_dim, train_examples=config.train_examples, seed=config.seed)


def cell_settings(config: AmortizationConfig, method: str) -> dict:
    """What the stored per-example bounds of `method` (or of the floor, "optimised_gaussian") depend on."""
    settings = dict(decoder_settings(config), encoder_epochs=config.encoder_epochs, eval_examples=config.eval_examples,
                    iwae_samples=config.iwae_samples, elbo_samples=config.elbo_samples)
    if method == "optimised_gaussian":  # refines the VAE encoder's output
        return dict(settings, label=method, floor_steps=config.floor_steps)
    cell = _cell(config, method)
    bench = config.benchmark_config(config.encoder_epochs)
    schedule = epochs_per_component(bench, cell) if adds_components(cell) else None
    return dict(settings, label=cell.label, epochs_per_component=schedule)


def check_settings(directory: str, settings: dict, log=print) -> None:
    """Refuses a stored result whose `settings.json` differs from `settings`; writes none (see `save_settings`)."""
    path = os.path.join(directory, "settings.json")
    if not os.path.exists(path):
        log(f"[{directory}] stored before settings were recorded: not checked")
        return
    with open(path) as f:
        stored = json.load(f)
    differ = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
    if differ:
        details = ", ".join(f"{k}: stored {stored.get(k)!r}, now {settings.get(k)!r}" for k in differ)
        raise ValueError(f"{directory} holds a result of other settings ({details}); use another --run_name or "
                         "remove it.")


def save_settings(directory: str, settings: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    write_json_atomic(os.path.join(directory, "settings.json"), settings)


def train_decoder(config: AmortizationConfig, cells_dir: str, log=print) -> str:
    """The shared decoder's weights file `cells_dir/decoder_vae.weights.h5` (the whole VAE's: layers have no
    `save_weights`), trained once as a plain VAE in the run directory `cells_dir/decoder/`."""
    path = os.path.join(cells_dir, "decoder_vae.weights.h5")
    settings_dir = os.path.join(cells_dir, "decoder")  # the decoder's settings.json, beside its run's files
    if os.path.exists(path):
        check_settings(settings_dir, decoder_settings(config), log)
        return path
    log(f"[decoder] training a VAE for {config.decoder_epochs} epochs")
    model = training.fit(run_config_of(config, "vae", config.decoder_epochs, settings_dir)).model
    model.save_weights(path[:-len(".weights.h5")] + ".tmp.weights.h5")
    os.replace(path[:-len(".weights.h5")] + ".tmp.weights.h5", path)
    save_settings(settings_dir, decoder_settings(config))
    return path


def train_encoder(config: AmortizationConfig, method: str, decoder_file: str, cells_dir: str) -> keras.Model:
    """The model of `method` whose encoder trained against the frozen decoder of `decoder_file`, in the run
    directory `cells_dir/<method>/` (a finished run there is loaded, not trained again)."""
    run = run_config_of(config, method, config.encoder_epochs, os.path.join(cells_dir, method),
                        decoder_from=decoder_file)
    return training.fit(run).model


def per_example_bounds(model, x: np.ndarray, config: AmortizationConfig) -> dict:
    """`[N]` ELBO and importance-weighted log p(x) of `model`'s posterior."""
    elbo = evaluation.per_example_elbo(model, x, config.elbo_samples, batch_size=100)
    log_px = evaluation.per_example_log_likelihood(model, x, config.iwae_samples, batch_size=100)
    return dict(elbo=elbo, log_likelihood=log_px)


def optimised_gaussians(vae: keras.Model, x: np.ndarray, config: AmortizationConfig) -> dict:
    """The floor: the VAE encoder's Gaussians refined by `floor_steps` ascent steps on each example's ELBO."""
    networks = vae.encoder.networks  # the VAE's one-component mixture encoder, as a plain Gaussian encoder
    gaussian = GaussianEncoder(
        networks.latent_dim, architecture=networks.architecture, hidden_units=networks.hidden_units,
        conv_filters=networks.conv_filters, min_scale=networks.min_scale)
    floor = SemiAmortizedVAE(gaussian, vae.decoder, refine_steps=config.floor_steps)
    floor.ensure_built((None, *x.shape[1:]))
    gaussian.networks.set_weights(networks.get_weights())
    return per_example_bounds(floor, x, config)


def gaps(results: dict[str, dict]) -> list[dict]:
    """Rows of the gap table: per method, mean bounds and gaps with paired standard errors over the examples."""
    reference = np.max(np.stack([r["log_likelihood"] for r in results.values()]), axis=0)
    floor_elbo = results["optimised_gaussian"]["elbo"]
    rows = []
    for method, r in results.items():
        inference = evaluation.mean_and_se(reference - r["elbo"])
        amortization = evaluation.mean_and_se(floor_elbo - r["elbo"])
        rows.append(dict(
            method=method, elbo=float(np.mean(r["elbo"])), log_likelihood=float(np.mean(r["log_likelihood"])),
            reference_log_likelihood=float(np.mean(reference)), inference_gap=inference[0],
            inference_gap_se=inference[1], amortization_gap=amortization[0], amortization_gap_se=amortization[1],
            approximation_gap=float(np.mean(reference - floor_elbo)),
        ))
    return rows


def run(config: AmortizationConfig, log=print) -> list[dict]:
    cells_dir = os.path.join(config.output_dir, f"{config.run_name}_cells")
    x_test = rm_data.load_numpy("rmvae_mnist", "test", take=config.eval_examples or None, seed=0)
    decoder_file = train_decoder(config, cells_dir, log)
    methods = ["vae"] + [m for m in config.methods if m != "vae"]  # the floor starts from the VAE encoder
    results, vae_model = {}, None
    for method in methods + ["optimised_gaussian"]:
        path = os.path.join(cells_dir, method, "per_example.npz")
        settings = cell_settings(config, method)
        if os.path.exists(path):
            check_settings(os.path.dirname(path), settings, log)
            with np.load(path) as arrays:
                results[method] = {k: arrays[k] for k in arrays.files}
            log(f"[{method}] finished earlier: loaded")
            continue
        if method == "optimised_gaussian":
            vae_model = vae_model or train_encoder(config, "vae", decoder_file, cells_dir)  # its run, or again
            results[method] = optimised_gaussians(vae_model, x_test, config)
        else:
            log(f"[{method}] training its encoder for {config.encoder_epochs} epochs against the frozen decoder")
            model = train_encoder(config, method, decoder_file, cells_dir)
            results[method] = per_example_bounds(model, x_test, config)
            if method == "vae":
                vae_model = model
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.savez(path[:-len(".npz")] + ".tmp.npz", **results[method])  # whole or not at all
        os.replace(path[:-len(".npz")] + ".tmp.npz", path)
        save_settings(os.path.dirname(path), settings)
        log(f"[{method}] ELBO {np.mean(results[method]['elbo']):.2f}  "
            f"log p(x) {np.mean(results[method]['log_likelihood']):.2f}")
    rows = gaps(results)
    for row in rows:  # the method's cell, e.g. rme_M4_lambda1_shared_ciw_S4 for "rme_shared"
        row["label"] = cell_settings(config, row["method"])["label"]
    with open(os.path.join(config.output_dir, f"{config.run_name}.json"), "w") as f:
        json.dump(dict(config=dataclasses.asdict(config), rows=rows), f, indent=1)
    log(gap_table(rows))
    return rows


def gap_table(rows: list[dict]) -> str:
    lines = ["| inference | ELBO | log p(x) (own proposal) | inference gap | amortization gap (s.e.) |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['elbo']:.2f} | {r['log_likelihood']:.2f} | {r['inference_gap']:.2f} | "
                     f"{r['amortization_gap']:+.2f} ({r['amortization_gap_se']:.2f}) |")
    lines.append(f"\nreference log p(x) {rows[0]['reference_log_likelihood']:.2f}; approximation gap "
                 f"(log p(x) - ELBO of the optimised Gaussians) {rows[0]['approximation_gap']:.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = AmortizationConfig()
    for field in dataclasses.fields(AmortizationConfig):
        value = getattr(defaults, field.name)
        kind = (lambda v: tuple(v.split(","))) if isinstance(value, tuple) else type(value)
        parser.add_argument(f"--{field.name}", type=kind, default=value)
    args = vars(parser.parse_args(argv))
    if args["hidden_units"] and isinstance(args["hidden_units"][0], str):
        args["hidden_units"] = tuple(int(u) for u in args["hidden_units"])
    return run(AmortizationConfig(**args))


if __name__ == "__main__":
    main()
