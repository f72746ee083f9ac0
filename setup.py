"""Packaging for tf-rmvae (Recursive Mixture Estimation for VAEs, Keras 3 + TFP)."""

from setuptools import find_packages, setup

setup(
    name="tf-rmvae",
    version="0.2.0",
    description=(
        "Recursive Mixture Estimation (Kim & Pavlovic, NeurIPS 2020) for variational "
        "autoencoders in Keras 3 and TensorFlow Probability"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["tf_rmvae", "tf_rmvae.*", "trainers", "trainers.*", "benchmarks"]),
    package_data={"tf_rmvae": ["data/mnist/*.gz", "data/mnist/SHA256SUMS", "data/mnist/*.md"]},
    include_package_data=True,
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.15,<4",
        "tensorflow-probability[tf]>=0.25,<0.26",
        "tensorflow-datasets>=4.9,<5",
        "importlib_resources>=6",  # tfds 4.9.10 imports it in download_and_prepare but does not declare it
        "absl-py>=2.0",
        "h5py>=3.10",  # the resume state's metadata lives in its .weights.h5 file (tf_rmvae.run.directory)
        "numpy>=1.26",
        "matplotlib>=3.8",
        "tensorboard>=2.21,<2.22",
    ],
    extras_require={
        "dev": ["pytest>=8", "hypothesis>=6", "ruff>=0.5"],
    },
    entry_points={
        "console_scripts": [
            "rmvae-train=trainers.train:run",
            "rmvae-benchmark=trainers.benchmark:run",
            "rmvae-publish=trainers.publish:run",
        ],
    },
)
