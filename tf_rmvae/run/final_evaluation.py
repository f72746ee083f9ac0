"""What a trained run produces: test metrics, their check before anything is served, figures, the export.

    test = evaluate_run(model, x_test, config)   # ELBO, IWAE log-likelihood (mean, s.e.), weights, entropies
    check_test_metrics(model, config, test)      # ExportRefused: not finite, or below chance and exported
    save_figures(model, x_test, history, config) # reconstructions.png, samples.png, mixture_weights.png
    export_run(model, config, metrics)           # the TF-Serving export under `config.resolved_export_dir`
"""

from __future__ import annotations

import os
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_rmvae import export
from tf_rmvae.config import RunConfig
from tf_rmvae.models.recursive_mixture_vae import RecursiveMixtureVAE
from tf_rmvae.run import directory as run_dir
from tf_rmvae.run import figures as plots
from tf_rmvae.run.evaluation import evaluate, model_mixture_summary
from tf_rmvae.run.guards import chance_log_likelihood, check_exportable

RECONSTRUCTIONS_FILE = "reconstructions.png"
SAMPLES_FILE = "samples.png"
MIXTURE_WEIGHTS_FILE = "mixture_weights.png"


def evaluate_run(model: RecursiveMixtureVAE, x_test: np.ndarray, config: RunConfig) -> dict[str, Any]:
    """Test metrics: ELBO and IWAE log-likelihood (mean, s.e.), mixture weights (with per-example proportions:
    their mean over `x_test`) and component entropies."""
    result = evaluate(model, x_test, iwae_samples=config.iwae_samples, chunk_size=config.eval_chunk_size,
                      seed=config.seed)
    # SA-VAE's one Gaussian encoder has no mixture state: one component, always active.
    active = int(keras.ops.convert_to_numpy(getattr(model.encoder, "num_active_components", 1)))
    weights, entropies = model_mixture_summary(model, x_test)
    return dict(
        examples=int(len(x_test)),
        elbo_mean=result["elbo_mean"], elbo_se=result["elbo_se"],
        log_likelihood_mean=result["log_likelihood_mean"], log_likelihood_se=result["log_likelihood_se"],
        iwae_samples=int(config.iwae_samples), eval_time_s=result["eval_time_s"],
        active_components=active,
        mixture_weights=weights,
        component_entropy=[h if m < active else None for m, h in enumerate(entropies)],
    )


def save_figures(model: RecursiveMixtureVAE, x_test: np.ndarray, history: list[dict], config: RunConfig) -> dict:
    """Writes the three PNGs into `config.model_dir`; returns `{figure: path}`."""
    paths = {name: os.path.join(config.model_dir, name)
             for name in (RECONSTRUCTIONS_FILE, SAMPLES_FILE, MIXTURE_WEIGHTS_FILE)}
    plots.save_reconstructions(model, x_test[:16], paths[RECONSTRUCTIONS_FILE])
    plots.save_samples(model, paths[SAMPLES_FILE], num_images=64, seed=config.seed)
    plots.save_mixture_weights(history, paths[MIXTURE_WEIGHTS_FILE], config.num_components)
    return paths


def check_test_metrics(model: RecursiveMixtureVAE, config: RunConfig, test: dict) -> None:
    """Refuses (`guards.ExportRefused`) test metrics that are not finite, or a test ELBO below chance when the run
    exports and `config.export_below_chance` is off: the run is then neither exported nor marked finished."""
    allow_below_chance = config.export_below_chance or not config.resolved_export_dir
    check_exportable(test, chance_log_likelihood(model.decoder), allow_below_chance)


def export_run(model: RecursiveMixtureVAE, config: RunConfig, metrics: dict) -> dict[str, str]:
    """Exports a TF-Serving SavedModel (and the encoder alone if `config.export_encoder`) into
    `config.resolved_export_dir` (default `<model_dir>/export`); `{}` if disabled."""
    export_dir = config.resolved_export_dir
    if not export_dir:
        return {}
    name = config.resolved_export_name
    paths = {}
    try:
        paths["model"] = export.export_model(model, export_dir, name, metrics=metrics)
        if config.export_encoder:
            paths["encoder"] = export.export_encoder(model, export_dir, name, metrics=metrics)
    except (OSError, tf.errors.OpError) as error:
        if not run_dir.is_disk_full(error):
            raise
        raise run_dir.DiskFullError(
            f"No space left on device while exporting into {export_dir} ({str(error).splitlines()[0]}); the "
            f"trained state is intact{' and ' + paths['model'] + ' was exported' if paths else ''}, the run not "
            "marked finished. Free some space and rerun the same command: only the evaluation and export are redone."
        ) from None
    return paths
