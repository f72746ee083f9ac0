"""The committed benchmark results: no training state is tracked, and every results path the docs cite exists."""

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
