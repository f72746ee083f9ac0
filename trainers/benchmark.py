"""Benchmark program: trains every method with identical settings, evaluates, writes JSON rows.

    python -m trainers.benchmark --quick                       # tiny smoke run (seconds)
    python -m trainers.benchmark --epochs=10 --eval_examples=1000 --iwae_samples=1000 --run_name=cpu_budget

Resumable: rerun the same command after an interruption (finished cells are loaded, unfinished ones continue from
their last epoch). See benchmarks/README.md for the CPU-budget and paper-scale configurations. TensorFlow's C++ logs
are off unless `--tf_log_level` asks for them (`trainers.quiet`).

The run settings that the cells share are the trainer's flags (`trainers.config_flags`, docs/flags.md) with the
benchmark's defaults (`benchmarks.cells.BASE_SETTINGS`); the program adds the sweep (--methods, --lambdas,
--num_components, --schedules, --bounds, --component_bounds, --encoder_gradients, --savae_steps, --seeds), the
evaluation schedule and where the results go. A flag error or a bad value exits with status 2 and one line.
"""

from __future__ import annotations

import sys

from trainers import cli, config_flags, quiet

with quiet.quiet_imports(sys.argv):  # first: TensorFlow reads its log level when it is imported
    from absl import flags

    from benchmarks import cells, harness

_DEFAULT = cells.BenchmarkConfig()
flags.adopt_module_key_flags(quiet)  # --tf_log_level in --help

# The run settings that every cell shares: one flag per `RunConfig` field that no cell sets itself, with the
# trainer's name, type and help and the benchmark's base as default (`cells.BASE`); the benchmark's earlier names
# (`cells.BENCHMARK_NAMES`, e.g. --rme_max_log_ratio) are aliases, so recorded commands still run.
config_flags.define_flags(cells.FLAG_SETTINGS, base=cells.BASE)
flags.adopt_module_key_flags(config_flags)
for _name, _old_name in cells.BENCHMARK_NAMES.items():
    flags.DEFINE_alias(_old_name, _name)

# What the benchmark adds: the sweep (one cell per value, or per combination), evaluation and where results go.
flags.DEFINE_list("methods", list(_DEFAULT.methods), f"Methods among {cells.ALL_METHODS}.")
flags.DEFINE_list("lambdas", [str(v) for v in _DEFAULT.lambdas], "RME lambda sweep.")
flags.DEFINE_list("num_components", [str(m) for m in _DEFAULT.num_components], "M of the mixture methods.")
flags.DEFINE_list("schedules", list(_DEFAULT.schedules), "stagewise and/or sweep (rme, boosting).")
flags.DEFINE_list("seeds", [str(s) for s in _DEFAULT.seeds], "Seeds (each a full set of cells).")
flags.DEFINE_list("savae_steps", [str(n) for n in _DEFAULT.savae_steps],
                  "SA-VAE refinement steps (one cell each; 10 is labelled plain 'savae').")
flags.DEFINE_list("bounds", list(_DEFAULT.bounds),
                  "Bounds of rme and mixture: elbo (stratified ELBO) and/or iw (stratified importance-weighted).")
flags.DEFINE_list("component_bounds", list(_DEFAULT.component_bounds),
                  "Bounds in rme's component criteria: elbo and/or iw (importance-weighted, label suffix _ciw).")
flags.DEFINE_list("encoder_gradients", list(_DEFAULT.encoder_gradients),
                  "iwae, piwae, rme (importance-weighted criteria), mixture (on --bounds=iw): reparam and/or dreg "
                  "(doubly reparameterised; label iwae_dreg_k<k>, piwae_dreg_M<M>_K<K>, suffix _dreg); gdreg, the "
                  "generalized DReG, for mixture on iw only (suffix _gdreg).")
flags.DEFINE_bool("schedule_in_label", _DEFAULT.schedule_in_label,
                  "Name cells whose components join one at a time by their schedule too (label suffix _epc<N>).")
flags.DEFINE_list("eval_epochs", [str(e) for e in _DEFAULT.eval_epochs],
                  "Epochs (besides the last) at which every cell is also evaluated.")
flags.DEFINE_integer("eval_batch_size", _DEFAULT.eval_batch_size, "Test digits per IWAE batch.")
flags.DEFINE_enum("jit_compile", _DEFAULT.jit_compile, ["auto", "true", "false"],
                  "XLA for training (auto: on GPU only).")
flags.DEFINE_string("output_dir", _DEFAULT.output_dir, "Where the results JSON and the per-cell dirs go.")
flags.DEFINE_string("run_name", _DEFAULT.run_name,
                    "Name of the run: its cell directory, and its JSON unless --table_name.")
flags.DEFINE_string("table_name", _DEFAULT.table_name,
                    "Name of the results JSON (default: run_name), so several commands over one run's cells each "
                    "write their own table.")
flags.DEFINE_bool("resume", _DEFAULT.resume,
                  "Skip finished cells and continue unfinished ones from their last epoch.")
flags.DEFINE_bool("finished_only", False,
                  "Train nothing: write the finished cells to <table_name>.partial.json (a run still going).")
flags.DEFINE_bool("quick", False, "Tiny everything (smoke test); other flags given explicitly still apply.")

FLAGS = flags.FLAGS

_CONVERTERS = dict(
    lambdas=lambda v: tuple(float(x) for x in v), num_components=lambda v: tuple(int(x) for x in v),
    seeds=lambda v: tuple(int(x) for x in v), methods=tuple, schedules=tuple, bounds=tuple, component_bounds=tuple,
    encoder_gradients=tuple, savae_steps=lambda v: tuple(int(x) for x in v),
    eval_epochs=lambda v: tuple(int(x) for x in v),
    jit_compile=lambda v: {"auto": "auto", "true": True, "false": False}[v],
)
_OWN_FLAGS = tuple(_CONVERTERS) + ("schedule_in_label", "eval_batch_size", "output_dir", "run_name", "table_name",
                                   "resume")


def config_from_flags() -> cells.BenchmarkConfig:
    """The `BenchmarkConfig` of the flags: the sweep and the benchmark's own settings, the run settings under
    `BenchmarkConfig`'s names (`cells.BENCHMARK_NAMES`) or in its `settings`. With `--quick`, the flags given over
    `cells.quick_config`."""
    values = {name: _CONVERTERS.get(name, lambda v: v)(FLAGS[name].value) for name in _OWN_FLAGS}
    run = {name: config_flags.flag_value(name) for name in cells.FLAG_SETTINGS}
    run["data_dir"] = run["data_dir"] or None
    values.update({cells.BENCHMARK_NAMES.get(name, name): value for name, value in run.items()
                   if name in cells.FIELD_SETTINGS})
    present = {cells.BENCHMARK_NAMES.get(name, name) for name in (*_OWN_FLAGS, *cells.FIELD_SETTINGS)
               if FLAGS[name].present}
    settings = {name: run[name] for name in cells.OTHER_SETTINGS if not FLAGS.quick or FLAGS[name].present}
    if FLAGS.quick:
        return cells.quick_config(settings=settings, **{name: values[name] for name in present})
    return cells.BenchmarkConfig(settings=settings, **values)


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments {' '.join(argv[1:])!r}: every setting is a flag (--help lists them).")
    quiet.quiet_python_logs()
    try:
        config = config_from_flags()
    except ValueError as e:  # ConfigError included: the user's mistake, found before anything was written
        cli.fail(str(e))
    rows = harness.run_benchmark(config, finished_only=FLAGS.finished_only)
    print(harness.summary_table(rows))


def run() -> None:
    """Console-script entry point (`rmvae-benchmark`, see setup.py)."""
    cli.run(main, sys.modules[__name__])


if __name__ == "__main__":
    run()
