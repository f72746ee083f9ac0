"""docs/flags.md is what `python -m trainers.flags_doc` writes from `RunConfig`."""

import dataclasses

from tf_rmvae.config import RunConfig
from trainers import flags_doc


def test_docs_flags_md_is_current():
    with open(flags_doc.DOC_PATH, encoding="utf-8") as f:
        committed = f.read()
    assert committed == flags_doc.render(), f"docs/flags.md is stale: run `{flags_doc.COMMAND}` and commit it"


def test_every_setting_is_a_row_with_its_default_and_help():
    rows = {line.split(" | ")[0].strip("| `-"): line for line in flags_doc.render().splitlines()
            if line.startswith("| `--")}
    assert list(rows) == [field.name for field in dataclasses.fields(RunConfig)]
    assert rows["model_dir"].split(" | ")[1] == "(required)"
    assert rows["hidden_units"].split(" | ")[1] == "`200,200`"
    assert rows["method"].split(" | ")[2] == "`rme`, `vae`, `mixture`, `boosting`, `savae`"
    assert rows["num_components"].split(" | ")[1] == "`3` (`--method=vae`: `1`; `--method=savae`: `1`)"
    assert "p(x\\|z)" in rows["decoder"], "a | in a help text must not split the row"


def test_main_writes_the_rendered_table(tmp_path):
    path = tmp_path / "flags.md"
    assert flags_doc.main(["flags_doc", str(path)]) == 0
    assert path.read_text(encoding="utf-8") == flags_doc.render()
