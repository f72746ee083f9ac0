"""Benchmark program: trains every method with identical settings, evaluates, writes JSON rows.

    python -m trainers.benchmark --quick                       # tiny smoke run (seconds)
    python -m trainers.benchmark --epochs=10 --eval_examples=1000 --iwae_samples=1000 --run_name=cpu_budget

Resumable: rerun the same command after an interruption (finished cells are loaded, unfinished ones continue from
their last epoch). See benchmarks/README.md for the CPU-budget and paper-scale configurations. TensorFlow's C++ logs
are off unless `--tf_log_level` asks for them (`trainers.quiet`).
"""

from __future__ import annotations

import dataclasses
import sys

from trainers import quiet

with quiet.quiet_imports(sys.argv):  # first: TensorFlow reads its log level when it is imported
    from absl import app, flags

    from benchmarks import cells, harness

_DEFAULT = cells.BenchmarkConfig()
flags.adopt_module_key_flags(quiet)  # --tf_log_level in --help

flags.DEFINE_string("dataset", _DEFAULT.dataset, "Dataset name (tf_rmvae.data).")
flags.DEFINE_list("methods", list(_DEFAULT.methods), f"Methods among {cells.ALL_METHODS}.")
flags.DEFINE_list("lambdas", [str(v) for v in _DEFAULT.lambdas], "RME lambda sweep.")
flags.DEFINE_list("num_components", [str(m) for m in _DEFAULT.num_components], "M of the mixture methods.")
flags.DEFINE_list("schedules", list(_DEFAULT.schedules), "stagewise and/or sweep (rme, boosting).")
flags.DEFINE_integer("epochs", _DEFAULT.epochs, "Training epochs (same for every method).")
flags.DEFINE_integer("epochs_per_component", _DEFAULT.epochs_per_component,
                     "Stage length of stage-wise methods; 0: epochs // M.")
flags.DEFINE_list("seeds", [str(s) for s in _DEFAULT.seeds], "Seeds (each a full set of cells).")
flags.DEFINE_integer("iwae_samples", _DEFAULT.iwae_samples, "K of the importance-weighted log-likelihood.")
flags.DEFINE_integer("iwae_chunk", _DEFAULT.iwae_chunk, "Samples per chunk of the IWAE estimate.")
flags.DEFINE_integer("eval_examples", _DEFAULT.eval_examples, "Test digits evaluated; 0: the full test split.")
flags.DEFINE_integer("eval_batch_size", _DEFAULT.eval_batch_size, "Test digits per IWAE batch.")
flags.DEFINE_integer("train_examples", _DEFAULT.train_examples, "Training digits; 0: the full training split.")
flags.DEFINE_enum("architecture", _DEFAULT.architecture, ["dense", "conv"], "Encoder/decoder architecture.")
flags.DEFINE_list("hidden_units", [str(u) for u in _DEFAULT.hidden_units], "Hidden widths (decoder reversed).")
flags.DEFINE_integer("latent_dim", _DEFAULT.latent_dim, "Latent size.")
flags.DEFINE_integer("batch_size", _DEFAULT.batch_size, "Training batch size.")
flags.DEFINE_float("learning_rate", _DEFAULT.learning_rate, "Adam learning rate.")
flags.DEFINE_integer("eps_search_every", _DEFAULT.eps_search_every, "Steps between eps line searches.")
flags.DEFINE_float("rme_max_log_ratio", _DEFAULT.rme_max_log_ratio,
                   "Cap of the per-sample KL log-ratio in RME's criterion (< 0: uncapped).")
flags.DEFINE_bool("rme_train_previous", _DEFAULT.rme_train_previous,
                  "Keep training earlier RME components (false: freeze them).")
flags.DEFINE_list("savae_steps", [str(n) for n in _DEFAULT.savae_steps],
                  "SA-VAE refinement steps (one cell each; 10 is labelled plain 'savae').")
flags.DEFINE_float("savae_lr", _DEFAULT.savae_lr, "SA-VAE refinement step size.")
flags.DEFINE_float("savae_momentum", _DEFAULT.savae_momentum, "SA-VAE refinement momentum (0: SGD).")
flags.DEFINE_enum("savae_encoder_objective", _DEFAULT.savae_encoder_objective, ["unrolled", "amortized"],
                  "SA-VAE encoder gradient: through the unrolled refinement, or the amortized ELBO.")
flags.DEFINE_list("bounds", list(_DEFAULT.bounds),
                  "Bounds of rme and mixture: elbo (stratified ELBO) and/or iw (stratified importance-weighted).")
flags.DEFINE_bool("shared_trunk", False, "Mixture methods: one trunk with M heads instead of M networks.")
flags.DEFINE_bool("per_example_proportions", False,
                  "Mixture methods: per-example mixing proportions eps_m(x) (label suffix _epsx).")
flags.DEFINE_list("component_bounds", list(_DEFAULT.component_bounds),
                  "Bounds in rme's component criteria: elbo and/or iw (importance-weighted, label suffix _ciw).")
flags.DEFINE_integer("num_samples", _DEFAULT.num_samples,
                     "Mixture methods: samples per component slot and step (label suffix _S<n> above 1).")
flags.DEFINE_list("encoder_gradients", list(_DEFAULT.encoder_gradients),
                  "iwae, piwae, rme (importance-weighted criteria): reparam and/or dreg (doubly reparameterised; "
                  "label iwae_dreg_k<k>, piwae_dreg_M<M>_K<K>, suffix _dreg).")
flags.DEFINE_bool("schedule_in_label", False,
                  "Name cells whose components join one at a time by their schedule too (label suffix _epc<N>).")
flags.DEFINE_list("eval_epochs", [], "Epochs (besides the last) at which every cell is also evaluated.")
flags.DEFINE_enum("jit_compile", "auto", ["auto", "true", "false"], "XLA for training (auto: on GPU only).")
flags.DEFINE_string("output_dir", _DEFAULT.output_dir, "Where the results JSON and the per-cell dirs go.")
flags.DEFINE_string("run_name", _DEFAULT.run_name,
                    "Name of the run: its cell directory, and its JSON unless --table_name.")
flags.DEFINE_string("table_name", _DEFAULT.table_name,
                    "Name of the results JSON (default: run_name), so several commands over one run's cells each "
                    "write their own table.")
flags.DEFINE_string("data_dir", None, "tfds data directory (default: tfds's).")
flags.DEFINE_bool("resume", True, "Skip finished cells and continue unfinished ones from their last epoch.")
flags.DEFINE_bool("finished_only", False,
                  "Train nothing: write the finished cells to <table_name>.partial.json (a run still going).")
flags.DEFINE_bool("quick", False, "Tiny everything (smoke test); other flags given explicitly still apply.")
flags.DEFINE_integer("verbose", 2, "Keras fit verbosity.")

FLAGS = flags.FLAGS

_CONVERTERS = dict(
    lambdas=lambda v: tuple(float(x) for x in v), num_components=lambda v: tuple(int(x) for x in v),
    seeds=lambda v: tuple(int(x) for x in v), hidden_units=lambda v: tuple(int(x) for x in v),
    methods=tuple, schedules=tuple, bounds=tuple, component_bounds=tuple, encoder_gradients=tuple,
    savae_steps=lambda v: tuple(int(x) for x in v),
    eval_epochs=lambda v: tuple(int(x) for x in v),
    jit_compile=lambda v: {"auto": "auto", "true": True, "false": False}[v],
)


def config_from_flags() -> cells.BenchmarkConfig:
    names = [f.name for f in dataclasses.fields(cells.BenchmarkConfig)]
    values = {name: _CONVERTERS.get(name, lambda v: v)(FLAGS[name].value) for name in names}
    if FLAGS.quick:
        explicit = {name: value for name, value in values.items() if FLAGS[name].present}
        return cells.quick_config(**explicit)
    return cells.BenchmarkConfig(**values)


def main(argv):
    del argv
    quiet.quiet_python_logs()
    rows = harness.run_benchmark(config_from_flags(), finished_only=FLAGS.finished_only)
    print(harness.summary_table(rows))


def run() -> None:
    """Console-script entry point (`rmvae-benchmark`, see setup.py)."""
    app.run(main)


if __name__ == "__main__":
    run()
