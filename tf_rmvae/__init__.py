"""tf-rmvae: Recursive Mixture Estimation for variational autoencoders (Keras 3 + TFP).

Kim & Pavlovic, "Recursive Inference for Variational Autoencoders", NeurIPS 2020 (arXiv:2011.08544).
"""

from tf_rmvae import export, mixing, objectives, recursion
from tf_rmvae.callbacks import ComponentSchedule, NonFiniteInputGuard
from tf_rmvae.component_networks import ComponentNetworks
from tf_rmvae.decoders import BernoulliDecoder, GaussianDecoder, ImageDecoder, make_decoder
from tf_rmvae.encoders import GaussianEncoder, RecursiveMixtureEncoder, make_mixture
from tf_rmvae.mixing_weights import RecursiveMixingWeights
from tf_rmvae.models import RecursiveMixtureVAE
from tf_rmvae.recursion import METHODS, SCHEDULES, RecursiveMixtureTrainer

__version__ = "0.1.0"

__all__ = [
    "BernoulliDecoder",
    "ComponentNetworks",
    "ComponentSchedule",
    "GaussianDecoder",
    "GaussianEncoder",
    "ImageDecoder",
    "METHODS",
    "NonFiniteInputGuard",
    "RecursiveMixingWeights",
    "RecursiveMixtureEncoder",
    "RecursiveMixtureTrainer",
    "RecursiveMixtureVAE",
    "SCHEDULES",
    "make_decoder",
    "export",
    "make_mixture",
    "mixing",
    "objectives",
    "recursion",
]
