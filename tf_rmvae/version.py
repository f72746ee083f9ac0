"""The package's version, from the installed distribution's metadata (`importlib.metadata`); no TensorFlow.

    from tf_rmvae.version import __version__     # also `tf_rmvae.__version__`

The metadata describes this copy of the package only where this copy is the one installed: an editable install
(`pip install -e .`) keeps the metadata of the day it was installed while the checkout moves on (a checkout at 0.2.0
read 0.1.0 from it), and a checkout on `PYTHONPATH` may sit beside another installed copy. There the checkout's
`setup.py`, the version that packaging would write, is the truth; a copy that is neither reads "0+unknown".
"""

from __future__ import annotations

import importlib.metadata
import os
import re

#: The distribution name in setup.py (`pip install tf-rmvae`).
DISTRIBUTION = "tf-rmvae"
#: The version of a copy that is neither installed nor a checkout (PEP 440: a local version of 0).
UNKNOWN_VERSION = "0+unknown"

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def installed_copy_version(package_dir: str = _PACKAGE_DIR) -> str | None:
    """The installed distribution's version if its files are the package in `package_dir`, else None (not
    installed, installed editable, or another copy installed)."""
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    installed = os.path.realpath(str(distribution.locate_file(os.path.join(os.path.basename(package_dir),
                                                                          "__init__.py"))))
    return distribution.version if installed == os.path.realpath(os.path.join(package_dir, "__init__.py")) else None


def checkout_version(package_dir: str = _PACKAGE_DIR) -> str | None:
    """The version in the `setup.py` beside the package in `package_dir` (a source checkout), or None."""
    try:
        with open(os.path.join(os.path.dirname(package_dir), "setup.py"), encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return None
    if not re.search(r'name="%s"' % re.escape(DISTRIBUTION), text):
        return None  # another project's setup.py
    found = re.search(r'version="([^"]+)"', text)
    return found.group(1) if found else None


def package_version(package_dir: str = _PACKAGE_DIR) -> str:
    """This copy's version: the installed metadata where this copy is installed, else its checkout's `setup.py`,
    else `UNKNOWN_VERSION`."""
    return installed_copy_version(package_dir) or checkout_version(package_dir) or UNKNOWN_VERSION


__version__ = package_version()
