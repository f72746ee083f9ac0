"""What a benchmark run trains: its settings (`BenchmarkConfig`) and the cells they expand to.

One *cell* is one (method, schedule, lambda, number of components, bound, SA-VAE steps, seed): one trained model,
named by `Cell.key` (its directory under `<run_name>_cells/`) and `Cell.label` (its name within one seed). What
trains it is a run configuration (`run_config`), trained by the library's run code (`tf_rmvae.run.training.fit`).

    config = BenchmarkConfig(methods=("vae", "rme"), lambdas=(0.3,), seeds=(0, 1))
    [c.key for c in cells(config)]  # ['vae_seed0', 'rme_M4_lambda0.3_seed0', 'vae_seed1', ...]
    run_config(config, cells(config)[1], "cells/rme_M4_lambda0.3_seed0")  # its RunConfig
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from benchmarks.cell_files import cell_key
from tf_rmvae.choices import RECURSIVE_METHODS
from tf_rmvae.choices import adds_components as components_join_one_at_a_time
from tf_rmvae.config import RunConfig

ALL_METHODS = ("vae", "mixture", "boosting", "rme", "savae", "vae_equal_params", "iwae", "piwae")
# Methods with one Gaussian encoder: vae_equal_params is a VAE whose encoder has as many parameters as M encoders;
# iwae is a VAE trained on the IWAE bound with k = M samples (as many decoder passes per step as RME's M slots);
# piwae is PIWAE(M, K = num_samples): the encoder on MIWAE(M, K), the decoder on IWAE(M K).
SINGLE_COMPONENT_METHODS = ("vae", "savae", "vae_equal_params", "iwae", "piwae")
# Methods whose encoder gradient is swept over `encoder_gradients` (rme only with importance-weighted criteria,
# mixture only on the "iw" bound).
ENCODER_GRADIENT_METHODS = ("iwae", "piwae", "rme", "mixture")
BOUND_METHODS = ("rme", "mixture")  # methods whose decoder/mixture bound is swept over `bounds`
LEGACY_SAVAE_STEPS = 10  # the SA-VAE cell labelled plain "savae" (earlier runs had one SA-VAE cell)


#: Where a benchmark cell's settings differ from `RunConfig`'s defaults (the trainer's): the base configuration
#: of every cell, written here once; `BenchmarkConfig`'s defaults and the benchmark's flags read it (`BASE`). Longer
#: runs evaluated on the whole test split with K = 5000; wider networks; one sample per component slot and M
#: independent networks unless a flag asks for more; one line per epoch. As the cells trained before they were run
#: configurations: the reparameterisation noise keyed by seed 0 for every seed (`noise_seed`), no validation
#: hold-out, one tf.data pipeline reshuffled every epoch (`data_order`); nothing drawn or exported, one checkpoint
#: kept (the benchmark evaluates the model itself, `benchmarks.harness`).
BASE_SETTINGS = dict(
    epochs=20, hidden_units=(500, 500), iwae_samples=5000, eval_examples=0, num_samples=1, shared_trunk=False,
    verbose=2, noise_seed=0, validation_examples=0, data_order="reshuffled", image_every_epochs=0, keep_checkpoints=1,
    export_dir="",
)
BASE = RunConfig(**BASE_SETTINGS)
#: Run settings that each cell sets itself (swept, or given by its method and the run's cell directory), and those
#: with no meaning in a benchmark (it exports nothing; `jit_compile` is `BenchmarkConfig`'s own, with "auto"; the
#: sweep trains every cell's decoder, and only `benchmarks.amortization` freezes one, per encoder it trains), and those
#: that would make a cell's reported model another than its last epoch's, the one `benchmarks.rescore` scores (a
#: validation hold-out restores the best epoch; early stopping ends a cell before its epochs): no benchmark flag, no
#: `BenchmarkConfig.settings` entry. Every other `RunConfig` field is a benchmark flag.
CELL_SETTINGS = frozenset({
    "method", "num_components", "lambda_kl", "schedule", "bound", "component_bound", "encoder_gradient", "seed",
    "refine_steps", "encoder_parameters_of", "encoder_groups", "preset", "model_dir", "export_dir", "export_name",
    "export_encoder", "export_below_chance", "jit_compile", "decoder_from", "decoder_sha256",
    "validation_examples", "early_stopping_patience",
})
#: The run settings with a `BenchmarkConfig` field under another name (the names its committed fingerprints and
#: tables hold; the benchmark's flags of these names are aliases of the `RunConfig` names).
BENCHMARK_NAMES = {
    "max_log_ratio": "rme_max_log_ratio", "train_previous": "rme_train_previous", "refine_lr": "savae_lr",
    "refine_momentum": "savae_momentum", "refine_encoder_objective": "savae_encoder_objective",
    "eval_chunk_size": "iwae_chunk",
}
#: The run settings with a `BenchmarkConfig` field (`BENCHMARK_NAMES` or the same name); the others that are not
#: `CELL_SETTINGS` go in `BenchmarkConfig.settings` where they differ from `BASE`.
FIELD_SETTINGS = (
    "dataset", "data_dir", "train_examples", "batch_size", "architecture", "hidden_units", "latent_dim",
    "max_log_ratio", "train_previous", "eps_search_every", "refine_lr", "refine_momentum", "refine_encoder_objective",
    "per_example_proportions", "shared_trunk", "num_samples", "epochs", "epochs_per_component", "learning_rate",
    "verbose", "eval_examples", "iwae_samples", "eval_chunk_size",
)
#: Every run setting that is a benchmark flag, in `RunConfig`'s order.
FLAG_SETTINGS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name not in CELL_SETTINGS)
OTHER_SETTINGS = tuple(name for name in FLAG_SETTINGS if name not in FIELD_SETTINGS)


@dataclasses.dataclass
class BenchmarkConfig:
    """Everything a benchmark run depends on (saved beside its results): the sweep (methods, lambdas, numbers of
    components, schedules, bounds, component bounds, encoder gradients, SA-VAE steps, seeds) over the run settings
    that every cell shares, whose defaults are `BASE`'s (`RunConfig`'s defaults with `BASE_SETTINGS` over them).

    Run settings with a field here keep the names that committed tables and fingerprints hold (`BENCHMARK_NAMES`:
    `rme_max_log_ratio` is `max_log_ratio`, `savae_lr` is `refine_lr`, `iwae_chunk` is `eval_chunk_size`, ...);
    `settings` holds any other run setting (`OTHER_SETTINGS`, e.g. `conv_filters`, `decoder`) where it differs from
    `BASE` (`{}`: none, and no entry in `to_json`, so the fingerprints of committed cells stay as they are).

    `epochs_per_component = 0` spreads the components over the run: `max(1, epochs // M)` epochs per stage.
    `savae_steps` gives one SA-VAE cell per number of refinement steps; `bounds` ("elbo", "iw") apply to "rme"
    and "mixture" (the decoder and proportions trained on the stratified ELBO or the stratified importance-weighted
    bound); `eval_epochs` are the epochs (besides the last) at which each cell is also evaluated on the test digits.
    `shared_trunk` gives the mixture methods (rme, mixture, boosting) one trunk with M heads (many components at
    little cost) instead of M separate networks; `per_example_proportions` gives them per-example mixing
    proportions eps_m(x) (`RecursiveMixtureEncoder(per_example_proportions=True)`, label suffix `_epsx`);
    `component_bounds` ("elbo", "iw") apply to "rme": the bound in each component's criterion
    (`RecursiveMixtureVAE(component_bound="iw")`, label suffix `_ciw`). `num_samples` applies to the mixture
    methods: reparameterised samples of every component slot per step (`RecursiveMixtureVAE(num_samples=...)`;
    M x num_samples decoder passes; label suffix `_S<n>` when above 1); iwae keeps k = M. `schedule_in_label`
    names the cells whose components join one at a time by their schedule too (label suffix `_epc<N>`), so runs of
    one model at several schedules can share a cells directory, a table and a frontier (off: the labels of
    committed cells stay as they are). A stage as long as the run (`epochs_per_component >= epochs`) is the no-join
    control: components never join (label suffix `_nojoin`). `encoder_gradients` ("reparam", "dreg") apply to
    iwae, piwae, rme on importance-weighted component criteria and mixture on the "iw" bound
    (`RecursiveMixtureVAE(encoder_gradient=...)`; labels `iwae_dreg_k<k>`, `piwae_dreg_M<M>_K<K>`, suffix `_dreg`);
    "gdreg" (the generalized DReG) to mixture on the "iw" bound only (suffix `_gdreg`).
    `eval_examples = 0` / `train_examples = 0` use the full split. `rme_max_log_ratio < 0` runs RME (and boosting)
    with the uncapped criterion; `rme_train_previous = False` freezes earlier components (ablations).
    `lambdas` apply to "rme" only (boosting and the other baselines have no lambda; their rows hold
    `lambda_kl = None`); `schedules` apply to "rme" and "boosting".
    """

    dataset: str = BASE.dataset
    methods: Sequence[str] = ALL_METHODS
    lambdas: Sequence[float] = (0.1, 0.3, 0.5, 1.0)
    num_components: Sequence[int] = (4,)
    schedules: Sequence[str] = ("stagewise",)
    epochs: int = BASE.epochs
    epochs_per_component: int = BASE.epochs_per_component
    seeds: Sequence[int] = (0,)
    iwae_samples: int = BASE.iwae_samples
    iwae_chunk: int = BASE.eval_chunk_size
    eval_examples: int = BASE.eval_examples
    eval_batch_size: int = 100  # test digits per IWAE batch (a benchmark setting: the trainer evaluates otherwise)
    train_examples: int = BASE.train_examples
    architecture: str = BASE.architecture
    hidden_units: Sequence[int] = BASE.hidden_units
    latent_dim: int = BASE.latent_dim
    batch_size: int = BASE.batch_size
    learning_rate: float = BASE.learning_rate
    eps_search_every: int = BASE.eps_search_every
    rme_max_log_ratio: float = BASE.max_log_ratio
    rme_train_previous: bool = BASE.train_previous
    savae_steps: Sequence[int] = (LEGACY_SAVAE_STEPS,)
    savae_lr: float = BASE.refine_lr
    savae_momentum: float = BASE.refine_momentum
    savae_encoder_objective: str = BASE.refine_encoder_objective
    jit_compile: str | bool = "auto"  # "auto": XLA where a GPU is visible
    output_dir: str = "benchmarks/results"
    run_name: str = "benchmark"
    # The results JSON `<table_name>[.partial].json` ("": run_name). Commands over other cells of one run (another
    # M, a shared trunk) write their own tables instead of overwriting each other's.
    table_name: str = ""
    resume: bool = True
    data_dir: str | None = BASE.data_dir or None
    verbose: int = BASE.verbose
    bounds: Sequence[str] = ("elbo",)
    eval_epochs: Sequence[int] = ()
    shared_trunk: bool = BASE.shared_trunk
    per_example_proportions: bool = BASE.per_example_proportions
    component_bounds: Sequence[str] = ("elbo",)
    num_samples: int = BASE.num_samples
    schedule_in_label: bool = False
    encoder_gradients: Sequence[str] = ("reparam",)
    settings: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.methods = tuple(self.methods)
        unknown = set(self.methods) - set(ALL_METHODS)
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {ALL_METHODS}; got {self.methods}.")
        self.lambdas = tuple(float(v) for v in self.lambdas)
        self.num_components = tuple(int(m) for m in self.num_components)
        self.schedules = tuple(self.schedules)
        self.seeds = tuple(int(s) for s in self.seeds)
        self.hidden_units = tuple(int(u) for u in self.hidden_units)
        steps = (self.savae_steps,) if isinstance(self.savae_steps, int) else self.savae_steps
        self.savae_steps = tuple(int(n) for n in steps)
        self.bounds = tuple(self.bounds)
        self.eval_epochs = tuple(sorted({int(e) for e in self.eval_epochs if 0 < int(e) < self.epochs}))
        if set(self.bounds) - {"elbo", "iw"} or not self.bounds:
            raise ValueError(f"bounds must be a non-empty subset of ('elbo', 'iw'); got {self.bounds}.")
        self.component_bounds = tuple(self.component_bounds)
        if set(self.component_bounds) - {"elbo", "iw"} or not self.component_bounds:
            raise ValueError(f"component_bounds must be a non-empty subset of ('elbo', 'iw'); got "
                             f"{self.component_bounds}.")
        self.encoder_gradients = tuple(self.encoder_gradients)
        if set(self.encoder_gradients) - {"reparam", "dreg", "gdreg"} or not self.encoder_gradients:
            raise ValueError(f"encoder_gradients must be a non-empty subset of ('reparam', 'dreg', 'gdreg'); got "
                             f"{self.encoder_gradients}.")
        if min(self.savae_steps, default=0) < 1:
            raise ValueError(f"savae_steps must be >= 1; got {self.savae_steps}.")
        if min(self.num_components, default=0) < 1 or not self.seeds or not self.lambdas:
            raise ValueError("Need num_components >= 1 and at least one seed and one lambda.")
        if self.epochs < 1 or self.iwae_samples < 1 or self.num_samples < 1:
            raise ValueError("epochs, iwae_samples and num_samples must be >= 1.")
        unknown = sorted(set(self.settings) - set(OTHER_SETTINGS))
        if unknown:
            raise ValueError(f"settings must be run settings among {OTHER_SETTINGS}; got {unknown} (the cells set "
                             "the others, or BenchmarkConfig has a field of that name).")
        given = BASE.replace(**self.settings)  # lists (from JSON) become tuples, as in RunConfig
        self.settings = {k: getattr(given, k) for k in sorted(self.settings) if getattr(given, k) != getattr(BASE, k)}

    def to_json(self) -> dict:
        values = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}
        values["settings"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.settings.items()}
        if not values["settings"]:  # as tables and fingerprints were before `settings` existed
            del values["settings"]
        return values


def quick_config(**overrides) -> BenchmarkConfig:
    """Tiny everything: a few hundred digits, tiny networks, 2 epochs, K = 20, silent (smoke test of the whole
    pipeline)."""
    values = dict(
        lambdas=(0.3, 1.0), num_components=(2,), epochs=2, epochs_per_component=1, iwae_samples=20, iwae_chunk=10,
        eval_examples=64, eval_batch_size=32, train_examples=256, hidden_units=(32,), latent_dim=4, batch_size=64,
        eps_search_every=2, savae_steps=(2,), run_name="quick", verbose=0,
    )
    values.update(overrides)
    return BenchmarkConfig(**values)


@dataclasses.dataclass(frozen=True)
class Cell:
    """One trained model of the benchmark."""

    method: str
    num_components: int
    lambda_kl: float | None
    seed: int
    schedule: str | None
    bound: str = "elbo"
    refine_steps: int | None = None  # SA-VAE only
    shared_trunk: bool = False  # mixture methods only
    per_example_proportions: bool = False  # mixture methods only
    component_bound: str = "elbo"  # rme only
    num_samples: int = 1  # mixture methods only: samples per component slot and step
    # Where the run names cells by their schedule (`schedule_in_label`): epochs per component, in the label only
    # (the run's `epochs_per_component` is what trains it and what its fingerprint records).
    epochs_per_component: int | None = None
    encoder_gradient: str = "reparam"  # iwae, piwae, rme on importance-weighted criteria, mixture on "iw"
    joins: bool = True  # False: a stage-wise mixture whose components never join (the no-join control)

    @property
    def label(self) -> str:
        """Names the model within one seed (the keys of `paired_se_vs`)."""
        dreg = "" if self.encoder_gradient == "reparam" else f"_{self.encoder_gradient}"  # _dreg, _gdreg
        if self.method == "savae":
            return "savae" if self.refine_steps == LEGACY_SAVAE_STEPS else f"savae{self.refine_steps}"
        if self.method == "iwae":
            return f"iwae{dreg}_k{self.num_components}"
        if self.method == "piwae":
            return f"piwae{dreg}_M{self.num_components}_K{self.num_samples}"
        parts = [self.method]
        if self.method not in SINGLE_COMPONENT_METHODS or self.method == "vae_equal_params":
            parts.append(f"M{self.num_components}")
        if self.schedule not in (None, "stagewise"):
            parts.append(self.schedule)
        if self.lambda_kl is not None:
            parts.append(f"lambda{self.lambda_kl:g}")
        if self.bound != "elbo":
            parts.append(self.bound)
        if self.shared_trunk:
            parts.append("shared")
        if self.per_example_proportions:
            parts.append("epsx")
        if self.component_bound != "elbo":
            parts.append(f"c{self.component_bound}")
        if self.num_samples != 1:
            parts.append(f"S{self.num_samples}")
        if self.epochs_per_component is not None:
            parts.append(f"epc{self.epochs_per_component}")
        if not self.joins:
            parts.append("nojoin")
        return "_".join(parts) + dreg

    @property
    def key(self) -> str:
        return cell_key(self.label, self.seed)


def cells(config: BenchmarkConfig) -> list[Cell]:
    """All cells of a run, seed-major, in a fixed order."""
    result = []
    for seed in config.seeds:
        for method in config.methods:
            if method in ("vae", "savae"):
                steps = config.savae_steps if method == "savae" else (None,)
                result.extend(Cell(method, 1, None, seed, None, refine_steps=n) for n in steps)
                continue
            for m in config.num_components:
                bounds = config.bounds if method in BOUND_METHODS else ("elbo",)
                mixture = method not in SINGLE_COMPONENT_METHODS
                options = dict(shared_trunk=config.shared_trunk and mixture,
                               per_example_proportions=config.per_example_proportions and mixture,
                               num_samples=config.num_samples if mixture or method == "piwae" else 1)
                gradients = config.encoder_gradients if method in ENCODER_GRADIENT_METHODS else ("reparam",)
                if method != "mixture":  # the generalized DReG is a mixture proposal's (on the "iw" bound)
                    gradients = tuple(g for g in gradients if g != "gdreg")
                    if not gradients:
                        raise ValueError(f"--encoder_gradients={','.join(config.encoder_gradients)} gives method "
                                         f"{method} no cell: gdreg applies to mixture only.")
                if method in ("iwae", "piwae"):
                    result.extend(Cell(method, m, None, seed, None, encoder_gradient=g, **options) for g in gradients)
                    continue
                if method in ("mixture", "vae_equal_params"):
                    result.extend(Cell(method, m, None, seed, None, bound=b, encoder_gradient=g, **options)
                                  for b in bounds for g in gradients if g == "reparam" or b == "iw")
                    continue
                for schedule in config.schedules:
                    lambdas = config.lambdas if method == "rme" else (None,)
                    component_bounds = config.component_bounds if method == "rme" else ("elbo",)
                    result.extend(
                        Cell(method, m, lam, seed, schedule, bound=b, component_bound=c, encoder_gradient=g,
                             **options)
                        for lam in lambdas for b in bounds for c in component_bounds for g in gradients
                        if g == "reparam" or c == "iw")
    if config.schedule_in_label:
        result = [dataclasses.replace(c, epochs_per_component=epochs_per_component(config, c))
                  if adds_components(c) else c for c in result]
    return [dataclasses.replace(c, joins=False) if never_joins(config, c) else c for c in result]


def never_joins(config: BenchmarkConfig, cell: Cell) -> bool:
    """Whether a stage-wise mixture's stage lasts the whole run, so its components never join."""
    return adds_components(cell) and epochs_per_component(config, cell) >= config.epochs


def adds_components(cell: Cell) -> bool:
    """Whether the cell's components join one at a time, on the `epochs_per_component` schedule (the harness's
    `RunConfig.adds_components`)."""
    return components_join_one_at_a_time(cell.method, cell.schedule, cell.num_components)


def stage_epochs(epochs_per_component: int, epochs: int, num_components: int) -> int:
    """Epochs per stage: `epochs_per_component`, or where it is 0 the run spread over the M components."""
    return epochs_per_component if epochs_per_component > 0 else max(1, epochs // num_components)


def epochs_per_component(config: BenchmarkConfig, cell: Cell) -> int:
    return stage_epochs(config.epochs_per_component, config.epochs, cell.num_components)


def run_config(config: BenchmarkConfig, cell: Cell, model_dir: str) -> RunConfig:
    """The `RunConfig` that trains `cell` of `config` in `model_dir` (validated, not resolved): `BASE` with the
    run's settings and the cell's over it.

    Every setting that a method's model reads comes from `config` or the cell (the fingerprint stored with a cell
    records them); a method that does not read a run setting (the cap of a VAE) gets `BASE`'s. `jit_compile="auto"`
    is XLA where a GPU is visible, as Keras reads it.
    """
    method, components, settings = cell.method, cell.num_components, {}
    if method in ("vae", "savae", "vae_equal_params"):
        method, components = ("savae" if cell.method == "savae" else "vae"), 1
        settings.update(bound="elbo", num_samples=1)
    if cell.method == "savae":
        settings.update(refine_steps=cell.refine_steps, refine_lr=config.savae_lr,
                        refine_momentum=config.savae_momentum, refine_encoder_objective=config.savae_encoder_objective)
    elif cell.method == "vae_equal_params":
        settings.update(encoder_parameters_of=cell.num_components)
    elif cell.method == "iwae":  # k = M samples: as many decoder passes per step as RME's M slots
        method, components = "vae", 1
        settings.update(bound="iw", num_samples=cell.num_components)
    elif cell.method == "piwae":  # the encoder on MIWAE(M, K), the decoder on IWAE(M K)
        method, components = "vae", 1
        settings.update(bound="iw", num_samples=cell.num_components * cell.num_samples,
                        encoder_groups=cell.num_components)
    elif cell.method != "vae":
        settings.update(bound=cell.bound, component_bound=cell.component_bound, num_samples=cell.num_samples,
                        schedule=cell.schedule or "stagewise", eps_search_every=config.eps_search_every)
    if cell.method in ("vae", "vae_equal_params"):
        settings.update(eps_search_every=config.eps_search_every if cell.method == "vae" else 50)
    recursive = method in RECURSIVE_METHODS  # rme and boosting share the cap and the earlier-component rule
    jit = config.jit_compile
    if jit == "auto":
        import tensorflow as tf  # only here: the tables and the frontier read cells without TensorFlow

        jit = bool(tf.config.list_physical_devices("GPU"))
    return BASE.replace(
        **config.settings,
        dataset=config.dataset, data_dir=config.data_dir or "", train_examples=config.train_examples,
        batch_size=config.batch_size, method=method, num_components=components, shared_trunk=cell.shared_trunk,
        per_example_proportions=cell.per_example_proportions, latent_dim=config.latent_dim,
        architecture=config.architecture, hidden_units=tuple(config.hidden_units),
        lambda_kl=0.3 if cell.lambda_kl is None else cell.lambda_kl,
        max_log_ratio=config.rme_max_log_ratio if recursive else BASE.max_log_ratio,
        train_previous=config.rme_train_previous if recursive else BASE.train_previous,
        encoder_gradient=cell.encoder_gradient,
        epochs=config.epochs, epochs_per_component=epochs_per_component(config, cell),
        learning_rate=config.learning_rate, seed=cell.seed, jit_compile=bool(jit),
        verbose=config.verbose, eval_examples=config.eval_examples, iwae_samples=config.iwae_samples,
        eval_chunk_size=config.iwae_chunk, model_dir=model_dir, **settings,
    ).validate()
