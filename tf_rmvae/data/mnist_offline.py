"""Offline MNIST as a registered tfds dataset, ``rmvae_mnist``.

The builder reads the four gzip-compressed IDX files vendored in ``tf_rmvae/data/mnist/`` (see the README
there for provenance and license), checks each one against ``SHA256SUMS`` and writes an ordinary tfds
dataset; nothing is downloaded. Importing this module (or ``tf_rmvae.data``) registers the builder, so

    tfds.load("rmvae_mnist", data_dir=...)

works without network access. Features: ``image`` uint8 ``[28, 28, 1]``, ``label`` ``ClassLabel(10)``;
splits ``train`` (60,000) and ``test`` (10,000).

The source directory can be overridden (for tests, or a copy kept elsewhere) with the builder keyword
``source_dir``: ``tfds.builder("rmvae_mnist", data_dir=..., source_dir=...)``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import sys

# tensorflow-datasets 4.9.x references ``importlib_resources`` (the PyPI backport) when it resolves a
# builder's code path during ``download_and_prepare``, but only declares it as a dependency for
# Python < 3.9. The standard library module provides the one attribute it uses (``abc.Traversable``).
try:  # pragma: no cover - depends on the environment
    import importlib_resources  # noqa: F401
except ImportError:  # pragma: no cover
    import importlib.resources
    import importlib.resources.abc  # noqa: F401

    sys.modules.setdefault("importlib_resources", importlib.resources)

import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402

#: Directory holding the vendored IDX files and ``SHA256SUMS``.
DEFAULT_SOURCE_DIR = pathlib.Path(__file__).resolve().parent / "mnist"

#: split name -> (images file, labels file, number of examples)
SOURCE_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}

_IMAGES_MAGIC = 0x00000803
_LABELS_MAGIC = 0x00000801

_CITATION = """\
@article{lecun1998gradient,
  title={Gradient-based learning applied to document recognition},
  author={LeCun, Yann and Bottou, L{\\'e}on and Bengio, Yoshua and Haffner, Patrick},
  journal={Proceedings of the IEEE},
  volume={86}, number={11}, pages={2278--2324}, year={1998}
}
"""


def read_checksums(source_dir: str | os.PathLike) -> dict[str, str]:
    """Parse ``source_dir/SHA256SUMS`` (``<hex digest>  <file name>`` lines) into ``{name: digest}``."""
    path = pathlib.Path(source_dir) / "SHA256SUMS"
    if not path.exists():
        raise FileNotFoundError(f"rmvae_mnist: checksum file {path} not found")
    sums = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest, name = line.split(maxsplit=1)
        sums[name.lstrip("*")] = digest.lower()
    return sums


def verify_file(path: str | os.PathLike, expected_sha256: str) -> None:
    """Raise ``ValueError`` naming ``path`` if its SHA-256 differs from ``expected_sha256``."""
    path = pathlib.Path(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected_sha256.lower():
        raise ValueError(
            f"rmvae_mnist: checksum mismatch for {path.name} ({path}): expected sha256 {expected_sha256}, "
            f"got {digest}. The vendored MNIST file is corrupt or was modified."
        )


def verify_sources(source_dir: str | os.PathLike = DEFAULT_SOURCE_DIR) -> None:
    """Check all four IDX files in ``source_dir`` against its ``SHA256SUMS`` (``ValueError`` on mismatch)."""
    source_dir = pathlib.Path(source_dir)
    sums = read_checksums(source_dir)
    for images_file, labels_file, _ in SOURCE_FILES.values():
        for name in (images_file, labels_file):
            if name not in sums:
                raise ValueError(f"rmvae_mnist: {name} is not listed in {source_dir / 'SHA256SUMS'}")
            path = source_dir / name
            if not path.exists():
                raise FileNotFoundError(f"rmvae_mnist: source file {path} not found")
            verify_file(path, sums[name])


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a gzip-compressed IDX file into a uint8 array (``[N, 28, 28]`` images or ``[N]`` labels)."""
    path = pathlib.Path(path)
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    if magic not in (_IMAGES_MAGIC, _LABELS_MAGIC):
        raise ValueError(f"rmvae_mnist: {path.name} is not an MNIST IDX file (magic {magic:#010x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    array = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if array.size != int(np.prod(dims)):
        raise ValueError(f"rmvae_mnist: {path.name} holds {array.size} bytes, header says {dims}")
    return array.reshape(dims)


def load_split_arrays(split: str, source_dir: str | os.PathLike = DEFAULT_SOURCE_DIR):
    """Return ``(images uint8 [N, 28, 28, 1], labels int64 [N])`` for ``split`` from the IDX files."""
    images_file, labels_file, count = SOURCE_FILES[split]
    source_dir = pathlib.Path(source_dir)
    images = read_idx(source_dir / images_file)[..., None]
    labels = read_idx(source_dir / labels_file).astype(np.int64)
    if images.shape != (count, 28, 28, 1) or labels.shape != (count,):
        raise ValueError(
            f"rmvae_mnist: unexpected shapes for split {split!r}: images {images.shape}, labels {labels.shape}"
        )
    return images, labels


class RmvaeMnist(tfds.core.GeneratorBasedBuilder):
    """MNIST built from the IDX files vendored with tf-rmvae (no download)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "MNIST from the vendored IDX files, SHA-256 verified."}

    def __init__(self, *, source_dir: str | os.PathLike | None = None, **kwargs):
        """``source_dir``: folder with the IDX ``.gz`` files and ``SHA256SUMS`` (default: vendored copy)."""
        self._source_dir = pathlib.Path(source_dir) if source_dir is not None else DEFAULT_SOURCE_DIR
        super().__init__(**kwargs)

    @property
    def source_dir(self) -> pathlib.Path:
        return self._source_dir

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=(
                "The MNIST database of handwritten digits (Yann LeCun, Corinna Cortes, Christopher J.C. "
                "Burges), read offline from the copy vendored in tf_rmvae/data/mnist."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="http://yann.lecun.com/exdb/mnist/",
            citation=_CITATION,
            license="CC BY-SA 3.0",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download.
        verify_sources(self._source_dir)
        return {split: self._generate_examples(split) for split in SOURCE_FILES}

    def _generate_examples(self, split: str):
        images, labels = load_split_arrays(split, self._source_dir)
        for i in range(images.shape[0]):
            yield i, {"image": images[i], "label": labels[i]}
