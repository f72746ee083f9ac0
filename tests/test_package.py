import os
import re

import tf_rmvae

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_version_is_semver():
    parts = tf_rmvae.__version__.split(".")
    assert len(parts) == 3 and all(p.isdigit() for p in parts)


def test_the_version_is_written_alike_in_setup_py_and_the_changelog():
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        assert re.search(r'version="([^"]+)"', f.read()).group(1) == tf_rmvae.__version__
    with open(os.path.join(REPO, "CHANGELOG.md"), encoding="utf-8") as f:
        # The newest released section ("## Unreleased" above it gathers what the next version will have).
        assert re.search(r"^## (?!Unreleased)(\S+)", f.read(), flags=re.M).group(1) == tf_rmvae.__version__
