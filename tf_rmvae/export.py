"""Export a trained `RecursiveMixtureVAE` as a versioned SavedModel for TensorFlow Serving.

`export_model(model, base_dir, name)` writes `base_dir/name/VERSION/` (the layout `tensorflow_model_server
--model_base_path=base_dir/name` polls: integer version directories, the largest one served) through
`keras.export.ExportArchive`, with these signatures (batch dimension `None` everywhere; `H, W, C` the model's image
shape, `M` its component slots, `D` its latent size):

- `serving_default`, `encode`: `images` float32 `[B, H, W, C]` in [0, 1] -> `mixture_weights` `[B, M]`,
  `loc` `[B, M, D]`, `scale` `[B, M, D]`, `posterior_mean` `[B, D]`;
- `reconstruct`: `images` -> `reconstruction` `[B, H, W, C]` (decoder mean at the posterior mean);
- `log_likelihood`: `images`, `num_samples` int32 scalar -> `log_likelihood` `[B]` (importance-weighted estimate,
  K = num_samples);
- `generate`: `z` float32 `[B, D]` -> `images` `[B, H, W, C]` (decoder mean);
- `sample`: `num_images`, `seed` int32 scalars -> `images` `[num_images, H, W, C]` (as `model.generate`).

`export_encoder(model, base_dir, name)` writes `base_dir/name_encoder/VERSION/` with `encode` (= `serving_default`)
only and the encoder's variables only.

Inactive component slots have `mixture_weights` 0 (their `loc`/`scale` are meaningless).

Input checks at the serving boundary: a wrong shape or dtype is refused by the signature itself (TF Serving answers
400 INVALID_ARGUMENT; a loaded signature raises `TypeError`/`ValueError`). Values are checked, not clipped: NaN or
Inf pixels fail with "images contain NaN or Inf values", pixels outside [0, 1] with "images must lie in [0, 1]"
(`InvalidArgumentError`). Clipping was rejected because the usual mistake, sending raw 0..255 pixels, would then be
answered with plausible-looking but meaningless posteriors. `num_samples` must lie in [1, `max_num_samples`] and
`num_images` in [1, `max_num_images`], so one request cannot exhaust the server's memory. `log_likelihood` evaluates
the request `log_likelihood_batch` (default 100) images at a time, one slice after the other: its peak memory is
that of 100 images x `chunk_size` (100) importance samples whatever the batch size (measured on the default MNIST
model at K = 100: the process grew by 96 MB at B = 100 and 208 MB at B = 4000, against 3.6 GB before slicing), and
its time grows linearly with B x num_samples. An empty batch gives an empty result.

Each version directory also holds `assets.extra/rmvae_metadata.json` (model config, image shape, latent size,
method, active components and mixing weights at export (the shared ones; `per_example_proportions` says whether
each image's own differ), signatures, training metrics if given, versions of the libraries; a non-finite number
is written as null, `tf_rmvae.files`). TF Serving ignores `assets.extra/` apart
from its warm-up file; `read_metadata(version_dir)` reads it.

Versions are written atomically: the SavedModel is written to a hidden temporary directory beside the version
directories and renamed into place, so a crash never leaves a half-written version for the server to load. Version
directories get the mode the umask gives a new directory (0755 typically), so a server under another uid can read
them. `publish(version_dir, "saved_models")` copies an exported version (e.g. from a run directory) into a served
base directory the same way.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from tf_rmvae.files import json_ready, json_text
from tf_rmvae.models.inputs import IMAGE_RANGE_MESSAGE, assert_unit_range
from tf_rmvae.version import __version__

METADATA_DIR = "assets.extra"
METADATA_FILE = "rmvae_metadata.json"
METADATA_FORMAT = "tf_rmvae.export/1"
ENCODER_SUFFIX = "_encoder"
__all__ = ["IMAGE_RANGE_MESSAGE", "export_encoder", "export_model", "publish", "read_metadata"]


# ---------------------------------------------------------------------------------------------- version directories
def existing_versions(model_dir: str) -> list[int]:
    """Sorted integer version directories in `model_dir` (empty if it does not exist)."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(
        int(entry) for entry in os.listdir(model_dir)
        if entry.isdigit() and os.path.isdir(os.path.join(model_dir, entry))
    )


def next_version(model_dir: str) -> int:
    """1 + the largest existing integer version in `model_dir` (1 if there is none)."""
    versions = existing_versions(model_dir)
    return versions[-1] + 1 if versions else 1


def content_digest(version_dir: str) -> str:
    """SHA-256 of a version's files (names and bytes) except its metadata, which differs between copies."""
    digest = hashlib.sha256()
    metadata = os.path.join(METADATA_DIR, METADATA_FILE)
    for root, dirs, files in os.walk(version_dir):
        dirs.sort()
        for file in sorted(files):
            path = os.path.join(root, file)
            relative = os.path.relpath(path, version_dir)
            if relative == metadata:
                continue
            digest.update(relative.encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def identical_version(version_dir: str, model_dir: str) -> str | None:
    """The newest version in `model_dir` holding the same model as `version_dir` (`content_digest`), or None."""
    wanted = content_digest(version_dir)
    for number in reversed(existing_versions(model_dir)):
        candidate = os.path.join(model_dir, str(number))
        if content_digest(candidate) == wanted:
            return candidate
    return None


def read_metadata(version_dir: str) -> dict:
    """The metadata JSON written beside an exported SavedModel."""
    with open(os.path.join(version_dir, METADATA_DIR, METADATA_FILE), encoding="utf-8") as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------- serving functions
def _checked_images(images: tf.Tensor, image_shape) -> tf.Tensor:
    """Run-time shape check, NaN/Inf check, then the [0, 1] range check (in that order: NaN gets the NaN message).

    The shape is checked at run time (`EnsureShape`) because a signature called through `loaded.signatures[...]`
    or by TF Serving checks only the dtype, not the shape, of its inputs.
    """
    images = tf.ensure_shape(images, (None, *image_shape))
    images = tf.debugging.assert_all_finite(images, "images contain NaN or Inf values")
    return assert_unit_range(images)  # the models' own check (tf_rmvae.models.inputs)


def _checked_count(value: tf.Tensor, low: int, high: int, name: str) -> tf.Tensor:
    check = tf.debugging.Assert(
        (value >= low) & (value <= high), [f"{name} must lie in [{low}, {high}]; got", value]
    )
    with tf.control_dependencies([check]):
        return tf.identity(value)


def map_in_slices(fn, images: tf.Tensor, slice_size: int) -> tf.Tensor:
    """`fn` on consecutive slices of at most `slice_size` examples of `images [B, ...]`, concatenated: `[B]`.

    The slices run one after the other (`parallel_iterations=1`), so peak memory is that of `fn` on one slice
    whatever B is; an empty batch gives `[0]` without calling `fn`.
    """
    batch = tf.shape(images)[0]

    def body(start, done):
        return start + slice_size, tf.concat([done, fn(images[start:start + slice_size])], axis=0)

    _, result = tf.while_loop(
        lambda start, _: start < batch, body, (tf.constant(0), tf.zeros([0], tf.float32)),
        shape_invariants=(tf.TensorShape([]), tf.TensorShape([None])), parallel_iterations=1,
    )
    return result


def _encode_outputs(encoder, images: tf.Tensor, image_shape) -> dict:
    log_weights, loc, scale = encoder.compute_parameters(_checked_images(images, image_shape))
    weights = tf.exp(log_weights)
    return {
        "mixture_weights": weights,
        "loc": loc,
        "scale": scale,
        "posterior_mean": tf.einsum("bm,bmd->bd", weights, loc),
    }


def _image_spec(image_shape) -> tf.TensorSpec:
    return tf.TensorSpec((None, *image_shape), tf.float32, name="images")


def _add_encode(archive, encoder, image_shape) -> dict:
    def encode(images):
        return _encode_outputs(encoder, images, image_shape)

    return {"encode": archive.add_endpoint("encode", encode, input_signature=[_image_spec(image_shape)])}


def _add_full_endpoints(archive, model, image_shape, latent_dim, limits) -> dict:
    images_spec = _image_spec(image_shape)
    scalar = lambda name: tf.TensorSpec((), tf.int32, name=name)

    def reconstruct(images):
        posterior_mean = _encode_outputs(model.encoder, images, image_shape)["posterior_mean"]
        return {"reconstruction": model.decoder(posterior_mean).mean()}

    def log_likelihood(images, num_samples):
        num_samples = _checked_count(num_samples, 1, limits["max_num_samples"], "num_samples")
        images = _checked_images(images, image_shape)
        # The decoder runs on [chunk, B, D] latents: in slices of `log_likelihood_batch` images memory stays bounded.
        estimate = lambda x: model.log_likelihood(x, num_samples, limits["chunk_size"])
        return {"log_likelihood": map_in_slices(estimate, images, limits["log_likelihood_batch"])}

    def generate(z):
        z = tf.debugging.assert_all_finite(tf.ensure_shape(z, (None, latent_dim)), "z contains NaN or Inf values")
        return {"images": model.decoder(z).mean()}

    def sample(num_images, seed):
        num_images = _checked_count(num_images, 1, limits["max_num_images"], "num_images")
        return {"images": model.generate(num_images, seed)}

    endpoints = {
        "reconstruct": (reconstruct, [images_spec]),
        "log_likelihood": (log_likelihood, [images_spec, scalar("num_samples")]),
        "generate": (generate, [tf.TensorSpec((None, latent_dim), tf.float32, name="z")]),
        "sample": (sample, [scalar("num_images"), scalar("seed")]),
    }
    return {key: archive.add_endpoint(key, fn, input_signature=spec) for key, (fn, spec) in endpoints.items()}


# ---------------------------------------------------------------------------------------------- writing
def _signature_table(endpoints: dict) -> dict:
    """`{signature: {"inputs": {name: {dtype, shape}}, "outputs": {...}}}` with -1 for unknown sizes."""
    def entry(spec) -> dict:
        return {"dtype": spec.dtype.name, "shape": [-1 if d is None else d for d in spec.shape.as_list()]}

    table = {}
    for name, fn in endpoints.items():
        concrete = fn.get_concrete_function()
        table[name] = {
            "inputs": {spec.name: entry(spec) for spec in concrete.structured_input_signature[0]},
            "outputs": {key: entry(spec) for key, spec in concrete.structured_outputs.items()},
        }
    return table


def _metadata(model, kind, name, version, image_shape, signatures, metrics, limits) -> dict:
    encoder = model.encoder
    weights = np.exp(keras.ops.convert_to_numpy(encoder.mixture_log_weights()))
    signatures = dict(signatures)
    signatures["serving_default"] = signatures["encode"]
    return json_ready({
        "format": METADATA_FORMAT,
        "kind": kind,
        "name": name,
        "version": version,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "image_shape": list(image_shape),
        "latent_dim": encoder.latent_dim,
        "max_components": encoder.max_components,
        "active_components": int(keras.ops.convert_to_numpy(encoder.num_active_components)),
        "mixing_weights": [round(float(w), 6) for w in weights],
        # With per-example proportions the weights above are the shared ones (every offset 0); the served
        # `mixture_weights` are each image's own.
        "per_example_proportions": bool(getattr(encoder, "per_example_proportions", False)),
        "method": model.method,
        "decoder": type(model.decoder).__name__,
        "input": {
            "name": "images", "dtype": "float32", "range": [0.0, 1.0],
            "out_of_range": "error (InvalidArgumentError), not clipped", "nan": "error (InvalidArgumentError)",
        },
        "limits": limits,
        "signatures": {key: signatures[key] for key in sorted(signatures)},
        "metrics": metrics or {},
        "model_config": model.get_config() if kind == "full" else encoder.get_config(),
        "versions": {"tf_rmvae": __version__, "tensorflow": tf.__version__, "keras": keras.__version__},
    })


def _umask() -> int:
    """The process's umask (read by setting it and setting it back: Python < 3.13 has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_version(model_dir: str, version: int | None, write) -> str:
    """Runs `write(tmp_dir, version)` into a hidden temporary directory, then renames it to `model_dir/version`.

    The temporary directory is made mode 0700 by `mkdtemp`; it gets the mode a plain `mkdir` would (0777 less the
    umask, typically 0755) before the rename, so a server running under another uid can read the version.
    """
    explicit = version is not None
    if explicit and (isinstance(version, bool) or int(version) != version or version < 0):
        raise ValueError(f"version must be a non-negative integer; got {version!r}.")
    os.makedirs(model_dir, exist_ok=True)
    for _ in range(100):
        number = int(version) if explicit else next_version(model_dir)
        final = os.path.join(model_dir, str(number))
        if os.path.exists(final):
            if explicit:
                raise FileExistsError(f"{final} already exists; versions are never overwritten.")
            continue
        tmp = tempfile.mkdtemp(prefix=f".tmp-{number}-", dir=model_dir)  # not an integer: TF Serving ignores it
        try:
            write(tmp, number)
            os.chmod(tmp, 0o777 & ~_umask())
            try:
                os.rename(tmp, final)  # atomic; fails if `final` appeared meanwhile with content
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                if explicit:
                    raise FileExistsError(f"{final} already exists; versions are never overwritten.") from err
                continue  # another exporter claimed this version first: take the next one
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        return final
    raise RuntimeError(f"Could not claim a new version directory in {model_dir}.")


def _check_plain_name(name: str) -> None:
    """A model name is one directory of `NAME/VERSION/`: not empty, no separator, not hidden."""
    if not name or os.sep in name or name.startswith("."):
        raise ValueError(f"name must be a plain directory name; got {name!r}.")


def _export(model, model_dir, name, version, kind, metrics, limits) -> str:
    _check_plain_name(name)
    if not model.built or not model.encoder.built:
        raise ValueError("Build (train) the model before exporting it: its variables do not exist yet.")
    image_shape = tuple(int(d) for d in model.decoder.image_shape)
    latent_dim = model.encoder.latent_dim
    if min(limits.values(), default=1) < 1:
        raise ValueError(f"{', '.join(sorted(limits))} must be >= 1; got {limits}.")
    # No `archive.track(...)`: add_endpoint tracks the variables each endpoint uses, and tracking the model as
    # well stores every variable twice (Keras keeps the endpoint copy under `_all_variables`).
    archive = keras.export.ExportArchive()
    endpoints = _add_encode(archive, model.encoder, image_shape)  # the first endpoint is also "serving_default"
    if kind == "full":
        endpoints.update(_add_full_endpoints(archive, model, image_shape, latent_dim, limits))
    signatures = _signature_table(endpoints)

    def write(tmp, number):
        archive.write_out(tmp, verbose=False)
        meta = _metadata(model, kind, name, number, image_shape, signatures, metrics, limits)
        os.makedirs(os.path.join(tmp, METADATA_DIR), exist_ok=True)
        with open(os.path.join(tmp, METADATA_DIR, METADATA_FILE), "w", encoding="utf-8") as f:
            f.write(json_text(meta, sort_keys=True))

    return _write_version(model_dir, version, write)


def export_model(
    model,
    base_dir: str,
    name: str,
    version: int | None = None,
    *,
    metrics: dict | None = None,
    chunk_size: int = 100,
    max_num_samples: int = 100_000,
    max_num_images: int = 10_000,
    log_likelihood_batch: int = 100,
) -> str:
    """Exports a built `RecursiveMixtureVAE` to `base_dir/name/VERSION/` with every serving signature.

    Args:
      model: a built (trained) `RecursiveMixtureVAE`.
      base_dir: directory holding one directory per model name.
      name: model name (the `--model_name` TF Serving is started with).
      version: integer version; default: 1 + the largest existing version. An existing version is never
        overwritten (`FileExistsError`).
      metrics: optional training/evaluation metrics (JSON-serialisable dict) stored in the metadata.
      chunk_size: importance samples drawn per step of the `log_likelihood` signature.
      max_num_samples, max_num_images: largest `num_samples` / `num_images` a request may ask for.
      log_likelihood_batch: images the `log_likelihood` signature evaluates at once (a larger request is processed
        in slices of this size, one after the other): its memory is that of `log_likelihood_batch x chunk_size`
        decoder evaluations whatever the request's batch size.

    Returns:
      The path of the written version directory.

    Example:

        path = export_model(model, "saved_models", "rmvae_mnist")      # saved_models/rmvae_mnist/1
        served = tf.saved_model.load(path)
        out = served.signatures["serving_default"](images=tf.zeros([2, 28, 28, 1]))
        out["posterior_mean"]                                           # [2, D]
    """
    limits = {
        "max_num_samples": int(max_num_samples), "max_num_images": int(max_num_images), "chunk_size": int(chunk_size),
        "log_likelihood_batch": int(log_likelihood_batch),
    }
    return _export(model, os.path.join(os.fspath(base_dir), name), name, version, "full", metrics, limits)


def export_encoder(model, base_dir: str, name: str, version: int | None = None, *, metrics: dict | None = None) -> str:
    """Exports only the encoder of `model` to `base_dir/NAME_encoder/VERSION/` (`encode` = `serving_default`).

    Same versioning and atomicity as `export_model`; returns the version directory.
    """
    name = name + ENCODER_SUFFIX
    return _export(model, os.path.join(os.fspath(base_dir), name), name, version, "encoder", metrics, {})


# ---------------------------------------------------------------------------------------------- publishing
def publish(version_dir: str, base_dir: str = "saved_models", name: str | None = None) -> str:
    """Copies an exported version into `base_dir/name/<next version>/`: the deliberate step that makes a trained
    model the one a TF Serving watching `base_dir/name` serves (the trainer exports into its run directory only).

    Same atomicity and permissions as an export; the copy's metadata gets its new `version` and `published_from`.
    Idempotent: where a version with the same model (`identical_version`) is already served, nothing is copied and
    that version's path is returned.

    Args:
      version_dir: an exported version, e.g. `runs/quick/export/rmvae_mnist_rme/1`.
      base_dir: directory holding one directory per served model name (default: the repository's `saved_models`).
      name: served model name (default: the name the model was exported under).

    Returns:
      The path of the new version directory.
    """
    version_dir = os.fspath(version_dir)
    if not os.path.isfile(os.path.join(version_dir, "saved_model.pb")):
        raise FileNotFoundError(f"{version_dir} is not an exported version (no saved_model.pb).")
    metadata = read_metadata(version_dir)
    name = name or metadata["name"]
    _check_plain_name(name)
    same = identical_version(version_dir, os.path.join(os.fspath(base_dir), name))
    if same is not None:
        return same

    def write(tmp, number):
        shutil.copytree(version_dir, tmp, dirs_exist_ok=True)
        copied = dict(metadata, version=number, name=name, published_from=os.path.abspath(version_dir))
        with open(os.path.join(tmp, METADATA_DIR, METADATA_FILE), "w", encoding="utf-8") as f:
            f.write(json_text(copied, sort_keys=True))

    return _write_version(os.path.join(os.fspath(base_dir), name), None, write)
