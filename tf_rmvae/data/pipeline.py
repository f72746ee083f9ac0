"""Image pipelines for VAE training and evaluation: ``tf.data`` of float32 ``[B, H, W, C]`` in ``[0, 1]``.

Datasets come from tensorflow-datasets. ``rmvae_mnist`` (the default) is built from MNIST files shipped
with this package and works offline; every other dataset must have been downloaded (with network access)
or prepared into ``data_dir`` beforehand.

Binarization of ``binary`` datasets:

* **dynamic** (training): each pixel is resampled ``x ~ Bernoulli(intensity)`` every time an example is
  drawn, so every epoch sees fresh binary images. The noise is drawn by stateless ops keyed by ``seed``
  and a per-iteration random stream (``tf.data.Dataset.random(..., rerandomize_each_iteration=True)``):
  two epochs differ, and two pipelines built with the same ``seed`` (and the same global TF seed) yield
  identical batches.
* **fixed** (evaluation): each example ``i`` of the split (its position in the un-shuffled split) is
  binarized once with stateless noise keyed by ``(binarize_seed, i)``, independent of shuffling, batch
  size, epoch and global seeds. Every method evaluated with the same ``binarize_seed`` (default 0) thus
  scores the same binary digits. ``load_numpy`` always uses fixed binarization.

By default (``binarization="auto"``) the spec's training split (``"train"``, also sliced, e.g.
``"train[:90%]"``) is binarized dynamically and every other split (``"test"``, ``"validation"``, ...) is
binarized with the fixed seed.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Literal

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from tf_rmvae.data import mnist_offline  # noqa: F401  (registers the ``rmvae_mnist`` builder)

__all__ = [
    "DEFAULT_DATASET",
    "DatasetSpec",
    "DatasetUnavailableError",
    "MAX_DEFAULT_VALIDATION",
    "SHUFFLE_BUFFER",
    "SUPPORTED_DATASETS",
    "default_validation_examples",
    "get_dataset_spec",
    "holdout_splits",
    "load_dataset",
    "load_epochs",
    "load_numpy",
]

#: Shuffle buffer (examples) used by :func:`load_dataset`.
SHUFFLE_BUFFER = 10000

#: Most validation examples held out by default (:func:`default_validation_examples`).
MAX_DEFAULT_VALIDATION = 10000


class DatasetUnavailableError(RuntimeError):
    """The dataset is neither prepared in ``data_dir`` nor downloadable (e.g. no network access)."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How one tfds dataset becomes images for the VAEs.

    Attributes:
      name: key in :data:`SUPPORTED_DATASETS`.
      tfds_name: tfds builder name.
      image_shape: ``(H, W, C)`` of the images after preprocessing.
      binary: images are binary (``{0, 1}``); otherwise continuous in ``[0, 1]``.
      train_split, test_split: tfds split names for training and evaluation.
      resize: ``(H, W)`` to resize to (bilinear, antialiased), or ``None``.
      prebinarized: the stored images already are binary: no Bernoulli resampling, just scaling.
      grayscale: convert RGB to one gray channel before resizing.
      invert: replace intensity ``p`` by ``1 - p`` (dark strokes on white become 1s).
      center_crop: side of the square center crop taken before resizing, or ``None``.
    """

    name: str
    tfds_name: str
    image_shape: tuple[int, int, int]
    binary: bool
    train_split: str = "train"
    test_split: str = "test"
    resize: tuple[int, int] | None = None
    prebinarized: bool = False
    grayscale: bool = False
    invert: bool = False
    center_crop: int | None = None


SUPPORTED_DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("rmvae_mnist", "rmvae_mnist", (28, 28, 1), binary=True),
        DatasetSpec("mnist", "mnist", (28, 28, 1), binary=True),
        DatasetSpec("binarized_mnist", "binarized_mnist", (28, 28, 1), binary=True, prebinarized=True),
        DatasetSpec("fashion_mnist", "fashion_mnist", (28, 28, 1), binary=True),
        # tfds omniglot: 105x105x3 uint8, black strokes on white. As in the IWAE paper: 28x28, strokes = 1.
        DatasetSpec(
            "omniglot", "omniglot", (28, 28, 1), binary=True, resize=(28, 28), grayscale=True, invert=True
        ),
        DatasetSpec("svhn_cropped", "svhn_cropped", (32, 32, 3), binary=False),
        # tfds celeb_a: 218x178x3. Center crop 140x140, resize to 64x64.
        DatasetSpec("celeb_a", "celeb_a", (64, 64, 3), binary=False, resize=(64, 64), center_crop=140),
    )
}

#: The dataset used when none is named: MNIST shipped with the package, available offline.
DEFAULT_DATASET = "rmvae_mnist"

Binarization = Literal["auto", "dynamic", "fixed"]

# Errors raised by tfds (and requests/urllib under it) when a download cannot happen.
_DOWNLOAD_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # requests.ConnectionError, urllib errors, socket errors, missing files
    tfds.core.download.util.DownloadError,
    tfds.core.download.download_manager.NonMatchingChecksumError,
)
try:  # pragma: no cover - requests is a tfds dependency
    import requests

    _DOWNLOAD_ERRORS += (requests.exceptions.RequestException,)
except ImportError:  # pragma: no cover
    pass


def get_dataset_spec(name: str) -> DatasetSpec:
    """Return the :class:`DatasetSpec` for ``name``; ``ValueError`` listing the supported names if unknown."""
    try:
        return SUPPORTED_DATASETS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown dataset {name!r}. Supported datasets: {', '.join(sorted(SUPPORTED_DATASETS))}."
        ) from None


def default_validation_examples(train_split_size: int) -> int:
    """Validation examples held out of a training split of ``train_split_size`` when none are asked for.

    ``min(10000, N // 6)``: the last 10000 of MNIST's (and Fashion-MNIST's) 60000 training digits, the held-out set
    of published VAE results; a sixth of smaller training splits, so most of them still trains.
    """
    return min(MAX_DEFAULT_VALIDATION, int(train_split_size) // 6)


def holdout_splits(
    name: str, validation_examples: int, *, data_dir: str | os.PathLike | None = None
) -> tuple[str, str | None]:
    """``(training split, validation split)``: the last ``validation_examples`` of the dataset's training split held
    out for validation, as tfds slices (e.g. ``("train[:50000]", "train[50000:]")`` for MNIST).

    ``validation_examples``: a count, ``-1`` for :func:`default_validation_examples`, or ``0`` for no validation
    (``(train_split, None)``). The hold-out is deterministic (the end of the stored order), so every run and every
    method validates on the same examples; load them with :func:`load_numpy` (fixed binarization).

    Raises:
      ValueError: ``validation_examples`` leaves no training example, or is below -1.
    """
    spec = get_dataset_spec(name)
    if validation_examples == 0:
        return spec.train_split, None
    size = split_size(name, spec.train_split, data_dir=data_dir)
    count = default_validation_examples(size) if validation_examples == -1 else int(validation_examples)
    if not 0 < count < size:
        raise ValueError(f"Cannot hold out {validation_examples} validation examples of the {size} examples of "
                         f"{name!r} split {spec.train_split!r}: use 0 (none), -1 (default) or 1 to {size - 1}.")
    first = size - count
    return f"{spec.train_split}[:{first}]", f"{spec.train_split}[{first}:]"


def split_size(name: str, split: str, *, data_dir: str | os.PathLike | None = None) -> int:
    """Number of examples of ``split`` (slicing allowed) of the dataset ``name``, from its tfds metadata."""
    spec = get_dataset_spec(name)
    builder = _prepared_builder(spec, data_dir)
    _check_split(builder, spec, split)
    return int(builder.info.splits[split].num_examples)


def _base_split(split: str) -> str:
    """``"train[:10%]"`` -> ``"train"``."""
    return split.split("[", 1)[0].strip()


def _prepared_builder(spec: DatasetSpec, data_dir: str | os.PathLike | None) -> tfds.core.DatasetBuilder:
    """The tfds builder of ``spec``, prepared in ``data_dir`` (tfds default if None); downloads if needed."""
    data_dir = os.fspath(data_dir) if data_dir is not None else None
    builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
    if not builder.is_prepared():
        try:
            builder.download_and_prepare()
        except _DOWNLOAD_ERRORS as e:
            # Two processes preparing one data_dir at once (two trainers started together): tfds renames each
            # finished copy into place, so the slower one fails on the rename although the dataset is ready.
            builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
            if builder.is_prepared():
                return builder
            where = data_dir or "the default tfds data_dir"
            raise DatasetUnavailableError(
                f"Dataset {spec.name!r} (tfds {spec.tfds_name!r}) is not prepared in {where} and could not "
                f"be downloaded ({type(e).__name__}: {e}). It must be downloaded with network access "
                f"(e.g. `tfds.builder({spec.tfds_name!r}, data_dir=...).download_and_prepare()`) or "
                f"prepared into data_dir beforehand. The dataset {DEFAULT_DATASET!r} ships with this "
                f"package and works offline."
            ) from e
    return builder


def _check_split(builder: tfds.core.DatasetBuilder, spec: DatasetSpec, split: str) -> None:
    """``ValueError`` listing the available splits if ``split`` is not one of them (when they are known)."""
    available = sorted(builder.info.splits.keys())
    if available and _base_split(split) not in available:
        raise ValueError(
            f"Unknown split {split!r} for dataset {spec.name!r}. Available splits: {', '.join(available)}."
        )


def _split_dataset(builder: tfds.core.DatasetBuilder, spec: DatasetSpec, split: str) -> tf.data.Dataset:
    """Un-shuffled images of ``split``: uint8 ``[H0, W0, C0]`` per element, in the stored order."""
    _check_split(builder, spec, split)
    # No tfds auto-cache: we cache the preprocessed uint8 images ourselves (`_cached_examples`), and tfds's cache of
    # the raw split, read partially by `take`, made tf.data warn "The calling iterator did not fully read the
    # dataset being cached" on every run.
    read_config = tfds.ReadConfig(try_autocache=False)
    try:
        ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config)
    except (ValueError, KeyError) as e:
        available = sorted(builder.info.splits.keys())
        raise ValueError(
            f"Unknown split {split!r} for dataset {spec.name!r}. Available splits: "
            f"{', '.join(available) if available else 'unknown'}. ({e})"
        ) from e
    return ds.map(lambda ex: ex["image"], num_parallel_calls=tf.data.AUTOTUNE)


def _preprocess(image: tf.Tensor, spec: DatasetSpec) -> tf.Tensor:
    """uint8 ``[H0, W0, C0]`` -> float32 ``spec.image_shape`` intensities in ``[0, 1]``."""
    x = tf.cast(image, tf.float32) / 255.0
    if spec.grayscale and image.shape[-1] != 1:
        x = tf.image.rgb_to_grayscale(x)
    if spec.center_crop is not None:
        x = tf.image.resize_with_crop_or_pad(x, spec.center_crop, spec.center_crop)
    if spec.resize is not None:
        x = tf.image.resize(x, spec.resize, method="bilinear", antialias=True)
    if spec.invert:
        x = 1.0 - x
    x = tf.clip_by_value(x, 0.0, 1.0)
    return tf.ensure_shape(x, spec.image_shape)


def _to_uint8(x: tf.Tensor) -> tf.Tensor:
    """float ``[0, 1]`` -> uint8 ``[0, 255]`` (compact cache; exact for 8-bit sources and binary images)."""
    return tf.cast(tf.round(x * 255.0), tf.uint8)


def _fixed_binarize(index: tf.Tensor, x: tf.Tensor, binarize_seed: int) -> tf.Tensor:
    """Bernoulli(``x``) sample keyed only by ``(binarize_seed, index)``; ``x`` float32 ``[H, W, C]``."""
    seed = tf.stack([tf.constant(binarize_seed, tf.int64), tf.cast(index, tf.int64)])
    u = tf.random.stateless_uniform(tf.shape(x), seed=seed, dtype=tf.float32)
    return tf.cast(u < x, tf.float32)


def _resolve_binarization(spec: DatasetSpec, split: str, binarization: Binarization) -> str | None:
    """``None`` (no sampling), ``"dynamic"`` or ``"fixed"``."""
    if binarization not in ("auto", "dynamic", "fixed"):
        raise ValueError(f"binarization must be 'auto', 'dynamic' or 'fixed', got {binarization!r}")
    if not spec.binary or spec.prebinarized:
        return None
    if binarization == "auto":
        return "dynamic" if _base_split(split) == spec.train_split else "fixed"
    return binarization


def _examples(
    spec: DatasetSpec,
    split: str,
    *,
    data_dir: str | os.PathLike | None,
    take: int | None,
    mode: str | None,
    binarize_seed: int,
) -> tf.data.Dataset:
    """Deterministic per-example part of the pipeline: uint8 ``spec.image_shape`` (fixed-binarized if asked)."""
    builder = _prepared_builder(spec, data_dir)
    ds = _split_dataset(builder, spec, split)
    if take is not None:
        ds = ds.take(int(take))
    ds = ds.map(lambda img: _preprocess(img, spec), num_parallel_calls=tf.data.AUTOTUNE)
    if mode == "fixed":
        ds = ds.enumerate().map(
            lambda i, x: _fixed_binarize(i, x, binarize_seed), num_parallel_calls=tf.data.AUTOTUNE
        )
    elif spec.prebinarized:
        ds = ds.map(lambda x: tf.cast(x > 0.5, tf.float32), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.map(_to_uint8, num_parallel_calls=tf.data.AUTOTUNE)


def _cached_examples(name, split, batch_size, data_dir, take, cache, binarization, binarize_seed):
    """Checks the arguments; returns `(binarization mode, uint8 examples [H, W, C], cached as asked)`."""
    spec = get_dataset_spec(name)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    mode = _resolve_binarization(spec, split, binarization)
    examples = _examples(spec, split, data_dir=data_dir, take=take, mode=mode, binarize_seed=binarize_seed)
    if cache:
        examples = examples.cache(cache if isinstance(cache, str) else "")
    return mode, examples


def load_dataset(
    name: str,
    split: str,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    take: int | None = None,
    repeat: bool = False,
    drop_remainder: bool = False,
    cache: bool | str = True,
    binarization: Binarization = "auto",
    binarize_seed: int = 0,
) -> tf.data.Dataset:
    """Batches of images for training or evaluation (no labels).

    Args:
      name: a key of :data:`SUPPORTED_DATASETS`.
      split: tfds split, slicing allowed (``"train"``, ``"test"``, ``"train[:10%]"``).
      batch_size: examples per batch.
      shuffle: shuffle examples (buffer :data:`SHUFFLE_BUFFER`, reshuffled every epoch, seeded by ``seed``).
      seed: seed of shuffling and dynamic binarization.
      data_dir: tfds data directory; ``None`` uses tfds's default (``TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``). ``rmvae_mnist`` is prepared there from the vendored files if needed.
      take: use only the first ``take`` examples of the split (quick runs, tests).
      repeat: repeat indefinitely (each repetition reshuffled and, if dynamic, re-binarized).
      drop_remainder: drop the last incomplete batch.
      cache: cache the preprocessed uint8 images in memory (``True``), in a file (a path), or not (``False``).
        Binarization happens after the cache. Use ``False`` or a path for large datasets (``celeb_a``).
      binarization: for ``binary`` datasets, ``"dynamic"`` (fresh Bernoulli sample at each draw),
        ``"fixed"`` (one sample per example keyed by ``(binarize_seed, index)``) or ``"auto"``: dynamic on
        the spec's training split, fixed otherwise. Ignored for continuous and pre-binarized datasets.
      binarize_seed: seed of fixed binarization (same digits as :func:`load_numpy` with ``seed=binarize_seed``).

    Returns:
      ``tf.data.Dataset`` of float32 ``[B, H, W, C]`` with ``(H, W, C) = spec.image_shape``, values in
      ``[0, 1]`` (exactly ``{0, 1}`` for binary datasets).

    Raises:
      ValueError: unknown dataset name, split or binarization mode.
      DatasetUnavailableError: the dataset is not prepared in ``data_dir`` and cannot be downloaded.
    """
    mode, ds = _cached_examples(name, split, batch_size, data_dir, take, cache, binarization, binarize_seed)
    if shuffle:
        ds = ds.shuffle(SHUFFLE_BUFFER, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(lambda x: tf.cast(x, tf.float32) / 255.0, num_parallel_calls=tf.data.AUTOTUNE)
    if mode == "dynamic":
        # One int64 per batch, a different stream on every iteration (epoch) of the dataset.
        keys = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip((ds, keys))
        ds = ds.map(lambda x, key: _dynamic_binarize(x, key, seed), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def load_epochs(
    name: str,
    split: str,
    batch_size: int,
    first_epoch: int,
    epochs: int,
    *,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    take: int | None = None,
    drop_remainder: bool = True,
    cache: bool | str = True,
    binarization: Binarization = "auto",
    binarize_seed: int = 0,
) -> tuple[tf.data.Dataset, int]:
    """Training epochs ``first_epoch, ..., epochs - 1`` back to back, each a pure function of ``(seed, epoch)``.

    Like :func:`load_dataset` with ``shuffle=True``, except that epoch ``e``'s shuffle order and dynamic
    binarization are keyed by ``(seed, e)`` instead of by a per-iteration random stream. A run resumed at
    epoch ``e`` (a new process, a new iterator) therefore sees exactly the batches that the uninterrupted run
    saw in epoch ``e``. Give ``fit`` the returned ``steps_per_epoch``: Keras then keeps one iterator over all
    epochs.

    Returns:
      ``(dataset, steps_per_epoch)``: float32 ``[B, H, W, C]`` batches, ``steps_per_epoch`` per epoch
      (``ceil(N / B)``, or ``N // B`` with ``drop_remainder``), ``(epochs - first_epoch) * steps_per_epoch`` in all.
    """
    mode, examples = _cached_examples(name, split, batch_size, data_dir, take, cache, binarization, binarize_seed)
    count = int(examples.cardinality())
    if count < 0:  # unknown: count once
        count = int(examples.reduce(np.int64(0), lambda n, _: n + 1))
    steps = count // batch_size if drop_remainder else -(-count // batch_size)

    def epoch_batches(epoch):
        # A fixed graph-level seed inside this function, so the shuffle's seed is `(seed, epoch)` alone (and a
        # tensor op seed is accepted even when the global seed is 0).
        tf.random.set_seed(_EPOCH_GRAPH_SEED)
        op_seed = (tf.constant(seed, tf.int64) * 1_000_003 + epoch) % (2**31 - 1)
        ds = examples.shuffle(SHUFFLE_BUFFER, seed=op_seed, reshuffle_each_iteration=False)
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        ds = ds.map(lambda x: tf.cast(x, tf.float32) / 255.0, num_parallel_calls=tf.data.AUTOTUNE)
        if mode == "dynamic":
            key = tf.stack([tf.constant(seed, tf.int64), tf.cast(epoch, tf.int64)])
            ds = ds.enumerate().map(
                lambda i, x: _stateless_binarize(x, tf.random.experimental.stateless_fold_in(key, i)),
                num_parallel_calls=tf.data.AUTOTUNE,
            )
        return ds

    ds = tf.data.Dataset.range(int(first_epoch), int(epochs)).flat_map(epoch_batches)
    return ds.prefetch(tf.data.AUTOTUNE), steps


#: Graph-level seed of :func:`load_epochs`'s per-epoch pipelines.
_EPOCH_GRAPH_SEED = 1


def _stateless_binarize(x: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Bernoulli(``x``) with noise keyed by the stateless ``seed`` (int ``[2]``)."""
    u = tf.random.stateless_uniform(tf.shape(x), seed=seed, dtype=tf.float32)
    return tf.cast(u < x, tf.float32)


def _dynamic_binarize(x: tf.Tensor, key: tf.Tensor, seed: int) -> tf.Tensor:
    """Bernoulli(``x``) for a batch ``x`` float32 ``[B, H, W, C]``, noise keyed by ``(seed, key)``."""
    u = tf.random.stateless_uniform(
        tf.shape(x), seed=tf.stack([tf.constant(seed, tf.int64), key]), dtype=tf.float32
    )
    return tf.cast(u < x, tf.float32)


def load_numpy(
    name: str,
    split: str,
    *,
    take: int | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
) -> np.ndarray:
    """A whole split as float32 ``[N, H, W, C]`` in ``[0, 1]``, in the stored (un-shuffled) order.

    Same preprocessing as :func:`load_dataset`; binary datasets are binarized with the fixed seed ``seed``
    (equal to ``load_dataset(name, split, B, shuffle=False, binarization="fixed", binarize_seed=seed)``).
    """
    spec = get_dataset_spec(name)
    mode = _resolve_binarization(spec, split, "fixed")
    ds = _examples(spec, split, data_dir=data_dir, take=take, mode=mode, binarize_seed=seed)
    batches = [b.numpy() for b in ds.batch(4096)]
    if not batches:
        return np.zeros((0, *spec.image_shape), np.float32)
    return (np.concatenate(batches).astype(np.float32) / 255.0).astype(np.float32)
