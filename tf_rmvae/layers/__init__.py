"""Keras layers of the models: component networks (`[M, ...]` outputs), mixing weights, the encoders that compose
them, and decoders. A layer knows nothing of how it is trained (nothing here imports models, run code or data)."""
