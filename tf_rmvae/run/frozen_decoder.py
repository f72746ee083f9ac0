"""A run that trains only an encoder, for the frozen decoder of a trained model (`RunConfig.decoder_from`).

    config = RunConfig(model_dir="runs/encoder", decoder_from="runs/vae")   # or a .weights.h5 file
    config = pinned(config)                  # decoder_sha256: the digest of the weights file the decoder comes from
    load_frozen(model.decoder, config)       # the weights loaded, the decoder set non-trainable (ConfigError if
                                             # they do not fit it; `factory.check_frozen_decoder` checks first)

The source is a `.weights.h5` file that a model with a `decoder` attribute saved (`Model.save_weights`, a run's
checkpoint or resume state; only its `decoder/` entries are read), or a run directory: its best checkpoint where it
kept one (the weights it evaluated), else its last state. Which decoder a run trains against is the SHA-256 of that
file (`decoder_sha256`, saved in the run's config.json and compared on resume), not its path, which may change.
"""

from __future__ import annotations

import hashlib
import os
import tempfile

import h5py
import keras

from tf_rmvae.config import ConfigError, RunConfig
from tf_rmvae.run import directory as run_dir
from tf_rmvae.run.best_checkpoint import BEST_WEIGHTS_FILE


def weights_file(decoder_from: str) -> str:
    """The `.weights.h5` file that `decoder_from` names (a file, or a run directory's trained weights);
    `ConfigError` if there is none."""
    if os.path.isdir(decoder_from):
        candidates = [os.path.join(decoder_from, run_dir.CHECKPOINT_DIR, BEST_WEIGHTS_FILE),
                      os.path.join(decoder_from, run_dir.BACKUP_DIR, run_dir.STATE_FILE)]
        for path in candidates:
            if os.path.isfile(path):
                return path
        raise ConfigError(f"--decoder_from={decoder_from} is a directory without trained weights (looked for "
                          f"{' and '.join(candidates)}): name a finished run directory or a .weights.h5 file.")
    if not os.path.isfile(decoder_from):
        raise ConfigError(f"--decoder_from={decoder_from}: no such file or run directory.")
    if not decoder_from.endswith(".weights.h5"):
        raise ConfigError(f"--decoder_from={decoder_from} is not a .weights.h5 file (as Model.save_weights writes) "
                          "or a run directory.")
    return decoder_from


def _read(config: RunConfig) -> tuple[str, bytes, str]:
    """`(path, content, digest)` of the decoder's weights file, read once: its path, bytes and SHA-256 hex digest;
    `ConfigError` if it cannot be read."""
    path = weights_file(config.decoder_from)
    try:
        with open(path, "rb") as f:
            content = f.read()
    except OSError as error:  # removed or unreadable since it was found
        raise ConfigError(f"--decoder_from={config.decoder_from}: {path} cannot be read ({error}).") from None
    return path, content, hashlib.sha256(content).hexdigest()


def _pinned_bytes(config: RunConfig) -> bytes:
    """The bytes of the decoder's weights file, read once; `ConfigError` if they are not the ones
    `config.decoder_sha256` names (the file changed after the run was pinned)."""
    path, content, digest = _read(config)
    if config.decoder_sha256 and config.decoder_sha256 != digest:
        raise ConfigError(f"--decoder_from={config.decoder_from} ({path}) changed since the run was pinned to it: "
                          f"SHA-256 {digest}, not {config.decoder_sha256}.")
    return content


def pinned(config: RunConfig) -> RunConfig:
    """`config` with `decoder_sha256` the digest of its decoder's weights file (unchanged without `decoder_from`);
    `ConfigError` if the file is missing or differs from a digest given."""
    if not config.decoder_from:
        return config
    _, _, digest = _read(config)
    if config.decoder_sha256 and config.decoder_sha256 != digest:
        raise ConfigError(f"--decoder_from={config.decoder_from} holds other weights (SHA-256 {digest}) than "
                          f"--decoder_sha256={config.decoder_sha256}.")
    return config.replace(decoder_sha256=digest)


class _Holder(keras.Model):
    """Reads the `decoder/` entries of a whole model's weights file into a decoder (the file's other entries, the
    encoder's and the optimizer's, are not read)."""

    def __init__(self, decoder: keras.layers.Layer):
        super().__init__()
        self.decoder = decoder
        self.built = True  # nothing of its own to build; `decoder` is built


def _one_line(text: str) -> str:
    """Keras's loading error on one line (it names the object on one line and the mismatch on the next)."""
    return " ".join(line.strip() for line in text.splitlines() if line.strip())[:600]


def load_frozen(decoder: keras.layers.Layer, config: RunConfig) -> None:
    """Loads the weights `config.decoder_from` names into the built `decoder` and makes it non-trainable;
    `ConfigError` if they do not fit it, or are no longer the ones `config.decoder_sha256` names."""
    content = _pinned_bytes(config)  # loaded from the bytes that were checked, not from the file read again
    holder = _Holder(decoder)
    with tempfile.TemporaryDirectory() as directory:
        own = os.path.join(directory, "decoder.weights.h5")  # what this decoder saves: the entries it must find
        holder.save_weights(own)
        expected = _decoder_entries(own)
        source = os.path.join(directory, "source.weights.h5")
        with open(source, "wb") as f:
            f.write(content)
        try:
            found = _decoder_entries(source)
            if found != expected:  # Keras would skip entries the decoder lacks (a deeper decoder's) without a word
                differ = sorted(set(found.items()) ^ set(expected.items()))[:4]
                raise ValueError(f"its decoder/ entries differ from this decoder's, e.g. {differ}")
            holder.load_weights(source)
        except Exception as error:  # noqa: BLE001 - h5py, Keras and shape errors: "not this decoder's weights"
            raise ConfigError(
                f"--decoder_from={config.decoder_from}: its decoder does not fit this run's (--hidden_units="
                f"{','.join(map(str, config.hidden_units))} --latent_dim={config.latent_dim} --architecture="
                f"{config.architecture} --decoder={config.decoder}): {_one_line(str(error))}") from None
    decoder.trainable = False


def _decoder_entries(path: str) -> dict[str, tuple[int, ...]]:
    """`{name: shape}` of the variables under `decoder/` in a weights file."""
    entries = {}

    def add(name, item):
        if isinstance(item, h5py.Dataset):
            entries[name] = tuple(item.shape)

    with h5py.File(path, "r") as f:
        if "decoder" in f:
            f["decoder"].visititems(add)
    return entries
