"""PNG figures of a trained model (matplotlib, Agg backend: no display needed).

    save_reconstructions(model, x_test[:16], "runs/quick/reconstructions.png")
    save_samples(model, "runs/quick/samples.png", num_images=64)
    save_mixture_weights(history_rows, "runs/quick/mixture_weights.png")
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def image_grid(images: np.ndarray, columns: int, pad: int = 1) -> np.ndarray:
    """Tiles `[N, H, W, C]` images into one `[rows * (H + pad) - pad, columns * (W + pad) - pad, C]` array."""
    images = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
    n, h, w, c = images.shape
    rows = max(1, math.ceil(n / columns))
    grid = np.ones((rows * (h + pad) - pad, columns * (w + pad) - pad, c), np.float32)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * (h + pad):r * (h + pad) + h, col * (w + pad):col * (w + pad) + w] = image
    return grid


def _save_grid(grid: np.ndarray, path: str, title: str) -> None:
    height, width = grid.shape[:2]
    scale = 6.0 / max(height, width)
    fig, ax = plt.subplots(figsize=(max(2.0, width * scale), max(2.0, height * scale) + 0.4))
    if grid.shape[-1] == 1:
        ax.imshow(grid[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(grid, interpolation="nearest")
    ax.set_title(title, fontsize=10)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100)
    plt.close(fig)


def reconstruction_grid(model, images: np.ndarray, columns: int = 8) -> np.ndarray:
    """One image `[rows, cols, C]`: rows of originals `images [N, H, W, C]`, each followed by a row of their
    reconstructions `model(images)`."""
    images = np.asarray(images, np.float32)
    reconstructions = np.asarray(model(images))
    rows = []
    for start in range(0, len(images), columns):
        rows.append(images[start:start + columns])
        rows.append(reconstructions[start:start + columns])
    padded = []
    for row in rows:  # pad the last (short) pair of rows with blank images so the pairs stay aligned
        blank = np.ones((columns - len(row), *row.shape[1:]), np.float32)
        padded.append(np.concatenate([row, blank]) if len(row) < columns else row)
    return image_grid(np.concatenate(padded), columns)


def sample_grid(model, num_images: int = 64, seed: int = 0) -> np.ndarray:
    """One image tiling `model.generate(num_images, seed)` (decoder means at prior samples) in a square grid."""
    images = np.asarray(model.generate(num_images, seed=seed))
    return image_grid(images, int(math.ceil(math.sqrt(num_images))))


def save_reconstructions(model, images: np.ndarray, path: str, columns: int = 8) -> None:
    """PNG of `reconstruction_grid`: rows of originals, each followed by a row of their reconstructions."""
    _save_grid(reconstruction_grid(model, images, columns), path, "data (odd rows) and reconstructions (even rows)")


def save_samples(model, path: str, num_images: int = 64, seed: int = 0) -> None:
    """PNG of `sample_grid`: decoder means at prior samples."""
    _save_grid(sample_grid(model, num_images, seed), path, "samples from the prior")


def save_mixture_weights(history: Sequence[Mapping[str, float]], path: str, num_components: int) -> None:
    """Mixture weights `weight_m` (epoch means) per epoch as stacked bars; `history` is one dict per epoch."""
    epochs = np.array([int(row.get("epoch", i)) + 1 for i, row in enumerate(history)])
    weights = np.array(
        [[float(row.get(f"weight_{m}", np.nan)) for m in range(num_components)] for row in history]
    ).reshape(len(history), num_components)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bottom = np.zeros(len(history))
    for m in range(num_components):
        values = np.nan_to_num(weights[:, m])
        ax.bar(epochs, values, bottom=bottom, width=0.8, label=f"component {m + 1}")
        bottom += values
    if len(history):
        ax.set_xticks(epochs)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mixture weight (epoch mean)")
    ax.set_title("mixture proportions over training", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100)
    plt.close(fig)
