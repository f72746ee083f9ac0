"""Side-by-side benchmark of RME against the inference methods a user would pick instead (issues 8 and 11).

Every method gets the same data, encoder/decoder architecture, latent size, optimizer, epochs and seeds. One
*cell* is one (method, schedule, lambda, number of components, bound, SA-VAE steps, seed); each cell trains, is
evaluated on the same test digits (fixed binarization, so per-example differences pair), and is stored in its
own directory:

    <output_dir>/<run_name>_cells/<cell key>/backup/           keras BackupAndRestore (per epoch) while training
    <output_dir>/<run_name>_cells/<cell key>/result.json       the finished row
    <output_dir>/<run_name>_cells/<cell key>/per_example.npz   per-example test ELBO and log-likelihood
    <output_dir>/<run_name>_cells/<cell key>/curve/epoch_NNN.*  the same at the `eval_epochs` along training

A rerun with `resume=True` skips finished cells and continues unfinished ones from their last epoch. When every
cell is done the run's rows, with paired statistics between all cells of the same seed, go to
`<output_dir>/<run_name>.json`.

    config = BenchmarkConfig(methods=("vae", "rme"), epochs=10, iwae_samples=1000, eval_examples=2000)
    rows = run_benchmark(config)
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shutil
import time
from typing import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

import tf_rmvae
from tf_rmvae import data as rm_data
from tf_rmvae import evaluation, model_factory
from tf_rmvae.choices import RECURSIVE_METHODS, resolve_max_log_ratio
from tf_rmvae.choices import adds_components as components_join_one_at_a_time
from tf_rmvae.semi_amortized import SemiAmortizedVAE

ALL_METHODS = ("vae", "mixture", "boosting", "rme", "savae", "vae_equal_params", "iwae")
# Methods with one Gaussian encoder: vae_equal_params is a VAE whose encoder has as many parameters as M encoders;
# iwae is a VAE trained on the IWAE bound with k = M samples (as many decoder passes per step as RME's M slots).
SINGLE_COMPONENT_METHODS = ("vae", "savae", "vae_equal_params", "iwae")
BOUND_METHODS = ("rme", "mixture")  # methods whose decoder/mixture bound is swept over `bounds`
LEGACY_SAVAE_STEPS = 10  # the SA-VAE cell labelled plain "savae" (earlier runs had one SA-VAE cell)


@dataclasses.dataclass
class BenchmarkConfig:
    """Everything a benchmark run depends on (saved beside its results).

    `epochs_per_component = 0` spreads the components over the run: `max(1, epochs // M)` epochs per stage.
    `savae_steps` gives one SA-VAE cell per number of refinement steps; `bounds` ("elbo", "iw") apply to "rme"
    and "mixture" (the decoder and proportions trained on the stratified ELBO or the stratified importance-weighted
    bound); `eval_epochs` are the epochs (besides the last) at which each cell is also evaluated on the test digits.
    `shared_trunk` gives the mixture methods (rme, mixture, boosting) one trunk with M heads (many components at
    little cost) instead of M separate networks; `per_example_proportions` gives them per-example mixing
    proportions eps_m(x) (`RecursiveMixtureEncoder(per_example_proportions=True)`, label suffix `_epsx`);
    `component_bounds` ("elbo", "iw") apply to "rme": the bound in each component's criterion
    (`RecursiveMixtureVAE(component_bound="iw")`, label suffix `_ciw`).
    `eval_examples = 0` / `train_examples = 0` use the full split. `rme_max_log_ratio < 0` runs RME (and boosting)
    with the uncapped criterion; `rme_train_previous = False` freezes earlier components (ablations of issue 8).
    `lambdas` apply to "rme" only (boosting and the other baselines have no lambda; their rows hold
    `lambda_kl = None`); `schedules` apply to "rme" and "boosting".
    """

    dataset: str = "rmvae_mnist"
    methods: Sequence[str] = ALL_METHODS
    lambdas: Sequence[float] = (0.1, 0.3, 0.5, 1.0)
    num_components: Sequence[int] = (4,)
    schedules: Sequence[str] = ("stagewise",)
    epochs: int = 20
    epochs_per_component: int = 0
    seeds: Sequence[int] = (0,)
    iwae_samples: int = 5000
    iwae_chunk: int = 100
    eval_examples: int = 0
    eval_batch_size: int = 100
    train_examples: int = 0
    architecture: str = "dense"
    hidden_units: Sequence[int] = (500, 500)
    latent_dim: int = 32
    batch_size: int = 100
    learning_rate: float = 1e-3
    eps_search_every: int = 50
    rme_max_log_ratio: float = 5.0
    rme_train_previous: bool = True
    savae_steps: Sequence[int] = (LEGACY_SAVAE_STEPS,)
    savae_lr: float = 0.05
    savae_momentum: float = 0.5
    savae_encoder_objective: str = "unrolled"
    jit_compile: str | bool = "auto"
    output_dir: str = "benchmarks/results"
    run_name: str = "benchmark"
    # The results JSON `<table_name>[.partial].json` ("": run_name). Commands over other cells of one run (another
    # M, a shared trunk) write their own tables instead of overwriting each other's.
    table_name: str = ""
    resume: bool = True
    data_dir: str | None = None
    verbose: int = 0
    bounds: Sequence[str] = ("elbo",)
    eval_epochs: Sequence[int] = ()
    shared_trunk: bool = False
    per_example_proportions: bool = False
    component_bounds: Sequence[str] = ("elbo",)

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
        if min(self.savae_steps, default=0) < 1:
            raise ValueError(f"savae_steps must be >= 1; got {self.savae_steps}.")
        if min(self.num_components, default=0) < 1 or not self.seeds or not self.lambdas:
            raise ValueError("Need num_components >= 1 and at least one seed and one lambda.")
        if self.epochs < 1 or self.iwae_samples < 1:
            raise ValueError("epochs and iwae_samples must be >= 1.")

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def quick_config(**overrides) -> BenchmarkConfig:
    """Tiny everything: a few hundred digits, tiny networks, 2 epochs, K = 20 (smoke test of the whole pipeline)."""
    values = dict(
        lambdas=(0.3, 1.0), num_components=(2,), epochs=2, epochs_per_component=1, iwae_samples=20, iwae_chunk=10,
        eval_examples=64, eval_batch_size=32, train_examples=256, hidden_units=(32,), latent_dim=4, batch_size=64,
        eps_search_every=2, savae_steps=(2,), run_name="quick",
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

    @property
    def label(self) -> str:
        """Names the model within one seed (the keys of `paired_se_vs`)."""
        if self.method == "savae":
            return "savae" if self.refine_steps == LEGACY_SAVAE_STEPS else f"savae{self.refine_steps}"
        if self.method == "iwae":
            return f"iwae_k{self.num_components}"
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
        return "_".join(parts)

    @property
    def key(self) -> str:
        return f"{self.label}_seed{self.seed}"


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
                               per_example_proportions=config.per_example_proportions and mixture)
                if method in ("mixture", "vae_equal_params", "iwae"):
                    result.extend(Cell(method, m, None, seed, None, bound=b, **options) for b in bounds)
                    continue
                for schedule in config.schedules:
                    lambdas = config.lambdas if method == "rme" else (None,)
                    component_bounds = config.component_bounds if method == "rme" else ("elbo",)
                    result.extend(
                        Cell(method, m, lam, seed, schedule, bound=b, component_bound=c, **options)
                        for lam in lambdas for b in bounds for c in component_bounds)
    return result


def device_description() -> str:
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        details = tf.config.experimental.get_device_details(gpus[0])
        return f"{len(gpus)} x GPU {details.get('device_name', gpus[0].name)}"
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores visible)"


# ---------------------------------------------------------------------- models
def build_model(config: BenchmarkConfig, cell: Cell) -> keras.Model:
    """The cell's model, compiled (Adam at `learning_rate`) and built for the dataset's image shape."""
    spec = rm_data.get_dataset_spec(config.dataset)
    components = 1 if cell.method in SINGLE_COMPONENT_METHODS else cell.num_components
    encoder_hidden_units = None
    if cell.method == "vae_equal_params":
        encoder_hidden_units = model_factory.equal_parameter_hidden_units(
            spec.image_shape, config.hidden_units, cell.num_components, latent_dim=config.latent_dim,
            architecture=config.architecture)
    encoder, decoder = model_factory.build_networks(
        spec.image_shape, spec.binary, latent_dim=config.latent_dim, num_components=components,
        architecture=config.architecture, hidden_units=config.hidden_units, seed=cell.seed,
        encoder_hidden_units=encoder_hidden_units, shared_trunk=cell.shared_trunk,
        per_example_proportions=cell.per_example_proportions,
        gaussian=cell.method == "savae",
    )
    if cell.method == "savae":
        model = SemiAmortizedVAE(
            encoder, decoder, refine_steps=cell.refine_steps, refine_lr=config.savae_lr,
            refine_momentum=config.savae_momentum, encoder_objective=config.savae_encoder_objective,
        )
    elif cell.method in ("vae_equal_params", "iwae"):
        iwae = cell.method == "iwae"
        model = tf_rmvae.RecursiveMixtureVAE(
            encoder, decoder, method="vae", bound="iw" if iwae else "elbo",
            num_samples=cell.num_components if iwae else 1,
        )
    else:
        kwargs = {} if cell.lambda_kl is None else {"lambda_kl": cell.lambda_kl}
        # Always named: a cell's label says its bounds, whatever the library's default ("auto").
        kwargs.update(bound=cell.bound, component_bound=cell.component_bound)
        if cell.method in RECURSIVE_METHODS:  # rme and boosting share the cap and the earlier-component rule
            kwargs.update(
                max_log_ratio=resolve_max_log_ratio(config.rme_max_log_ratio),
                train_previous=config.rme_train_previous,
            )
        model = tf_rmvae.RecursiveMixtureVAE(
            encoder, decoder, method=cell.method, schedule=cell.schedule or "stagewise",
            eps_search_every=config.eps_search_every, **kwargs,
        )
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate), jit_compile=config.jit_compile)
    model.ensure_built((None, *spec.image_shape))
    model.optimizer.build(model.trainable_variables)
    return model


def adds_components(cell: Cell) -> bool:
    """Whether the cell's components join one at a time, on the `epochs_per_component` schedule (the harness's
    `RunConfig.adds_components`)."""
    return components_join_one_at_a_time(cell.method, cell.schedule, cell.num_components)


def epochs_per_component(config: BenchmarkConfig, cell: Cell) -> int:
    if config.epochs_per_component > 0:
        return config.epochs_per_component
    return max(1, config.epochs // cell.num_components)


def _mixture_summary(model, x: np.ndarray) -> tuple[list[float], list[float]]:
    """Final mixture weights (per-example proportions: their mean) and each component's mean entropy (nats) on
    the first 500 examples of `x`."""
    if isinstance(model, SemiAmortizedVAE):
        _, scale = model.variational_parameters(tf.constant(x[:500]))
        entropy = tf.reduce_sum(0.5 * np.log(2 * np.pi * np.e) + tf.math.log(scale), -1)
        return [1.0], [float(tf.reduce_mean(entropy))]
    weights, entropies = evaluation.mixture_summary(model.encoder, x[:500])
    return [float(w) for w in weights], [float(e) for e in entropies]


def _finite(value):
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


# ---------------------------------------------------------------------- one cell
def _summarize(epoch: int, test: dict) -> dict:
    return dict(
        epoch=epoch, test_elbo=test["elbo_mean"], test_elbo_se=test["elbo_se"],
        test_log_likelihood=test["log_likelihood_mean"], test_log_likelihood_se=test["log_likelihood_se"],
        test_inference_gap=test["log_likelihood_mean"] - test["elbo_mean"],
    )


class CurveEvaluation(keras.callbacks.Callback):
    """Evaluates the model on the test digits after each epoch in `epochs` (1-based) and stores the per-example
    arrays and a summary in `curve_dir/epoch_NNN.{npz,json}`; epochs stored by an interrupted run are not redone."""

    def __init__(self, epochs: Sequence[int], evaluate: Callable[[keras.Model], dict], curve_dir: str):
        super().__init__()
        self.epochs, self.evaluate, self.curve_dir = set(epochs), evaluate, curve_dir

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        path = os.path.join(self.curve_dir, f"epoch_{done:03d}")
        if done not in self.epochs or os.path.exists(path + ".json"):
            return
        test = self.evaluate(self.model)
        os.makedirs(self.curve_dir, exist_ok=True)
        np.savez(path + ".npz", elbo=test["elbo"], log_likelihood=test["log_likelihood"])
        with open(path + ".json.tmp", "w") as f:  # renamed into place: a kill never leaves half a point
            json.dump(_summarize(done, test), f, indent=1)
        os.replace(path + ".json.tmp", path + ".json")


def load_curve(cell_dir: str) -> list[dict]:
    """The stored `CurveEvaluation` summaries of a cell, by epoch."""
    curve_dir = os.path.join(cell_dir, "curve")
    names = sorted(n for n in os.listdir(curve_dir) if n.endswith(".json")) if os.path.isdir(curve_dir) else []
    points = []
    for name in names:
        with open(os.path.join(curve_dir, name)) as f:
            points.append(json.load(f))
    return points


def run_cell(
    config: BenchmarkConfig, cell: Cell, x_test: np.ndarray, x_train_eval: np.ndarray, cell_dir: str
) -> tuple[dict, dict]:
    """Trains and evaluates one cell; returns its row and its per-example arrays (also saved in `cell_dir`)."""
    os.makedirs(cell_dir, exist_ok=True)
    keras.utils.set_random_seed(cell.seed)
    model = build_model(config, cell)
    train = rm_data.load_dataset(
        config.dataset, "train", config.batch_size, seed=cell.seed, take=config.train_examples or None,
        data_dir=config.data_dir, drop_remainder=True,
    )
    backup_dir = os.path.join(cell_dir, "backup")

    def evaluate_test(model):
        return evaluation.evaluate(
            model, x_test, config.iwae_samples, chunk_size=config.iwae_chunk, batch_size=config.eval_batch_size,
            seed=cell.seed,
        )

    # The curve is stored before the backup of the same epoch, so a resumed run never lacks a point it passed.
    callbacks = [CurveEvaluation(config.eval_epochs, evaluate_test, os.path.join(cell_dir, "curve"))]
    if config.resume:
        callbacks.append(keras.callbacks.BackupAndRestore(backup_dir, save_freq="epoch", delete_checkpoint=True))
    else:
        shutil.rmtree(backup_dir, ignore_errors=True)
    if adds_components(cell):
        callbacks.append(tf_rmvae.ComponentSchedule(epochs_per_component=epochs_per_component(config, cell)))
    start = time.perf_counter()
    history = model.fit(train, epochs=config.epochs, callbacks=callbacks, verbose=config.verbose)
    train_time = time.perf_counter() - start
    epochs_run = max(1, len(history.epoch))

    test = evaluate_test(model)
    train_elbo = evaluation.per_example_elbo(model, x_train_eval, batch_size=max(config.eval_batch_size, 100))
    weights, entropies = _mixture_summary(model, x_test)
    inference_s = evaluation.inference_time(model, x_test[:100], repeats=10)
    inference_1_s = evaluation.inference_time(model, x_test[:1], repeats=20)
    row = dict(
        dataset=config.dataset,
        method=cell.method,
        label=cell.label,
        schedule=cell.schedule,
        num_components=1 if cell.method in SINGLE_COMPONENT_METHODS else cell.num_components,
        matched_components=cell.num_components if cell.method in ("vae_equal_params", "iwae") else None,
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
        curve=load_curve(cell_dir) + [_summarize(config.epochs, test)],
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
        bound="iw" if cell.method == "iwae" else (cell.bound if cell.method in BOUND_METHODS else "elbo"),
        encoder_parameters=sum(int(np.prod(v.shape)) for v in model.encoder.trainable_weights),
    )
    arrays = dict(elbo=test["elbo"], log_likelihood=test["log_likelihood"])
    np.savez(os.path.join(cell_dir, "per_example.npz"), **arrays)
    with open(os.path.join(cell_dir, "result.json"), "w") as f:
        json.dump(dict(fingerprint=_fingerprint(config, cell), row=row), f, indent=1)
    return row, arrays


def _fingerprint(config: BenchmarkConfig, cell: Cell) -> dict:
    """What a finished cell's result depends on (a changed config retrains the cell on resume).

    Settings added after results were committed enter only when they differ from the old behaviour, so the
    committed cells still match: `eval_epochs` when non-empty, the cell's bound when not "elbo"; SA-VAE's steps
    as the old scalar `savae_steps`.
    """
    skip = {"methods", "lambdas", "num_components", "schedules", "seeds", "output_dir", "run_name", "table_name",
            "resume", "verbose", "eval_batch_size", "jit_compile", "bounds", "savae_steps"}
    values = {k: v for k, v in config.to_json().items() if k not in skip}
    if not config.eval_epochs:
        del values["eval_epochs"]
    for option in ("shared_trunk", "per_example_proportions"):
        if not values[option]:
            del values[option]
    del values["component_bounds"]  # an rme cell's own field records its own; the other methods do not depend on it
    # Added after results were committed, and their old behaviour:
    new_fields = {"bound": "elbo", "refine_steps": None, "shared_trunk": False, "per_example_proportions": False,
                  "component_bound": "elbo"}
    values["cell"] = {k: v for k, v in dataclasses.asdict(cell).items() if k not in new_fields}
    values["cell"].update({k: getattr(cell, k) for k, old in new_fields.items()
                           if k != "refine_steps" and getattr(cell, k) != old})
    if cell.method == "savae":
        values["savae_steps"] = cell.refine_steps
    else:
        values = {k: v for k, v in values.items() if not k.startswith("savae")}
    if cell.method not in RECURSIVE_METHODS:
        values = {k: v for k, v in values.items() if not k.startswith("rme_")}
    return _read_by_cell(json.loads(json.dumps(values)), cell)


def _read_by_cell(fingerprint: dict, cell: Cell) -> dict:
    """`fingerprint` without the run settings that `cell` does not read: the component schedule where no component
    joins later, the run's `shared_trunk` and `per_example_proportions` where the cell has neither (the cell's own
    fields record them). Applied to stored fingerprints too, so a finished cell (e.g. IWAE) counts as finished in
    any run that differs only there, including cells stored before this rule."""
    unread = {"shared_trunk", "per_example_proportions"}
    if not adds_components(cell):
        unread.add("epochs_per_component")
    unread = {k for k in unread if not getattr(cell, k, False)}  # the cell's own option stays where it is on
    return {k: v for k, v in fingerprint.items() if k not in unread}


def _load_finished(config: BenchmarkConfig, cell: Cell, cell_dir: str):
    path = os.path.join(cell_dir, "result.json")
    arrays_path = os.path.join(cell_dir, "per_example.npz")
    if not (os.path.exists(path) and os.path.exists(arrays_path)):
        return None
    with open(path) as f:
        stored = json.load(f)
    if _read_by_cell(stored.get("fingerprint") or {}, cell) != _fingerprint(config, cell):
        return None
    with np.load(arrays_path) as arrays:
        return stored["row"], {k: arrays[k] for k in arrays.files}


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
        finished = _load_finished(config, cell, cell_dir) if config.resume else None
        if finished is None and finished_only:
            missing.append(cell.key)
            continue
        if finished is None:
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
