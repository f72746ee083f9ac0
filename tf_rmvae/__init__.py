"""tf-rmvae: Recursive Mixture Estimation for variational autoencoders (Keras 3 + TFP).

Kim & Pavlovic, "Recursive Inference for Variational Autoencoders", NeurIPS 2020 (arXiv:2011.08544).

The names below are imported on first use (PEP 562 module `__getattr__`), so that
`import tf_rmvae.config` (settings, no TensorFlow) does not import TensorFlow through this package.
`from tf_rmvae import RecursiveMixtureVAE` works as usual. Keras finds a saved class only once its module is
imported (that registers it), so where Keras is already imported, `import tf_rmvae` imports the modules of every
serializable class (`SERIALIZABLE_MODULES`) and `keras.models.load_model` then reads any `.keras` file of this
package; otherwise (TensorFlow not loaded yet) it stays lazy, and importing a model's module
(`tf_rmvae.models.recursive_mixture_vae`) registers them.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from tf_rmvae.version import __version__  # noqa: F401  (the installed metadata; see tf_rmvae.version)

# {public name: the module that defines it, or "module:name" where the name there differs}; a name equal to its
# module's last part is the module itself (`tf_rmvae.models.recursion` is `tf_rmvae.models.recursion`).
_LAZY = {
    "build_model": "tf_rmvae.run.factory:build_preset_model",
    "export": "tf_rmvae.export",
    "mixing": "tf_rmvae.mixing",
    "objectives": "tf_rmvae.objectives",
    "recursion": "tf_rmvae.models.recursion",
    "ComponentSchedule": "tf_rmvae.models.callbacks",
    "NonFiniteInputGuard": "tf_rmvae.models.callbacks",
    "ComponentNetworks": "tf_rmvae.layers.component_networks",
    "BernoulliDecoder": "tf_rmvae.layers.decoders",
    "GaussianDecoder": "tf_rmvae.layers.decoders",
    "ImageDecoder": "tf_rmvae.layers.decoders",
    "make_decoder": "tf_rmvae.layers.decoders",
    "GaussianEncoder": "tf_rmvae.layers.encoders",
    "RecursiveMixtureEncoder": "tf_rmvae.layers.encoders",
    "make_mixture": "tf_rmvae.layers.encoders",
    "RecursiveMixingWeights": "tf_rmvae.layers.mixing_weights",
    "RecursiveMixtureVAE": "tf_rmvae.models.recursive_mixture_vae",
    "METHODS": "tf_rmvae.models.recursion",
    "SCHEDULES": "tf_rmvae.models.recursion",
    "RecursiveMixtureTrainer": "tf_rmvae.models.recursion",
}

__all__ = [
    "build_model",
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

if TYPE_CHECKING:  # what static analysis and IDEs see
    from tf_rmvae import export, mixing, objectives
    from tf_rmvae.layers.component_networks import ComponentNetworks
    from tf_rmvae.layers.decoders import BernoulliDecoder, GaussianDecoder, ImageDecoder, make_decoder
    from tf_rmvae.layers.encoders import GaussianEncoder, RecursiveMixtureEncoder, make_mixture
    from tf_rmvae.layers.mixing_weights import RecursiveMixingWeights
    from tf_rmvae.models import recursion
    from tf_rmvae.models.callbacks import ComponentSchedule, NonFiniteInputGuard
    from tf_rmvae.models.recursion import METHODS, SCHEDULES, RecursiveMixtureTrainer
    from tf_rmvae.models.recursive_mixture_vae import RecursiveMixtureVAE
    from tf_rmvae.run.factory import build_preset_model as build_model


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'tf_rmvae' has no attribute {name!r}")
    module_name, _, attribute = _LAZY[name].partition(":")
    module = importlib.import_module(module_name)
    value = module if module_name.rpartition(".")[2] == name and not attribute else getattr(module, attribute or name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


#: Modules defining the classes registered with Keras (`keras.saving.register_keras_serializable`).
SERIALIZABLE_MODULES = (
    "tf_rmvae.layers.decoders", "tf_rmvae.models.recursive_mixture_vae", "tf_rmvae.models.semi_amortized")


def register_serializables() -> None:
    """Imports `SERIALIZABLE_MODULES` (and so TensorFlow), registering every saved class of the package with Keras."""
    for module in SERIALIZABLE_MODULES:
        importlib.import_module(module)


if "keras" in sys.modules:  # TensorFlow is loaded already: registering costs little
    register_serializables()
