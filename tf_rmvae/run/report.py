"""One summary line per stage of a training run (data, training, evaluation, figures, export), printed on stdout.

    data: rmvae_mnist: 50000 training examples (train[:50000]; 500 steps of 100 per epoch), 10000 validation ...
    training: 10 of 10 epochs in 399 s; best validation importance-weighted bound -99.56 after epoch 10
    evaluation: test ELBO -102.52 ± 0.92, IWAE log-likelihood (K=100) -97.97 ± 0.88 nats on 1000 examples ...
    figures: reconstructions.png, samples.png, mixture_weights.png in runs/quick
    export: saved_models/rmvae_mnist_rme/1

The lines go to stdout (flushed, so they interleave with Keras's progress bar in order) rather than to the log, which
the programs keep at WARNING by default: these lines are the program's output. Epochs are counted from 1 here ("after
epoch 10" = the 10th epoch; `history.csv` numbers that epoch 9).
"""

from __future__ import annotations

import os
import sys
from typing import Mapping


def stage(name: str, message: str, enabled: bool = True) -> None:
    """Prints `name: message` on stdout (when `enabled`)."""
    if enabled:
        print(f"{name}: {message}", file=sys.stdout, flush=True)


def data_line(dataset: str, train_split: str, split_examples: int, train_examples: int, steps_per_epoch: int,
              batch_size: int, validation_split: str | None, validation_examples: int) -> str:
    """What trains (`train_examples` of the `split_examples` of `train_split`) and what validates."""
    source = train_split if train_examples >= split_examples else f"the first of {split_examples} of {train_split}"
    line = (f"{dataset}: {train_examples} training examples ({source}; {steps_per_epoch} steps of {batch_size} "
            "per epoch)")
    if validation_split is None:
        return line + ", no validation (--validation_examples=0)"
    return line + f", {validation_examples} validation examples ({validation_split}, evaluated after every epoch)"


#: How the lines name the trainer's best-checkpoint monitors (`choices.BEST_MONITORS`), and the sign that turns the
#: value into that quantity: the trainer monitors `val_loss` only on the importance-weighted bound.
MONITOR_NAMES = {"val_elbo": ("validation ELBO", 1.0), "val_loss": ("validation importance-weighted bound", -1.0)}


def monitored(best: Mapping) -> tuple[str, float]:
    """`(name, value)` of a best-checkpoint record's monitor, e.g. ("validation ELBO", -104.2); a monitor without a
    name here is named as logged."""
    name, sign = MONITOR_NAMES.get(best["monitor"], (best["monitor"], 1.0))
    return name, sign * float(best["value"])


def training_line(epochs_completed: int, epochs: int, resumed_from: int, seconds: float, best: Mapping | None,
                  stopped_early: bool, patience: int) -> str:
    """Epochs trained, time, best validation epoch, early stopping."""
    line = f"{epochs_completed} of {epochs} epochs"
    if resumed_from:
        line += f" (resumed after epoch {resumed_from})"
    line += f" in {seconds:.0f} s"
    name = "validation value"
    if best is not None:
        name, value = monitored(best)
        line += f"; best {name} {value:.2f} after epoch {int(best['epoch']) + 1}"
    if stopped_early:
        line += f"; stopped early (no better {name} in {patience} epochs)"
    return line


def evaluation_line(test: Mapping, best: Mapping | None) -> str:
    """Test metrics, and which weights they are of."""
    weights = (f"weights of epoch {int(best['epoch']) + 1} (best {monitored(best)[0]})" if best is not None
               else "weights of the last epoch")
    return (f"test ELBO {test['elbo_mean']:.2f} ± {test['elbo_se']:.2f}, IWAE log-likelihood "
            f"(K={test['iwae_samples']}) {test['log_likelihood_mean']:.2f} ± {test['log_likelihood_se']:.2f} nats on "
            f"{test['examples']} examples, {weights}; {test['eval_time_s']:.0f} s")


def figures_line(paths: Mapping[str, str]) -> str:
    """The PNGs written."""
    directories = sorted({os.path.dirname(path) for path in paths.values()})
    return f"{', '.join(os.path.basename(path) for path in paths.values())} in {', '.join(directories)}"


def export_line(paths: Mapping[str, str]) -> str:
    """Where the SavedModels went."""
    if not paths:
        return "disabled (--export_dir='')"
    return ", ".join(f"{path}" if kind == "model" else f"{kind}: {path}" for kind, path in paths.items())
