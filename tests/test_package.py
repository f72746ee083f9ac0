import ast
import os
import re
import types

import tf_rmvae
from tf_rmvae import version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE_DIR = os.path.join(REPO, "tf_rmvae")


def test_version_is_semver():
    parts = tf_rmvae.__version__.split(".")
    assert len(parts) == 3 and all(p.isdigit() for p in parts)


def test_the_version_is_written_alike_in_setup_py_the_changelog_and_the_export_metadata():
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as f:
        setup = f.read()
    assert re.search(r'version="([^"]+)"', setup).group(1) == tf_rmvae.__version__
    assert re.search(r'name="([^"]+)"', setup).group(1) == version.DISTRIBUTION
    with open(os.path.join(REPO, "CHANGELOG.md"), encoding="utf-8") as f:  # the newest released version
        assert re.search(r"^## (\d\S*)", f.read(), flags=re.M).group(1) == tf_rmvae.__version__
    from tf_rmvae import export
    assert export.__version__ is tf_rmvae.__version__  # what `_metadata` writes under versions.tf_rmvae


def test_export_reads_the_version_without_importing_the_package_root():
    with open(os.path.join(PACKAGE_DIR, "export.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "tf_rmvae" not in imported


def distribution(version_string, package_file):
    return types.SimpleNamespace(version=version_string, locate_file=lambda relative: package_file)


def test_the_version_is_the_installed_metadata_where_this_copy_is_installed(monkeypatch):
    metadata = version.importlib.metadata
    monkeypatch.setattr(metadata, "distribution",
                        lambda name: distribution("9.8.7", os.path.join(PACKAGE_DIR, "__init__.py")))
    assert version.package_version(PACKAGE_DIR) == "9.8.7"
    # Another copy installed, or an editable install's snapshot (its files are not this package): the checkout's.
    monkeypatch.setattr(metadata, "distribution", lambda name: distribution("0.1.0", "/elsewhere/tf_rmvae/x.py"))
    assert version.package_version(PACKAGE_DIR) == version.checkout_version(PACKAGE_DIR) == tf_rmvae.__version__

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", not_installed)
    assert version.package_version(PACKAGE_DIR) == tf_rmvae.__version__
    assert version.package_version("/nowhere/tf_rmvae") == version.UNKNOWN_VERSION  # neither installed nor a checkout
