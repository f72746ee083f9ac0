"""The model a `RunConfig` describes: networks, the compiled `RecursiveMixtureVAE`, and a trained run's model.

    model = build_compiled_model(config, (28, 28, 1), binary=True)  # built and compiled, ready for `fit`
    model = load_trained_model("runs/quick")                         # the run's model, its saved weights
    model = build_preset_model("paper", latent_dim=16)               # tf_rmvae.build_model: a named model
    encoder, decoder = build_networks((28, 28, 1), True, latent_dim=32, num_components=4)
    equal_parameter_hidden_units((28, 28, 1), (200, 200), 4, latent_dim=32)   # as big as 4: (585, 585)
"""

from __future__ import annotations

import os

import keras
import numpy as np

from tf_rmvae.choices import uses_shared_trunk
from tf_rmvae.config import DEFAULTS, RunConfig
from tf_rmvae.data import get_dataset_spec
from tf_rmvae.layers.decoders import make_decoder
from tf_rmvae.layers.encoders import GaussianEncoder, RecursiveMixtureEncoder
from tf_rmvae.models.recursive_mixture_vae import RecursiveMixtureVAE
from tf_rmvae.models.semi_amortized import SemiAmortizedVAE
from tf_rmvae.run import directory as run_dir
from tf_rmvae.run import frozen_decoder


def build_networks(
    image_shape: tuple[int, int, int],
    binary: bool,
    *,
    latent_dim: int = DEFAULTS.latent_dim,
    num_components: int = DEFAULTS.num_components,
    architecture: str = DEFAULTS.architecture,
    hidden_units: tuple[int, ...] = DEFAULTS.hidden_units,
    conv_filters: tuple[int, int] = DEFAULTS.conv_filters,
    likelihood: str = DEFAULTS.decoder,
    seed: int | None = None,
    encoder_hidden_units: tuple[int, ...] | None = None,
    shared_trunk: bool = DEFAULTS.shared_trunk,
    gaussian: bool = False,
    per_example_proportions: bool = DEFAULTS.per_example_proportions,
) -> tuple[RecursiveMixtureEncoder | GaussianEncoder, keras.layers.Layer]:
    """Encoder and decoder for images `[H, W, C]` = `image_shape`: the decoder mirrors the encoder's widths and
    filters and is Bernoulli for `binary` data and Gaussian otherwise (unless `likelihood` names one).
    `encoder_hidden_units` gives the encoder other widths than the decoder's mirror (e.g. a wider encoder);
    `shared_trunk` one trunk with a head per component (see `RecursiveMixtureEncoder`; with one component the
    trunk and its head are one network, built as such, so a VAE's weights do not depend on it); `gaussian` makes it a
    plain `GaussianEncoder` (SA-VAE; `num_components` and `shared_trunk` are then ignored);
    `per_example_proportions` gives the mixture per-example proportions eps_m(x). The defaults are the
    recommended model's (`config.DEFAULTS`)."""
    settings = dict(latent_dim=latent_dim, architecture=architecture,
                    hidden_units=encoder_hidden_units or hidden_units, conv_filters=conv_filters, seed=seed)
    if gaussian:
        encoder = GaussianEncoder(**settings)
    else:
        encoder = RecursiveMixtureEncoder(
            max_components=num_components, shared_trunk=uses_shared_trunk(shared_trunk, num_components),
            per_example_proportions=per_example_proportions, **settings)
    likelihood = likelihood if likelihood != "auto" else ("bernoulli" if binary else "gaussian")
    decoder = make_decoder(
        likelihood, image_shape, architecture=architecture, hidden_units=tuple(reversed(hidden_units)),
        conv_filters=tuple(reversed(conv_filters)),
    )
    return encoder, decoder


def encoder_parameter_count(image_shape: tuple[int, int, int], **encoder_kwargs) -> int:
    """Parameters of a `RecursiveMixtureEncoder(**encoder_kwargs)` built for images `[H, W, C]`."""
    encoder = RecursiveMixtureEncoder(**encoder_kwargs)
    encoder.ensure_built((None, *image_shape))
    return int(sum(np.prod(v.shape) for v in encoder.weights if v.dtype != "int32"))


def equal_parameter_hidden_units(
    image_shape: tuple[int, int, int], hidden_units: tuple[int, ...], num_components: int, **encoder_kwargs
) -> tuple[int, ...]:
    """Widths of one Gaussian encoder with about as many parameters as `num_components` independent encoders of
    `hidden_units` (all widths scaled by one factor, found by bisection; e.g. 200,200 x 4 -> 585,585 on MNIST)."""
    encoder_kwargs = {**encoder_kwargs, "shared_trunk": False}  # M networks, whatever the encoder's default
    target = encoder_parameter_count(
        image_shape, max_components=num_components, hidden_units=hidden_units, **encoder_kwargs)

    def widths(factor: float) -> tuple[int, ...]:
        return tuple(max(1, round(factor * u)) for u in hidden_units)

    low, high = 1.0, float(num_components) + 1.0  # the count grows at least linearly in the factor
    for _ in range(40):
        middle = 0.5 * (low + high)
        count = encoder_parameter_count(image_shape, max_components=1, hidden_units=widths(middle), **encoder_kwargs)
        low, high = (middle, high) if count < target else (low, middle)
    return min((widths(low), widths(high)), key=lambda w: abs(
        encoder_parameter_count(image_shape, max_components=1, hidden_units=w, **encoder_kwargs) - target))


def build_model(
    config: RunConfig, image_shape: tuple[int, int, int], binary: bool
) -> RecursiveMixtureVAE | SemiAmortizedVAE:
    """The unbuilt model that `config` describes, for images `[H, W, C]` = `image_shape`: a `SemiAmortizedVAE` for
    `method="savae"`, else a `RecursiveMixtureVAE`."""
    encoder_hidden_units = None
    if config.encoder_parameters_of:
        encoder_hidden_units = equal_parameter_hidden_units(
            tuple(image_shape), config.hidden_units, config.encoder_parameters_of, latent_dim=config.latent_dim,
            architecture=config.architecture)
    encoder, decoder = build_networks(
        image_shape, binary, latent_dim=config.latent_dim, num_components=config.num_components,
        architecture=config.architecture, hidden_units=config.hidden_units, conv_filters=config.conv_filters,
        likelihood=config.decoder, seed=config.seed, per_example_proportions=config.per_example_proportions,
        shared_trunk=config.shared_trunk, encoder_hidden_units=encoder_hidden_units,
        gaussian=config.method == "savae",
    )
    if config.method == "savae":
        return SemiAmortizedVAE(
            encoder, decoder, refine_steps=config.refine_steps, refine_lr=config.refine_lr,
            refine_momentum=config.refine_momentum, encoder_objective=config.refine_encoder_objective)
    return RecursiveMixtureVAE(
        encoder, decoder, method=config.method, lambda_kl=config.lambda_kl, schedule=config.schedule,
        bound=config.resolved_bound, component_bound=config.resolved_component_bound,
        num_samples=config.resolved_num_samples,
        encoder_gradient=config.resolved_encoder_gradient, encoder_groups=config.encoder_groups,
        max_log_ratio=config.resolved_max_log_ratio,
        train_previous=config.train_previous,
        eps_search_every=config.eps_search_every, noise_seed=config.resolved_noise_seed,
        nonfinite_inputs=config.nonfinite_inputs,
    )


def build_compiled_model(config: RunConfig, image_shape, binary: bool, *,
                         load_decoder: bool = True) -> RecursiveMixtureVAE | SemiAmortizedVAE:
    """`build_model`, built for `[None, *image_shape]` and compiled with Adam(`learning_rate`) and `jit_compile`,
    its optimizer built. With `decoder_from`, the decoder is frozen, its weights loaded from there (unless
    `load_decoder` is False: a trained run's own weights follow) and the optimizer trains the encoder only."""
    model = build_model(config, tuple(image_shape), binary)
    model.ensure_built((None, *image_shape))
    if config.decoder_from:
        if load_decoder:
            frozen_decoder.load_frozen(model.decoder, config)
        model.decoder.trainable = False
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate), jit_compile=config.jit_compile)
    # Built here, on the model's variables in their order, not by the first step on the order that step applies its
    # gradients in (SA-VAE's differs): a saved state then loads into a fresh model, which builds it so as well.
    model.optimizer.build(model.trainable_variables)
    return model


def check_frozen_decoder(config: RunConfig, image_shape: tuple[int, int, int], binary: bool) -> None:
    """`ConfigError` if `config.decoder_from` names no weights file, or weights that this run's decoder cannot take
    (checked on a decoder of its own, before the run writes anything)."""
    if not config.decoder_from:
        return
    _, decoder = build_networks(
        tuple(image_shape), binary, latent_dim=config.latent_dim, architecture=config.architecture,
        hidden_units=config.hidden_units, conv_filters=config.conv_filters, likelihood=config.decoder)
    decoder.build((None, config.latent_dim))
    frozen_decoder.load_frozen(decoder, config)


def build_preset_model(
    preset: str = "default", *, image_shape: tuple[int, int, int] = (28, 28, 1), binary: bool = True, **settings
) -> RecursiveMixtureVAE:
    """The compiled model of a named preset (`config.PRESETS`; "default": the recommended RME) for images
    `[H, W, C]` = `image_shape`, with any `RunConfig` model or training setting in `settings` over the preset; the
    same model `trainers.train --preset=...` trains. Call `fit` with `tf_rmvae.ComponentSchedule` (as
    `training.run_callbacks` does) so that components join."""
    config = RunConfig.from_preset(preset, **{"model_dir": "(in memory)", **settings}).validate().resolved()
    return build_compiled_model(config, tuple(image_shape), binary)


def load_trained_model(model_dir: str, checkpoint: str | None = None) -> RecursiveMixtureVAE:
    """Rebuilds the model of a run from `model_dir/config.json` and loads `checkpoint` (default: the resume state,
    else the newest per-epoch checkpoint)."""
    config = RunConfig.load(os.path.join(model_dir, run_dir.CONFIG_FILE))
    spec = get_dataset_spec(config.dataset)
    model = build_compiled_model(config, spec.image_shape, spec.binary, load_decoder=False)
    if checkpoint is not None:
        model.load_weights(checkpoint)
        return model
    problems = []
    for path in run_dir.state_candidates(model_dir):
        try:
            model.load_weights(path)
            return model
        except Exception as error:  # noqa: BLE001 - a damaged file may fail in h5py or in Keras: try the next one
            problems.append(f"{path}: {str(error).splitlines()[0]}")
    raise FileNotFoundError(f"No loadable weights in {model_dir} ({run_dir.BACKUP_DIR}/ or "
                            f"{run_dir.CHECKPOINT_DIR}/): {problems}")
