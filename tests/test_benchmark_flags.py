"""The benchmark program's flags: generated from `RunConfig` as the trainer's, with the benchmark's defaults written
once (`benchmarks.cells.BASE_SETTINGS`), and the earlier names still working."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest

# benchmarks/ is not installed
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import cells  # noqa: E402
from tf_rmvae.config import DEFAULTS, RunConfig  # noqa: E402

OLD_NAMES = ["--rme_max_log_ratio=-1", "--norme_train_previous", "--savae_lr=0.1", "--savae_momentum=0",
             "--savae_encoder_objective=amortized", "--iwae_chunk=50"]
NEW_NAMES = ["--max_log_ratio=-1", "--notrain_previous", "--refine_lr=0.1", "--refine_momentum=0",
             "--refine_encoder_objective=amortized", "--eval_chunk_size=50"]
PARSES = {
    "defaults": [],
    "old": ["--methods=rme,savae", *OLD_NAMES],
    "new": ["--methods=rme,savae", *NEW_NAMES],
    "quick_old": ["--quick", *OLD_NAMES],
    "quick_new": ["--quick", *NEW_NAMES],
    "other_settings": ["--conv_filters=16,32", "--decoder=auto", "--data_order=reshuffled"],
}
# Parses `PARSES` with the program's flags (in a new process: the program's flags and the trainer's share names).
PROGRAM = """
import json, sys
from absl import flags
from benchmarks import cells
from trainers import benchmark
F = flags.FLAGS
names = [*cells.FLAG_SETTINGS, *cells.BENCHMARK_NAMES.values()]
out = dict(flags={n: dict(default=F[n].default, help=F[n].help) for n in names if n in F}, configs={})
for key, argv in json.loads(sys.argv[1]).items():
    F.unparse_flags()
    F(["benchmark", *argv])
    out["configs"][key] = benchmark.config_from_flags().to_json()
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def program():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", PROGRAM, json.dumps(PARSES)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _flag_default(value):
    return [str(v) for v in value] if isinstance(value, tuple) else value


def test_every_run_setting_that_no_cell_sets_is_a_benchmark_flag_with_the_trainers_help(program):
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    assert cells.CELL_SETTINGS <= set(fields)
    for name, field in fields.items():
        if name in cells.CELL_SETTINGS:
            continue
        assert name in program["flags"], f"RunConfig.{name} has no benchmark flag"
        assert program["flags"][name]["help"].endswith(field.metadata["help"])  # an enum's starts <a|b>:
        assert program["flags"][name]["default"] == _flag_default(getattr(cells.BASE, name)), name


def test_the_benchmarks_defaults_are_written_once_over_the_trainers():
    """`BenchmarkConfig`'s run settings default to `BASE`'s, which is `RunConfig`'s but for `BASE_SETTINGS`."""
    default = cells.BenchmarkConfig()
    for name in cells.FIELD_SETTINGS:
        value = getattr(default, cells.BENCHMARK_NAMES.get(name, name))
        if name == "data_dir":
            value = value or ""  # None in BenchmarkConfig: tfds's default, as "" in RunConfig
        assert value == getattr(cells.BASE, name), name
    for f in dataclasses.fields(RunConfig):
        expected = cells.BASE_SETTINGS.get(f.name, getattr(DEFAULTS, f.name))
        assert getattr(cells.BASE, f.name) == expected
    assert set(cells.FIELD_SETTINGS) | set(cells.OTHER_SETTINGS) | cells.CELL_SETTINGS == {
        f.name for f in dataclasses.fields(RunConfig)}


def test_the_earlier_flag_names_give_the_same_config_as_the_trainers_names(program):
    configs = program["configs"]
    assert configs["old"] == configs["new"]
    assert configs["quick_old"] == configs["quick_new"]
    assert (configs["new"]["rme_max_log_ratio"], configs["new"]["rme_train_previous"]) == (-1.0, False)
    assert (configs["new"]["savae_lr"], configs["new"]["savae_encoder_objective"]) == (0.1, "amortized")
    assert configs["new"]["iwae_chunk"] == 50 and configs["quick_new"]["iwae_chunk"] == 50
    assert configs["defaults"] == cells.BenchmarkConfig().to_json()  # no `settings` entry: fingerprints unchanged


def test_other_run_settings_reach_every_cell_and_its_fingerprint(program):
    config = program["configs"]["other_settings"]
    assert config["settings"] == {"conv_filters": [16, 32]}  # the others at the base's value
    bench = cells.BenchmarkConfig(methods=("vae", "rme"), settings=config["settings"])
    plain = cells.BenchmarkConfig(methods=("vae", "rme"))
    for cell in cells.cells(bench):
        run = cells.run_config(bench, cell, "/tmp/cell")
        assert run.conv_filters == (16, 32)
        assert run.identity() != cells.run_config(plain, cell, "/tmp/cell").identity()
    with pytest.raises(ValueError, match="settings must be run settings"):
        cells.BenchmarkConfig(settings={"rme_max_log_ratio": 1.0})


def test_a_cell_keeps_the_conventions_it_trained_with():
    config = cells.BenchmarkConfig(methods=("rme",), jit_compile=False)
    run = cells.run_config(config, cells.cells(config)[0], "/tmp/cell")
    assert (run.noise_seed, run.validation_examples, run.data_order) == (0, 0, "reshuffled")
    assert (run.export_dir, run.image_every_epochs, run.keep_checkpoints) == ("", 0, 1)



def test_help_of_the_console_script_lists_the_sweep_the_run_settings_and_the_earlier_names():
    start = "import sys; sys.argv[0] = 'rmvae-benchmark'; from trainers.benchmark import run; run()"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", start, "--help"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("Benchmark program"), result.stderr[-2000:]
    for flag in ("--methods", "--seeds", "--max_log_ratio", "--rme_max_log_ratio", "--conv_filters", "--tf_log_level"):
        assert f"  {flag}:" in result.stdout, result.stdout[-2000:]
    assert "(default: '500,500')" in result.stdout.split("  --hidden_units:")[1].split("  --")[0]
