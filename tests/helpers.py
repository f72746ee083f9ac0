"""Small shared fixtures for the tests: real MNIST digits from the vendored files, tiny models."""

from __future__ import annotations

import gzip
import os

import numpy as np

import tf_rmvae

MNIST_DIR = os.path.join(os.path.dirname(tf_rmvae.__file__), "data", "mnist")


def mnist_digits(count: int, split: str = "train", seed: int = 0) -> np.ndarray:
    """First `count` MNIST digits of `split`, binarized with a fixed seed: float32 `[count, 28, 28, 1]`."""
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(os.path.join(MNIST_DIR, f"{prefix}-images-idx3-ubyte.gz")) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)[:count]
    rng = np.random.default_rng(seed)
    return (rng.random(images.shape) < images / 255.0).astype("float32")


#: The settings the tests' small models train with unless a test names others: the paper's component criteria (ELBO
#: with lambda 0.3, one sample per component) on independent networks, the classes' defaults before they became the
#: recommended model's (`config.DEFAULTS`); cheap on a CPU, and what the tests' thresholds were measured on.
TEST_SETTINGS = dict(lambda_kl=0.3, num_samples=1, component_bound="elbo")


def tiny_model(method: str = "rme", components: int = 3, latent_dim: int = 8, hidden: int = 64,
               shared_trunk: bool = False, per_example_proportions: bool = False, **kwargs):
    """A small dense RecursiveMixtureVAE for 28x28x1 images, on `TEST_SETTINGS` where `kwargs` do not say."""
    encoder = tf_rmvae.RecursiveMixtureEncoder(
        latent_dim, 1 if method == "vae" else components, hidden_units=(hidden,), seed=3, shared_trunk=shared_trunk,
        per_example_proportions=per_example_proportions,
    )
    decoder = tf_rmvae.BernoulliDecoder((28, 28, 1), hidden_units=(hidden,))
    return tf_rmvae.RecursiveMixtureVAE(encoder, decoder, method=method, **{**TEST_SETTINGS, **kwargs})
