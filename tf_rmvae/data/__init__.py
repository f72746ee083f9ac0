"""Datasets for tf-rmvae: tfds-backed ``tf.data`` pipelines of images in ``[0, 1]``.

Importing this package registers the offline tfds dataset ``rmvae_mnist`` (MNIST vendored in
``tf_rmvae/data/mnist``), the default dataset.
"""

from tf_rmvae.data.mnist_offline import RmvaeMnist
from tf_rmvae.data.pipeline import (
    DEFAULT_DATASET,
    SHUFFLE_BUFFER,
    SUPPORTED_DATASETS,
    DatasetSpec,
    DatasetUnavailableError,
    default_validation_examples,
    get_dataset_spec,
    holdout_splits,
    load_dataset,
    load_numpy,
)

__all__ = [
    "DEFAULT_DATASET",
    "SHUFFLE_BUFFER",
    "SUPPORTED_DATASETS",
    "DatasetSpec",
    "DatasetUnavailableError",
    "RmvaeMnist",
    "default_validation_examples",
    "get_dataset_spec",
    "holdout_splits",
    "load_dataset",
    "load_numpy",
]
