"""Models and the recursion: the latent-variable base, `RecursiveMixtureVAE`, the RME recursion usable by any Keras
VAE (`recursion`), SA-VAE, the model callbacks and the input checks. A model knows nothing of the run that trains it.
"""
