"""Tests of tf_rmvae.data: the offline rmvae_mnist builder and the tf.data pipelines."""

import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from tf_rmvae import data
from tf_rmvae.data import mnist_offline

MOCKED = ["mnist", "fashion_mnist", "binarized_mnist", "omniglot", "svhn_cropped", "celeb_a"]


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory):
    """A tfds data_dir with rmvae_mnist prepared once for the whole session."""
    data_dir = tmp_path_factory.mktemp("tfds")
    tfds.builder("rmvae_mnist", data_dir=str(data_dir)).download_and_prepare()
    return str(data_dir)


def _epoch(ds):
    return np.concatenate([b.numpy() for b in ds])


# ----------------------------------------------------------------------------------------- rmvae_mnist


def test_vendored_files_match_checksums():
    mnist_offline.verify_sources(mnist_offline.DEFAULT_SOURCE_DIR)
    readme = (mnist_offline.DEFAULT_SOURCE_DIR / "README.md").read_text()
    assert "CC BY-SA 3.0" in readme
    for name, digest in mnist_offline.read_checksums(mnist_offline.DEFAULT_SOURCE_DIR).items():
        assert digest in readme, name


def test_rmvae_mnist_registered_and_counts(mnist_dir):
    assert "rmvae_mnist" in tfds.list_builders()
    builder = tfds.builder("rmvae_mnist", data_dir=mnist_dir)
    assert builder.is_prepared()
    assert builder.info.splits["train"].num_examples == 60000
    assert builder.info.splits["test"].num_examples == 10000
    assert builder.info.features["image"].shape == (28, 28, 1)
    assert builder.info.features["label"].num_classes == 10


def test_rmvae_mnist_tfds_load_offline(mnist_dir):
    ds = tfds.load("rmvae_mnist", split="test", data_dir=mnist_dir, batch_size=10000)
    batch = next(iter(ds))
    images, labels = batch["image"].numpy(), batch["label"].numpy()
    assert images.shape == (10000, 28, 28, 1) and images.dtype == np.uint8
    assert 0.12 < images.mean() / 255.0 < 0.145  # MNIST test pixel mean is 0.1325
    counts = np.bincount(labels, minlength=10)
    assert counts.sum() == 10000 and counts.min() > 850 and counts.max() < 1200
    # The known MNIST test label counts.
    np.testing.assert_array_equal(counts, [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])


def test_train_label_counts_from_idx():
    _, labels = mnist_offline.load_split_arrays("train")
    np.testing.assert_array_equal(
        np.bincount(labels, minlength=10), [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    )


def test_checksum_mismatch_names_the_file(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(mnist_offline.DEFAULT_SOURCE_DIR, src)
    bad = src / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(bad.read_bytes())
    raw[-1] ^= 0xFF
    bad.chmod(0o644)
    bad.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum mismatch for t10k-labels-idx1-ubyte.gz"):
        mnist_offline.verify_sources(src)
    builder = tfds.builder("rmvae_mnist", data_dir=str(tmp_path / "tfds"), source_dir=str(src))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz"):
        builder.download_and_prepare()
    assert not builder.is_prepared()


def test_read_idx_rejects_non_idx(tmp_path):
    import gzip

    path = tmp_path / "bogus.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"\x00\x00\x08\x04" + b"\x00" * 16)
    with pytest.raises(ValueError, match="not an MNIST IDX file"):
        mnist_offline.read_idx(path)


# -------------------------------------------------------------------------------------------- pipeline


def test_specs():
    assert data.DEFAULT_DATASET == "rmvae_mnist"
    assert set(data.SUPPORTED_DATASETS) == {"rmvae_mnist", *MOCKED}
    assert data.get_dataset_spec("omniglot").image_shape == (28, 28, 1)
    assert data.get_dataset_spec("celeb_a").image_shape == (64, 64, 3)
    assert data.get_dataset_spec("svhn_cropped").image_shape == (32, 32, 3)
    assert not data.get_dataset_spec("celeb_a").binary
    spec = data.get_dataset_spec("rmvae_mnist")
    with pytest.raises(AttributeError):
        spec.binary = False  # frozen


def test_load_dataset_rmvae_mnist_batches(mnist_dir):
    ds = data.load_dataset("rmvae_mnist", "train", 32, data_dir=mnist_dir, take=100)
    assert ds.element_spec.shape.as_list() == [None, 28, 28, 1]
    assert ds.element_spec.dtype == tf.float32
    batches = [b.numpy() for b in ds]
    assert [b.shape[0] for b in batches] == [32, 32, 32, 4]
    assert set(np.unique(np.concatenate(batches))) <= {0.0, 1.0}
    ds = data.load_dataset("rmvae_mnist", "train", 32, data_dir=mnist_dir, take=100, drop_remainder=True)
    assert ds.element_spec.shape.as_list() == [32, 28, 28, 1]
    assert len(list(ds)) == 3


@pytest.mark.slow
def test_dynamic_binarization_matches_intensity(mnist_dir):
    raw = tfds.load("rmvae_mnist", split="train", data_dir=mnist_dir, batch_size=2000)
    intensity = next(iter(raw))["image"].numpy().astype(np.float32) / 255.0
    ds = data.load_dataset("rmvae_mnist", "train", 2000, data_dir=mnist_dir, take=2000, shuffle=False)
    x = _epoch(ds)
    assert abs(x.mean() - intensity.mean()) < 0.003
    # Averaged over many epochs, every pixel's frequency approaches its intensity.
    small = data.load_dataset("rmvae_mnist", "train", 64, data_dir=mnist_dir, take=64, shuffle=False)
    freq = np.mean([_epoch(small) for _ in range(100)], axis=0)
    assert np.abs(freq - intensity[:64]).mean() < 0.02
    assert np.all(freq[intensity[:64] == 0.0] == 0.0)
    assert np.all(freq[intensity[:64] == 1.0] == 1.0)


def test_dynamic_binarization_epochs_differ_and_seed_reproducible(mnist_dir):
    def make(seed, **kw):
        return data.load_dataset("rmvae_mnist", "train", 50, data_dir=mnist_dir, take=200, seed=seed, **kw)

    ds = make(0, shuffle=False)
    e1, e2 = _epoch(ds), _epoch(ds)
    assert e1.shape == (200, 28, 28, 1)
    assert not np.array_equal(e1, e2)

    for shuffle in (False, True):
        a, b = make(3, shuffle=shuffle), make(3, shuffle=shuffle)
        a1, a2 = _epoch(a), _epoch(a)
        b1, b2 = _epoch(b), _epoch(b)
        np.testing.assert_array_equal(a1, b1)
        np.testing.assert_array_equal(a2, b2)
        assert not np.array_equal(_epoch(make(4, shuffle=shuffle)), a1)

    rep = make(5, shuffle=False, repeat=True)
    it = iter(rep.take(8))
    first = np.concatenate([next(it).numpy() for _ in range(4)])
    second = np.concatenate([next(it).numpy() for _ in range(4)])
    assert not np.array_equal(first, second)
    # Both epochs binarize the same 200 digits, so their ink density is close.
    assert abs(first.mean() - second.mean()) < 0.01


def test_test_split_binarization_is_fixed(mnist_dir):
    kw = dict(data_dir=mnist_dir, take=300)
    ds = data.load_dataset("rmvae_mnist", "test", 64, shuffle=False, **kw)
    e1, e2 = _epoch(ds), _epoch(ds)
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_array_equal(
        e1, _epoch(data.load_dataset("rmvae_mnist", "test", 7, shuffle=False, **kw))
    )
    x = data.load_numpy("rmvae_mnist", "test", **kw)
    assert x.dtype == np.float32 and x.shape == (300, 28, 28, 1)
    np.testing.assert_array_equal(x, e1)
    # Shuffling reorders but does not resample.
    shuffled = _epoch(data.load_dataset("rmvae_mnist", "test", 64, shuffle=True, seed=9, **kw))
    assert sorted(map(bytes, shuffled)) == sorted(map(bytes, e1))
    # Another binarize seed gives other digits; explicit dynamic mode resamples.
    assert not np.array_equal(data.load_numpy("rmvae_mnist", "test", seed=1, **kw), x)
    dyn = data.load_dataset("rmvae_mnist", "test", 64, shuffle=False, binarization="dynamic", **kw)
    assert not np.array_equal(_epoch(dyn), _epoch(dyn))


def test_load_numpy_full_test_split(mnist_dir):
    x = data.load_numpy("rmvae_mnist", "test", data_dir=mnist_dir)
    assert x.shape == (10000, 28, 28, 1) and x.dtype == np.float32
    assert set(np.unique(x)) == {0.0, 1.0}
    assert 0.12 < x.mean() < 0.145


# ------------------------------------------------------------------------------------------ mock data


@pytest.mark.parametrize("name", MOCKED)
@pytest.mark.parametrize("split", ["train", "test"])
def test_mocked_datasets(name, split):
    spec = data.get_dataset_spec(name)
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = data.load_dataset(name, split, 4, seed=1)
        batches = [b.numpy() for b in ds]
        x = data.load_numpy(name, split)
    assert [b.shape for b in batches] == [(4, *spec.image_shape), (2, *spec.image_shape)]
    assert all(b.dtype == np.float32 for b in batches) and x.dtype == np.float32
    assert x.shape == (6, *spec.image_shape)
    for arr in (*batches, x):
        assert arr.min() >= 0.0 and arr.max() <= 1.0
        if spec.binary:
            assert set(np.unique(arr)) <= {0.0, 1.0}
    if not spec.binary:
        assert np.unique(x).size > 2


def _mock_images(image):
    """An ``as_dataset_fn`` for ``tfds.testing.mock_data`` yielding 3 copies of ``image``."""

    def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
        return tf.data.Dataset.from_tensors({"image": tf.constant(image)}).repeat(3)

    return as_dataset


def test_omniglot_grayscale_invert_resize():
    image = np.full((105, 105, 3), 255, np.uint8)  # white paper
    image[30:75, 30:75] = 0  # a black stroke block
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_dataset_fn=_mock_images(image)):
        x = data.load_numpy("omniglot", "test")
    assert x.shape == (3, 28, 28, 1)
    assert x[:, :6, :6].max() == 0.0  # background -> 0
    assert x[:, 10:18, 10:18].min() == 1.0  # strokes -> 1
    # Blurred edges (intensities in (0, 1)) are sampled per example: the copies differ only there.
    assert 0 < np.abs(x[0] - x[1]).sum() < 60


def test_celeb_a_center_crop_resize():
    image = np.zeros((218, 178, 3), np.uint8)
    top, left = (218 - 140) // 2, (178 - 140) // 2
    image[top : top + 140, left : left + 140] = 200  # only the central 140x140 crop is bright
    with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_dataset_fn=_mock_images(image)):
        x = data.load_numpy("celeb_a", "test")
    assert x.shape == (3, 64, 64, 3)
    np.testing.assert_allclose(x, 200 / 255, atol=1 / 255)


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="Unknown dataset 'cifar10'.*celeb_a.*rmvae_mnist"):
        data.get_dataset_spec("cifar10")
    with pytest.raises(ValueError, match="Supported datasets"):
        data.load_dataset("nope", "train", 8)
    with pytest.raises(ValueError, match="Supported datasets"):
        data.load_numpy("nope", "train")


def test_unknown_split(mnist_dir):
    with pytest.raises(ValueError, match="Unknown split 'validation'.*Available splits: test, train"):
        data.load_dataset("rmvae_mnist", "validation", 8, data_dir=mnist_dir)
    with pytest.raises(ValueError, match="Available splits: test, train"):
        data.load_numpy("rmvae_mnist", "valid[:10]", data_dir=mnist_dir)
    with pytest.raises(ValueError, match="binarization"):
        data.load_dataset("rmvae_mnist", "train", 8, data_dir=mnist_dir, binarization="sometimes")


def test_unavailable_dataset_without_network(tmp_path, monkeypatch):
    import requests

    calls = []

    def no_network(self, url_or_urls, *args, **kwargs):
        calls.append(url_or_urls)
        raise requests.exceptions.ConnectionError("Failed to resolve host (no network)")

    monkeypatch.setattr(tfds.download.DownloadManager, "download_and_extract", no_network)
    monkeypatch.setattr(tfds.download.DownloadManager, "download", no_network)
    with pytest.raises(data.DatasetUnavailableError, match="network access.*data_dir.*rmvae_mnist") as info:
        data.load_dataset("fashion_mnist", "train", 8, data_dir=str(tmp_path))
    assert isinstance(info.value, RuntimeError)
    assert calls, "the tfds download path was not exercised"
    with pytest.raises(data.DatasetUnavailableError):
        data.load_numpy("fashion_mnist", "test", data_dir=str(tmp_path))


@pytest.mark.slow
def test_a_dataset_that_another_process_prepared_meanwhile_is_used(tmp_path, monkeypatch):
    # Two trainers started together on a fresh data_dir both prepare the dataset; tfds renames each finished copy
    # into place, so the slower one fails on the rename although the dataset is ready (seen with two benchmarks).
    prepare = tfds.core.DatasetBuilder.download_and_prepare

    def other_process_finished_first(self, *args, **kwargs):
        prepare(self, *args, **kwargs)  # the other process's copy lands
        raise FileExistsError(f"Cannot rename {self.data_dir}.incomplete. Destination {self.data_dir} already exists.")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", other_process_finished_first)
    images = data.load_numpy("rmvae_mnist", "test", take=4, data_dir=str(tmp_path))
    assert images.shape[0] == 4 and np.isin(images, (0.0, 1.0)).all()


def test_checksum_sha256_helper(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    mnist_offline.verify_file(path, hashlib.sha256(b"abc").hexdigest())
    with pytest.raises(ValueError, match="f.bin"):
        mnist_offline.verify_file(path, "0" * 64)


# ------------------------------------------------------------------------------------------ validation hold-out


def test_validation_is_held_out_from_the_end_of_the_training_split(mnist_dir):
    assert data.default_validation_examples(60000) == 10000  # MNIST: the usual last 10000 digits
    assert data.default_validation_examples(6000) == 1000
    assert data.holdout_splits("rmvae_mnist", -1, data_dir=mnist_dir) == ("train[:50000]", "train[50000:]")
    assert data.holdout_splits("rmvae_mnist", 0, data_dir=mnist_dir) == ("train", None)
    train_split, validation_split = data.holdout_splits("rmvae_mnist", 40, data_dir=mnist_dir)
    assert (train_split, validation_split) == ("train[:59960]", "train[59960:]")
    x = data.load_numpy("rmvae_mnist", validation_split, data_dir=mnist_dir)
    tail = data.load_numpy("rmvae_mnist", "train[59950:]", data_dir=mnist_dir)
    assert x.shape == (40, 28, 28, 1) and set(np.unique(x)) == {0.0, 1.0}
    # The same digits as the end of the training split, binarized once (fixed): the same set on every call.
    np.testing.assert_array_equal(x, data.load_numpy("rmvae_mnist", validation_split, data_dir=mnist_dir))
    np.testing.assert_allclose(x.mean(axis=(1, 2, 3)), tail[10:].mean(axis=(1, 2, 3)), atol=0.05)
    for bad in (60000, 70000, -2):
        with pytest.raises(ValueError, match="validation examples"):
            data.holdout_splits("rmvae_mnist", bad, data_dir=mnist_dir)


_CACHE_SCRIPT = """
import sys
import tensorflow_datasets as tfds
from tf_rmvae import data
from tf_rmvae.data.pipeline import load_epochs
data_dir = sys.argv[1]
for _ in data.load_dataset("rmvae_mnist", "train", 100, take=300, data_dir=data_dir):
    pass
for _ in load_epochs("rmvae_mnist", "train[:1000]", 100, 0, 2, take=300, data_dir=data_dir)[0]:
    pass
data.load_numpy("rmvae_mnist", "test", take=50, data_dir=data_dir)
print("ours done", file=sys.stderr, flush=True)
# Control: tfds's own auto-cache read partially, the cause of the warning, still warns at this log level.
for _ in tfds.builder("rmvae_mnist", data_dir=data_dir).as_dataset(split="test").take(5):
    pass
"""


@pytest.mark.slow
def test_pipelines_read_no_cache_partially(mnist_dir):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, mnist_dir], env=env, capture_output=True,
                            text=True, timeout=240, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0, result.stderr[-3000:]
    ours, control = result.stderr.split("ours done")
    assert "did not fully read the dataset being cached" not in ours
    assert "did not fully read the dataset being cached" in control
