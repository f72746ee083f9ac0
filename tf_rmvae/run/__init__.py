"""One training run: the configuration (`config`, no TensorFlow), the model factory, training, the run directory,
evaluation, the best checkpoint, guards, summaries, figures and strategies. Imports point down only (models, layers,
data, export); nothing below imports this package."""
