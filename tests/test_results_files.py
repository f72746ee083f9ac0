"""The committed benchmark results: no training state is tracked, and every results path the docs cite exists."""

import dataclasses
import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = "benchmarks/results"
DOCS = ["README.md", "benchmarks/README.md"] + sorted(
    os.path.join("docs", name) for name in os.listdir(os.path.join(REPO, "docs")) if name.endswith(".md"))
RESUME_STATE_DIRS = {"backup", "checkpoints"}
# A path the docs name, with `$R/` standing for benchmarks/results/ (benchmarks/README.md's commands).
CITED = re.compile(r"(?:benchmarks/results/|\$R/)([\w.\-/<>]*)")
# Options whose value is what a command writes, not a result it reads.
OUTPUT = re.compile(r"--(?:output|out_dir|output_dir|plot)[= ]+(?:benchmarks/results/|\$R/)([\w.\-/]*)")
RUN_NAME = re.compile(r"--run_name=(\w+)")


def tracked_resume_states(paths):
    """The paths that lie in a resume-state directory (`backup/`, `checkpoints/`)."""
    return [p for p in paths if RESUME_STATE_DIRS & set(p.split("/")[:-1])]


def test_tracked_resume_states_finds_backup_and_checkpoint_paths():
    paths = ["benchmarks/results/x_cells/vae_seed0/backup/latest.weights.h5", "benchmarks/results/checkpoints/a",
             "benchmarks/results/amortization_cells/decoder_vae.weights.h5", "benchmarks/backup.py"]
    assert tracked_resume_states(paths) == paths[:2]


def test_no_training_state_is_tracked_under_benchmarks():
    try:
        listed = subprocess.run(["git", "ls-files", "benchmarks"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    found = tracked_resume_states(listed)
    assert not found, f"resume states are tracked (git rm -r --cached them; .gitignore keeps them out): {found[:10]}"


def cited_results(text):
    """The paths under benchmarks/results that `text` cites as existing results: not placeholders, not what its
    commands write, and not the outputs of runs documented but never made here (no `<run_name>_cells`)."""
    written = {m.rstrip(".,") for m in OUTPUT.findall(text)}
    not_run = [n for n in RUN_NAME.findall(text) if not os.path.isdir(os.path.join(REPO, RESULTS, f"{n}_cells"))]
    cited = set()
    for match in CITED.findall(text):
        path = match.rstrip(".,")
        if path and "<" not in path and path not in written and not any(path.startswith(n) for n in not_run):
            cited.add(path)
    return sorted(cited)


def test_cited_results_skips_outputs_placeholders_and_runs_not_made():
    text = ("see benchmarks/results/speed.json, `benchmarks/results/<run_name>.json` and $R/archive/x.json.\n"
            "python -m benchmarks.speed --output=benchmarks/results/speed_new.json\n"
            "python -m trainers.benchmark --run_name=never_run; python -m benchmarks.plots "
            "benchmarks/results/never_run.json --out_dir=benchmarks/results/plots_new\n")
    assert cited_results(text) == ["archive/x.json", "speed.json"]


@pytest.mark.parametrize("doc", DOCS)
def test_every_results_path_the_docs_cite_exists(doc):
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        cited = cited_results(f.read())
    missing = [p for p in cited if not os.path.exists(os.path.join(REPO, RESULTS, p))]
    assert not missing, f"{doc} cites results that are not in {RESULTS}: {missing}"


def committed_cells():
    """The directories of the committed finished cells (`<run>_cells/<key>/result.json`)."""
    try:
        listed = subprocess.run(["git", "ls-files", RESULTS], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return sorted(os.path.join(REPO, os.path.dirname(p)) for p in listed
                  if p.endswith("/result.json") and os.path.dirname(os.path.dirname(p)).endswith("_cells"))


def test_every_committed_cell_gives_back_the_run_that_trained_it():
    """The settings of a committed cell are read from its fingerprint (never its label): the benchmark settings and
    cell rebuilt from it record every setting it stores, name its directory, and give a valid run configuration."""
    from benchmarks import cell_settings, cell_store, cells

    directories = committed_cells()
    assert len(directories) > 100
    for directory in directories:
        stored = cell_settings.stored_result(directory)["fingerprint"]
        config, cell = cell_settings.from_fingerprint(stored, jit_compile=False)
        recorded = cell_store.read_by_cell(stored, cell)
        rebuilt = cell_store.fingerprint(config, cell)
        assert {k: rebuilt.get(k) for k in recorded} == recorded, directory
        schedule_named = dataclasses.replace(cell, epochs_per_component=cells.epochs_per_component(config, cell))
        assert os.path.basename(directory) in (cell.key, schedule_named.key), directory
        run = cell_settings.trained_run_config(directory)
        assert run.seed == cell.seed and run.model_dir == directory and run.validate() == run


# benchmarks/README.md's frontier commands (the tables of each, and its cells).
FRONTIERS = {
    "frontier_budget12": (["archive/budget12.partial.json", "budget12_shared.json", "budget12_m3s5.json",
                           "budget12_iwae16.json"], "budget12_cells"),
    "frontier_budget100": ("archive/budget100.partial.json archive/budget100_shared.partial.json "
                           "archive/budget100_lambda.partial.json budget100_m16.json budget100_mix8.json "
                           "archive/budget100_lambda3.partial.json budget100_iwae16.json budget100_s4.json "
                           "budget100_m4s2.json archive/budget100_seed2.partial.json budget100_epc34.json "
                           "budget100_s4elbo.json budget100_savae1.json budget100_savae2.json budget100_savae5.json "
                           "budget100_boosting.json budget100_m3s5.json budget100_m2s8.json budget100_m32.json".split(),
                           "budget100_cells"),
}


@pytest.mark.parametrize("name", sorted(FRONTIERS))
def test_the_committed_frontier_tables_regenerate_from_the_committed_results(name, tmp_path):
    """Each row's speed entries come from the settings its cell stores: the committed tables come out again."""
    from benchmarks import frontier

    tables, cells_dir = FRONTIERS[name]
    results = os.path.join(REPO, RESULTS)
    frontier.main([os.path.join(results, t) for t in tables] + [
        "--speed", os.path.join(results, "speed_frontier.json"), "--reference=iwae_k4",
        f"--cells_dir={os.path.join(results, cells_dir)}", f"--out_dir={tmp_path}"])
    with open(os.path.join(results, name, "frontier.md")) as committed, open(tmp_path / "frontier.md") as again:
        assert again.read() == committed.read()
