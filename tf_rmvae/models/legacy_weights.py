"""Reading `.weights.h5` files written by tf-rmvae 0.1, before the encoder was split into sub-layers.

Version 0.1 kept all of an encoder's variables in the encoder itself (`encoder/vars/0..n-1`: the component
networks' variables in creation order, then the mixing logits and the active count) and the line-search state in
the model (`vars/0..1`). Now the networks sit in `encoder/networks/`, the mixing state in `encoder/mixing/` (a
`GaussianEncoder` has none) and the line-search state in the model's `RecursiveMixtureTrainer`. The optimizer's
variables keep their order, so they map one to one.

`upgraded_copy(path, layout)` rewrites such a file into the current layout (a temporary copy; the original is
left as it is), so an interrupted 0.1 run or benchmark cell resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

import h5py

ENCODER = "encoder"
NETWORKS = "encoder/networks/vars"
MIXING = "encoder/mixing/vars"
# Where the model's own variables (the line-search state) live now, by model layout.
TRAINER = "layers/recursive_mixture_trainer/vars"
MIXTURE_LAYOUT = "mixture"  # RecursiveMixtureVAE: networks + mixing state + line-search state
GAUSSIAN_LAYOUT = "gaussian"  # SemiAmortizedVAE: networks only
LAYOUTS = (MIXTURE_LAYOUT, GAUSSIAN_LAYOUT)
# The mixing logits and the active count: the last two of a 0.1 encoder's variables.
MIXING_VARIABLES = 2


def is_legacy(path: str | os.PathLike) -> bool:
    """Whether `path` is a `.weights.h5` file whose encoder holds its variables itself (the 0.1 layout)."""
    if not str(path).endswith(".weights.h5") or not os.path.isfile(path):
        return False
    try:
        with h5py.File(path, "r") as f:
            group = f.get(f"{ENCODER}/vars")
            return isinstance(group, h5py.Group) and len(group) > 0
    except OSError:  # not an HDF5 file: let Keras report it
        return False


def _move(source: h5py.Group, names: list[str], target: h5py.Group) -> None:
    """Copies datasets `names` of `source` into `target` renumbered 0, 1, ... in that order."""
    for index, name in enumerate(names):
        source.copy(source[name], target, name=str(index))


def upgrade(src: str | os.PathLike, dst: str | os.PathLike, layout: str) -> None:
    """Writes `src` (0.1 layout) to `dst` in the current layout for a model of kind `layout` (see `LAYOUTS`)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}; got {layout!r}.")
    shutil.copyfile(src, dst)
    with h5py.File(dst, "r+") as f:
        old = f[f"{ENCODER}/vars"]
        names = sorted(old, key=int)
        networks, mixing = names[:-MIXING_VARIABLES], names[-MIXING_VARIABLES:]
        _move(old, networks, f.require_group(NETWORKS))
        if layout == MIXTURE_LAYOUT:
            _move(old, mixing, f.require_group(MIXING))
            own = f.get("vars")
            if isinstance(own, h5py.Group) and len(own):
                _move(own, sorted(own, key=int), f.require_group(TRAINER))
                del f["vars"]
                f.create_group("vars")  # the model itself still has a (now empty) entry
        del f[f"{ENCODER}/vars"]
        f.create_group(f"{ENCODER}/vars")


@contextlib.contextmanager
def upgraded_copy(path: str | os.PathLike, layout: str) -> Iterator[str]:
    """Yields `path` itself, or a temporary current-layout copy of it when it is a 0.1 file."""
    if not is_legacy(path):
        yield str(path)
        return
    directory = tempfile.mkdtemp(prefix="tf_rmvae_weights_")
    try:
        copy = os.path.join(directory, "upgraded.weights.h5")
        upgrade(path, copy, layout)
        yield copy
    finally:
        shutil.rmtree(directory, ignore_errors=True)
