"""`RunConfig`: every setting of one training run, validated, saved as `config.json` beside the run.

    config = RunConfig(method="rme", num_components=4, epochs=10)
    config.save("runs/quick/config.json")
    RunConfig.load("runs/quick/config.json") == config          # True
    config.mismatches(other)                                     # settings that would change the trained model
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from typing import Any

from tf_rmvae.choices import (
    ARCHITECTURES,
    BOUND_SETTINGS,
    DATA_ORDERS,
    DECODERS,
    ENCODER_GRADIENT_SETTINGS,
    NONFINITE_POLICIES,
    PRECISIONS,
    RECURSIVE_METHODS,
    REFINE_OBJECTIVES,
    RUN_METHODS,
    SCHEDULES,
    STRATEGIES,
    adds_components,
    encoder_objective_problem,
    resolve_bound,
    resolve_component_bound,
    resolve_encoder_gradient,
    resolve_epochs_per_component,
    resolve_max_log_ratio,
    resolve_num_samples,
    uses_shared_trunk,
)
from tf_rmvae.files import write_json_atomic

MODEL_DIR_PLACEHOLDER = "<model_dir>"
# Exports land in the run directory; publishing one into a served directory is a separate step (`export.publish`).
DEFAULT_EXPORT_DIR = f"{MODEL_DIR_PLACEHOLDER}/export"

# Fields that may change between an interrupted run and its resumption without changing what the completed epochs
# trained: how long to train (more epochs extend a run), how to report, evaluate and export. Every other field must
# match the run's saved `config.json`.
RESUMABLE_FIELDS = frozenset({
    "epochs", "verbose", "iwae_samples", "eval_examples", "eval_chunk_size", "jit_compile", "export_dir",
    "export_name", "export_encoder", "export_below_chance", "keep_checkpoints", "model_dir", "data_dir",
    "debug_batch_sleep",
    # The training state (weights, recursion state, optimizer, epoch) is device-independent and every epoch's data is
    # a function of (seed, epoch) with the same global batch on any strategy: a run may resume on other hardware.
    "strategy",
    # When to stop and what to draw: the completed epochs trained the same either way.
    "early_stopping_patience", "image_every_epochs",
    # A preset only names the other settings, which are compared themselves.
    "preset",
    # A path, which may change (a copied or moved file); the decoder it names is `decoder_sha256`, compared.
    "decoder_from",
})

# Values of fields that a saved `config.json` may lack because it was written before the field existed: the behaviour
# of that version (runs saved before the validation split held no validation examples out of training; before
# `bound` was a setting, every method trained on the ELBO; before `component_bound` and `num_samples`, one sample per
# component on ELBO criteria; before `encoder_gradient`, the ordinary reparameterised gradient).
LEGACY_DEFAULTS = {"validation_examples": 0, "bound": "elbo", "shared_trunk": False, "component_bound": "elbo",
                   "num_samples": 1, "encoder_gradient": "reparam"}
# Defaults that depend on the method, which the trainer applies where the flag was not given: a VAE has one
# component; MixVAE trained far worse on one shared trunk than on M networks (below a VAE at 5
# epochs; docs/results.md), so it keeps M independent networks. SA-VAE has one Gaussian and no serving export.
METHOD_DEFAULTS = {"vae": {"num_components": 1}, "savae": {"num_components": 1, "export_dir": ""},
                   "mixture": {"shared_trunk": False}}

#: Named models: the settings each preset fixes; every other setting keeps its `RunConfig` default, and an explicit
#: flag or argument overrides the preset (`RunConfig.from_preset`). "default" is the recommended model (the defaults
#: themselves); "paper" the paper's recursion (ELBO bound and criteria, one sample per component, independent
#: networks, version 0.1's lambda); "posterior" the model whose q(z|x) is the best posterior (eight heads, one sample
#: each, ELBO criteria: the highest test ELBO, the smallest amortization gap); "iwae" and "iwae_dreg" the baselines
#: with as many decoder passes per step as the default (k = 16, the second with DReG encoder gradients).
PRESETS = {
    "default": {},
    "paper": dict(method="rme", num_components=4, shared_trunk=False, bound="elbo", component_bound="elbo",
                  num_samples=1, lambda_kl=0.3),
    "posterior": dict(method="rme", num_components=8, bound="iw", component_bound="elbo", num_samples=1),
    "iwae": dict(method="vae", num_components=1, bound="iw", num_samples=16),
    "iwae_dreg": dict(method="vae", num_components=1, bound="iw", num_samples=16, encoder_gradient="dreg"),
}

#: `validation_examples` value that asks for the default hold-out (`tf_rmvae.data.default_validation_examples`).
AUTO_VALIDATION = -1


class ConfigError(ValueError):
    """An invalid setting, or a setting that contradicts the run already in `model_dir`."""


def setting(default: Any, help: str, *, choices: tuple[str, ...] = (), required: bool = False) -> Any:
    """A `RunConfig` field: its default and its help text, which is also the help of its flag in
    `trainers/train.py`.

    `choices`: the allowed values (`tf_rmvae.choices`; the flag is an enum). `required`: the flag has no
    default and the program refuses to start without it.
    """
    metadata = {"help": help, "choices": tuple(choices), "required": required}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Settings of one training run. Each setting is defined once below with its default and help text
    (`setting`); `trainers/train.py` makes a flag of the same name, default and help from each field.

    Groups: data, model, training, evaluation, output (the run directory and export), hardware (strategy and
    precision; `batch_size` is the GLOBAL batch, split evenly over the replicas), and a testing aid.
    """

    # Data
    dataset: str = setting("rmvae_mnist", "Dataset name (tf_rmvae.data.SUPPORTED_DATASETS).")
    data_dir: str = setting("", "tfds data directory ('' = tfds default).")
    train_examples: int = setting(
        0, "Use the first N training examples (0 = all those left after the validation hold-out).")
    validation_examples: int = setting(
        AUTO_VALIDATION,
        f"Hold out the last N examples of the training split for validation after every epoch "
        f"({AUTO_VALIDATION} = min(10000, a sixth of the split): 10000 for MNIST; 0 = no validation).")
    batch_size: int = setting(
        100, "GLOBAL training batch size: split evenly over all replicas (a multiple of their number).")
    data_order: str = setting(
        "epoch_keyed", "epoch_keyed: epoch e's shuffle and binarization are a function of (seed, e), so a resumed run "
        "trains on the batches of an uninterrupted one; reshuffled: one pipeline reshuffled on every pass (how the "
        "benchmark's cells train; a resumed run sees other batches).", choices=DATA_ORDERS)
    # Model
    preset: str = setting(
        "default", "Named model whose settings apply where no flag gives them: default (the recommended RME), paper "
        "(the paper's recursion), posterior (the best q(z|x)), iwae, iwae_dreg (baselines); see docs/flags.md.",
        choices=tuple(PRESETS))
    method: str = setting(
        "rme", "rme: Recursive Mixture Estimation; vae: single Gaussian; mixture: jointly trained mixture; "
        "boosting: boosting VI; savae: SA-VAE (one Gaussian encoder refined per example, --refine_*).",
        choices=RUN_METHODS)
    num_components: int = setting(
        3, "Mixture components M (default 1 for --method=vae and savae, which allow only 1).")
    shared_trunk: bool = setting(
        True, "Mixture methods: one encoder trunk with a head per component (many components at little cost); "
        "--noshared_trunk: M independent networks (the default for --method=mixture, which trains worse on one "
        "trunk). Ignored with one component.")
    latent_dim: int = setting(32, "Latent dimension D.")
    encoder_parameters_of: int = setting(
        0, "One-component methods: widen the encoder (every width by one factor) to about as many parameters as N "
        "encoders of --hidden_units (the equal-parameter VAE baseline; the decoder keeps --hidden_units); 0 = off.")
    architecture: str = setting("dense", "Encoder and decoder networks.", choices=ARCHITECTURES)
    hidden_units: tuple[int, ...] = setting(
        (200, 200), "Encoder dense widths (comma list); the decoder mirrors them.")
    conv_filters: tuple[int, ...] = setting(
        (32, 64), "Encoder conv filters for --architecture=conv (2 values); the decoder mirrors them.")
    decoder: str = setting(
        "auto", "Likelihood p(x|z); auto: Bernoulli for binary datasets, Gaussian otherwise.",
        choices=DECODERS)
    lambda_kl: float = setting(
        1.0, "RME's KL weight lambda (>= 0); lambda = 1 relies on the --max_log_ratio cap (uncapped, it collapses "
        "components).")
    max_log_ratio: float = setting(
        5.0, "Cap of each sample's log h - log q_prev in RME's KL term (< 0: uncapped, which runs off).")
    train_previous: bool = setting(
        True, "Stage-wise: keep training earlier components on their criteria (false: freeze them; needs "
        "--noshared_trunk).")
    nonfinite_inputs: str = setting(
        "raise", "A batch with NaN/Inf pixels: raise (stop, naming the batch) or skip those examples.",
        choices=NONFINITE_POLICIES)
    schedule: str = setting(
        "stagewise", "stagewise: components join one at a time (RME); sweep: all components every step.",
        choices=SCHEDULES)
    bound: str = setting(
        "auto", "What the decoder and mixing proportions train on: elbo (stratified ELBO) or iw (stratified "
        "importance-weighted bound; with --method=vae and --num_samples=k: IWAE); auto: iw for --method=rme, "
        "elbo otherwise.", choices=BOUND_SETTINGS)
    component_bound: str = setting(
        "auto", "RME: the bound in each component's criterion: elbo (the paper's ELBO + lambda KL) or iw (the "
        "component's importance-weighted bound over every sample drawn from it; first stage = IWAE with "
        "--bound=iw); auto: iw for --method=rme on --bound=iw, elbo otherwise.", choices=BOUND_SETTINGS)
    num_samples: int = setting(
        0, "Reparameterised samples per component per step (0 = auto: 5 for --method=rme with importance-weighted "
        "component criteria, 1 otherwise).")
    encoder_gradient: str = setting(
        "auto", "How the encoder's importance-weighted objective is differentiated: reparam (ordinary) or dreg "
        "(doubly reparameterised, DReG): --method=vae on --bound=iw (IWAE-DReG), --method=rme on "
        "--component_bound=iw (DReG on each component's bound) or --method=mixture on --bound=iw (the stratified "
        "bound's DReG for the components: each sample's score term for its own component reparameterised); gdreg: "
        "--method=mixture on --bound=iw, the generalized DReG (every component's score terms reparameterised); "
        "auto: dreg for --method=rme on importance-weighted component criteria, reparam otherwise.",
        choices=ENCODER_GRADIENT_SETTINGS)
    encoder_groups: int = setting(
        1, "--method=vae on --bound=iw: G > 1 trains the encoder on MIWAE(G, num_samples / G) and the decoder on "
        "IWAE(num_samples) (PIWAE); 1: both on the bound.")
    eps_search_every: int = setting(50, "Steps between mixing-proportion line searches.")
    refine_steps: int = setting(10, "--method=savae: gradient steps refining each example's Gaussian.")
    refine_lr: float = setting(0.05, "--method=savae: step size of the refinement.")
    refine_momentum: float = setting(0.5, "--method=savae: momentum of the refinement (0: plain gradient steps).")
    refine_encoder_objective: str = setting(
        "unrolled", "--method=savae: the encoder trains on the ELBO after the unrolled refinement, or on its own "
        "(amortized) ELBO.", choices=REFINE_OBJECTIVES)
    per_example_proportions: bool = setting(
        False, "Per-example mixing proportions eps_m(x): the searched logit plus a small head's bounded offset.")
    decoder_from: str = setting(
        "", "Train only an encoder, against the frozen decoder of a trained model: the .weights.h5 file of a model "
        "with a decoder (as Model.save_weights writes it; a run's checkpoint) or a run directory (its best "
        "checkpoint, else its last state); its decoder must fit --hidden_units, --latent_dim, --architecture and "
        "--decoder. '' = train the decoder too.")
    decoder_sha256: str = setting(
        "", "SHA-256 of the --decoder_from weights file ('' = computed when the run starts; the run saves it, so a "
        "resumed run is refused if the file now holds another decoder; given: the file must match it).")
    # Training
    epochs: int = setting(10, "Training epochs (a larger value extends a finished or resumed run).")
    epochs_per_component: int = setting(
        0, "Stage-wise RME/boosting: epochs before the next component joins (0 = auto: ceil(epochs / M), the "
        "components spread evenly over --epochs; a resumed or extended run keeps its schedule).")
    early_stopping_patience: int = setting(
        0, "Stop after this many epochs without a better validation value of the bound trained (the ELBO, or the "
        "importance-weighted bound of --bound=iw, which auto picks for RME; 0 = train every epoch).")
    learning_rate: float = setting(1e-3, "Adam learning rate.")
    seed: int = setting(0, "Seed of initialisation, shuffling and binarization.")
    noise_seed: int = setting(
        -1, "Seed of the training noise (the reparameterisation samples; -1 = --seed). The benchmark's cells keep 0 "
        "for every seed, as they trained before they were run configurations.")
    jit_compile: bool = setting(False, "Compile the train step with XLA.")
    # verbose > 0 also prints the stage lines (`tf_rmvae.run.report`).
    verbose: int = setting(1, "Keras progress: 0 silent, 1 progress bar, 2 one line per epoch.")
    # Evaluation
    eval_examples: int = setting(1000, "Test examples evaluated (0 = the whole test split).")
    iwae_samples: int = setting(100, "Importance samples K of the test log-likelihood.")
    eval_chunk_size: int = setting(100, "Importance samples drawn at once.")
    # Output. In `export_dir`, a leading `<model_dir>` stands for the run directory (`resolved_export_dir`).
    model_dir: str = setting(
        "", "Run directory: config, checkpoints, logs, metrics, figures. Required.", required=True)
    export_dir: str = setting(
        DEFAULT_EXPORT_DIR,
        "Base directory of TF-Serving exports, inside the run directory by default ('' disables export). "
        "Publish an export for serving with `python -m trainers.publish`.")
    export_name: str = setting("", "Served model name ('' = <dataset>_<method>).")
    export_encoder: bool = setting(False, "Also export the encoder alone (<name>_encoder).")
    export_below_chance: bool = setting(
        False, "Export even a model whose test ELBO is below chance (refused by default).")
    keep_checkpoints: int = setting(3, "Per-epoch checkpoints kept (0 = all).")
    image_every_epochs: int = setting(
        2, "TensorBoard reconstructions and samples every N epochs and after the last (0 = none).")
    # Hardware
    strategy: str = setting(
        "default", "tf.distribute strategy: default (one device), mirrored (all GPUs of this host), "
        "multi_worker_mirrored (the cluster in TF_CONFIG), tpu. May change when resuming a run.",
        choices=STRATEGIES)
    mixed_precision: str = setting(
        "float32", "Keras dtype policy; distributions are always computed in float32.", choices=PRECISIONS)
    # Testing
    debug_batch_sleep: float = setting(0.0, "Testing only: seconds to sleep after every training batch.")

    def __post_init__(self):
        # Lists (from JSON or flags) become tuples so configs compare and hash by value.
        object.__setattr__(self, "hidden_units", tuple(int(u) for u in self.hidden_units))
        object.__setattr__(self, "conv_filters", tuple(int(f) for f in self.conv_filters))

    # ------------------------------------------------------------------ validation
    def validate(self) -> RunConfig:
        """Raises `ConfigError` with a message naming the flag if any setting is invalid; returns `self`."""
        def check(condition: bool, message: str):
            if not condition:
                raise ConfigError(message)

        for field in dataclasses.fields(self):  # the settings with a fixed set of values (`setting(choices=...)`)
            allowed, value = field.metadata.get("choices", ()), getattr(self, field.name)
            check(not allowed or value in allowed,
                  f"--{field.name} must be one of {', '.join(allowed)}; got {value!r}.")
        check(self.component_bound != "iw" or self.method == "rme",
              f"--component_bound=iw applies to --method=rme only; got --method={self.method}.")
        check(self.num_samples >= 0, f"--num_samples must be >= 1, or 0 for auto; got {self.num_samples}.")
        problem = encoder_objective_problem(self.method, self.bound, self.component_bound, self.num_samples,
                                            self.encoder_gradient, self.encoder_groups)
        check(problem is None, f"--{problem}" if problem else "")
        check(self.num_components >= 1, f"--num_components must be >= 1; got {self.num_components}.")
        check(self.method not in ("vae", "savae") or self.num_components == 1,
              f"--method={self.method} trains a single-component encoder: use --num_components=1 (got "
              f"{self.num_components}), or --method=rme/mixture/boosting for a mixture encoder.")
        check(self.method != "savae" or not self.resolved_export_dir,
              "--method=savae has no serving export (its inference is an optimisation): use --export_dir=''.")
        check(self.method != "savae" or (self.resolved_bound, self.resolved_num_samples) == ("elbo", 1),
              "--method=savae trains on the ELBO with one sample: use --bound=elbo (or auto) and --num_samples=1.")
        check(self.encoder_parameters_of >= 0 and (self.encoder_parameters_of == 0 or self.num_components == 1),
              f"--encoder_parameters_of must be >= 0 and needs --num_components=1; got {self.encoder_parameters_of} "
              f"with {self.num_components} components.")
        check(self.refine_steps >= 0 and self.refine_lr >= 0 and 0 <= self.refine_momentum < 1,
              f"--refine_steps and --refine_lr must be >= 0 and --refine_momentum in [0, 1); got {self.refine_steps}, "
              f"{self.refine_lr}, {self.refine_momentum}.")
        check(not self.decoder_sha256 or bool(self.decoder_from),
              "--decoder_sha256 pins the weights of --decoder_from, which is not given.")
        check(not self.decoder_sha256 or re.fullmatch(r"[0-9a-f]{64}", self.decoder_sha256) is not None,
              f"--decoder_sha256 must be 64 lowercase hex digits; got {self.decoder_sha256!r}.")
        check(self.noise_seed >= -1, f"--noise_seed must be >= 0, or -1 for --seed; got {self.noise_seed}.")
        check(self.latent_dim >= 1, f"--latent_dim must be >= 1; got {self.latent_dim}.")
        check(len(self.hidden_units) >= 1 and min(self.hidden_units) >= 1,
              f"--hidden_units must be a comma-separated list of positive widths; got {self.hidden_units}.")
        check(self.architecture != "conv" or (len(self.conv_filters) == 2 and min(self.conv_filters) >= 1),
              f"--conv_filters must be two positive filter counts (encoder order; the decoder mirrors them); "
              f"got {self.conv_filters}.")
        for name in ("lambda_kl", "max_log_ratio", "learning_rate", "debug_batch_sleep", "refine_lr",
                     "refine_momentum"):
            check(math.isfinite(getattr(self, name)), f"--{name} must be a finite number; got {getattr(self, name)}.")
        check(self.lambda_kl >= 0, f"--lambda_kl must be a number >= 0; got {self.lambda_kl}.")
        check(self.epochs >= 1, f"--epochs must be >= 1; got {self.epochs}.")
        check(self.epochs_per_component >= 0,
              f"--epochs_per_component must be >= 1, or 0 for auto; got {self.epochs_per_component}.")
        check(self.train_previous or not (self.adds_components and self.effective("shared_trunk")),
              "--train_previous=false freezes earlier components, but with --shared_trunk their common trunk keeps "
              "training on the newest component's criterion: add --noshared_trunk (M independent networks).")
        check(self.eps_search_every >= 1, f"--eps_search_every must be >= 1; got {self.eps_search_every}.")
        check(self.batch_size >= 1, f"--batch_size must be >= 1; got {self.batch_size}.")
        check(not 0 < self.train_examples < self.batch_size,
              f"--batch_size={self.batch_size} is larger than --train_examples={self.train_examples}: an epoch would "
              "have no step.")
        check(self.learning_rate > 0, f"--learning_rate must be > 0; got {self.learning_rate}.")
        check(self.train_examples >= 0, f"--train_examples must be >= 0 (0 = all); got {self.train_examples}.")
        check(self.validation_examples >= AUTO_VALIDATION,
              f"--validation_examples must be >= 0, or -1 for the default; got {self.validation_examples}.")
        check(self.early_stopping_patience >= 0,
              f"--early_stopping_patience must be >= 0 (0 = off); got {self.early_stopping_patience}.")
        check(not (self.early_stopping_patience and self.validation_examples == 0),
              f"--early_stopping_patience={self.early_stopping_patience} stops on the validation bound, and "
              "--validation_examples=0 holds out none: hold some out (-1 for the default) or drop the patience.")
        check(self.image_every_epochs >= 0,
              f"--image_every_epochs must be >= 0 (0 = no images); got {self.image_every_epochs}.")
        check(self.eval_examples >= 0, f"--eval_examples must be >= 0 (0 = all); got {self.eval_examples}.")
        check(self.iwae_samples >= 1, f"--iwae_samples must be >= 1; got {self.iwae_samples}.")
        check(self.eval_chunk_size >= 1, f"--eval_chunk_size must be >= 1; got {self.eval_chunk_size}.")
        check(self.verbose in (0, 1, 2), f"--verbose must be 0, 1 or 2; got {self.verbose}.")
        check(self.keep_checkpoints >= 0, f"--keep_checkpoints must be >= 0; got {self.keep_checkpoints}.")
        check(self.debug_batch_sleep >= 0, f"--debug_batch_sleep must be >= 0; got {self.debug_batch_sleep}.")
        check(bool(self.model_dir), "--model_dir is required (the directory for checkpoints, logs and metrics).")
        return self

    @property
    def adds_components(self) -> bool:
        """Whether components join one at a time during training (stage-wise recursive methods)."""
        return adds_components(self.method, self.schedule, self.num_components)

    def active_components_at(self, epoch: int) -> int:
        """Active components during 0-based `epoch` (the `ComponentSchedule` rule for stage-wise methods)."""
        if self.adds_components:
            return min(self.num_components, 1 + epoch // self.resolved_epochs_per_component)
        return 1 if self.method == "vae" else self.num_components

    @property
    def resolved_export_dir(self) -> str:
        """`export_dir` with a leading `<model_dir>` replaced by the run directory ("" when export is disabled)."""
        if self.export_dir.startswith(MODEL_DIR_PLACEHOLDER):
            return self.model_dir + self.export_dir[len(MODEL_DIR_PLACEHOLDER):]
        return self.export_dir

    @property
    def resolved_export_name(self) -> str:
        return self.export_name or f"{self.dataset}_{self.method}"

    # ------------------------------------------------------------------ comparison and JSON
    @property
    def resolved_bound(self) -> str:
        """The bound the run trains on ("auto": the method's default, `choices.resolve_bound`)."""
        return resolve_bound(self.method, self.bound)

    @property
    def resolved_component_bound(self) -> str:
        """The bound of RME's component criteria ("auto": `choices.resolve_component_bound`)."""
        return resolve_component_bound(self.method, self.bound, self.component_bound)

    @property
    def resolved_num_samples(self) -> int:
        """Samples per component per step (0, "auto": `choices.resolve_num_samples`)."""
        return resolve_num_samples(self.method, self.bound, self.component_bound, self.num_samples)

    @property
    def resolved_epochs_per_component(self) -> int:
        """Epochs per stage (0, "auto": `choices.resolve_epochs_per_component` over this config's `epochs`)."""
        return resolve_epochs_per_component(self.epochs_per_component, self.epochs, self.num_components)

    def resolved(self, saved: RunConfig | None = None) -> RunConfig:
        """This config with every "auto" setting replaced by what it means, as a run saves it: a later default
        cannot change what a resumed run trains. An automatic schedule is the `saved` run's where there is one
        (extending a run with more --epochs keeps its stages), else spread over this config's `epochs`."""
        schedule = self.resolved_epochs_per_component
        if not self.epochs_per_component and saved is not None:
            schedule = saved.resolved_epochs_per_component  # (a config saved unresolved holds 0)
        return self.replace(bound=self.resolved_bound, component_bound=self.resolved_component_bound,
                            num_samples=self.resolved_num_samples, epochs_per_component=schedule,
                            encoder_gradient=self.resolved_encoder_gradient)

    @property
    def resolved_encoder_gradient(self) -> str:
        """The encoder's gradient estimator ("auto": `choices.resolve_encoder_gradient`)."""
        return resolve_encoder_gradient(self.method, self.bound, self.component_bound, self.encoder_gradient)

    @property
    def resolved_noise_seed(self) -> int:
        """The seed of the training noise (`noise_seed`, or `seed` where it is -1)."""
        return self.seed if self.noise_seed < 0 else self.noise_seed

    @property
    def resolved_max_log_ratio(self) -> float | None:
        """The cap of RME's and boosting's KL log-ratio, or None for uncapped (any negative `max_log_ratio`)."""
        return resolve_max_log_ratio(self.max_log_ratio)

    def effective(self, name: str) -> Any:
        """What setting `name` means for the trained model: `bound`, `component_bound` and `num_samples` resolved
        (`resolved_bound`, ...; "auto" means what it meant when a run saved it), `shared_trunk` only
        with several components (one component is one network either way), `epochs_per_component` only where
        components join one at a time (`adds_components`; None otherwise), `lambda_kl` only for RME with several
        components and `max_log_ratio` only for RME or boosting with several (the only criteria that read them; None
        otherwise; the cap resolved, `resolved_max_log_ratio`: every negative cap is `inf`, uncapped), the `refine_*`
        settings only for SA-VAE, `noise_seed` resolved (`resolved_noise_seed`); any other field as it is."""
        several = self.num_components > 1
        if name == "noise_seed":
            return self.resolved_noise_seed
        if name.startswith("refine_"):
            return getattr(self, name) if self.method == "savae" else None
        if name == "lambda_kl":
            return self.lambda_kl if self.method == "rme" and several else None
        if name == "max_log_ratio":
            if not (self.method in RECURSIVE_METHODS and several):
                return None
            cap = self.resolved_max_log_ratio
            return math.inf if cap is None else cap
        if name == "bound":
            return self.resolved_bound
        if name == "component_bound":
            return self.resolved_component_bound
        if name == "num_samples":
            return self.resolved_num_samples
        if name == "encoder_gradient":
            return self.resolved_encoder_gradient
        if name == "shared_trunk":
            return uses_shared_trunk(self.shared_trunk, self.num_components)
        if name == "epochs_per_component":
            return self.resolved_epochs_per_component if self.adds_components else None
        return getattr(self, name)

    def identity(self) -> str:
        """A stable hash (16 hex digits) of what the run trains: the `effective` value of every field outside
        `RESUMABLE_FIELDS`. Two configs without `mismatches` have the same identity, whatever their directories,
        evaluation or spelling ("auto" or what it means)."""
        values = {f.name: self.effective(f.name) for f in dataclasses.fields(self) if f.name not in RESUMABLE_FIELDS}
        if not self.decoder_sha256:  # a run that trains its decoder: the identity it had before the setting existed
            del values["decoder_sha256"]
        text = json.dumps(values, sort_keys=True, default=list)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]

    def mismatches(self, other: RunConfig) -> dict[str, tuple[Any, Any]]:
        """`{field: (self's value, other's value)}` for fields not in `RESUMABLE_FIELDS` whose `effective` values
        differ: a run saved with `bound="elbo"` resumes under "auto" where that means "elbo", and a VAE saved before
        the shared-trunk default resumes under it."""
        return {
            f.name: (getattr(self, f.name), getattr(other, f.name))
            for f in dataclasses.fields(self)
            if f.name not in RESUMABLE_FIELDS and self.effective(f.name) != other.effective(f.name)
        }

    @classmethod
    def from_preset(cls, preset: str = "default", **settings) -> RunConfig:
        """The config of the named preset (`PRESETS`) with `settings` over it, and the method's own defaults
        (`METHOD_DEFAULTS`) where neither names them. Not validated (`validate`)."""
        if preset not in PRESETS:
            raise ConfigError(f"--preset must be one of {', '.join(PRESETS)}; got {preset!r}.")
        values = {**PRESETS[preset], **settings}
        method = values.get("method", cls.method)
        for name, value in METHOD_DEFAULTS.get(method, {}).items():
            values.setdefault(name, value)
        return cls(preset=preset, **values)

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Builds a config from a dict; unknown keys raise `ConfigError` (a config from another version), and keys
        of `LEGACY_DEFAULTS` that are missing take the behaviour of the version that saved the dict."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"Unknown RunConfig fields {unknown}.")
        return cls(**{**LEGACY_DEFAULTS, **values})

    def save(self, path: str | os.PathLike) -> None:
        """Writes the config as JSON (atomically: a temporary file renamed into place)."""
        write_json_atomic(path, self.to_dict(), sort_keys=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RunConfig:
        """The config saved at `path`; `ConfigError` if the file is not a config (truncated, edited, other JSON)."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                values = json.load(f)
            if not isinstance(values, dict):
                raise TypeError(f"a JSON {type(values).__name__}, not an object")
            return cls.from_dict(values)
        except (ValueError, TypeError) as error:  # JSONDecodeError is a ValueError
            raise ConfigError(
                f"{path} is not a readable run configuration ({error}). Restore it (a finished run's settings are also "
                "in metrics.json), or use a new --model_dir."
            ) from None


#: The settings of the "default" preset, the recommended model: the defaults that the library's classes read
#: (`RecursiveMixtureVAE`, `RecursiveMixtureTrainer`, `RecursiveMixtureEncoder`, `model_factory.build_networks`), so
#: that each is written once, in the fields above. "auto" values are resolved where a class is built
#: (`tf_rmvae.choices`), as `RunConfig.resolved` resolves them.
DEFAULTS = RunConfig.from_preset("default")
