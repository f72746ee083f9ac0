"""tf-rmvae: Recursive Mixture Estimation for variational autoencoders (Keras 3 + TFP)."""

__version__ = "0.1.0"
