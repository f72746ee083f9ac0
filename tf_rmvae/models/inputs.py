"""Image inputs of the models: what a batch may look like, and checks that refuse anything else clearly.

A batch is `x`, `(x,)`, `(x, y)` (y ignored) or a tfds-style dict `{"image": x, ...}` (what `tfds.load("mnist")`
yields), where `x` holds images `[B, H, W, C]`:

* uint8 pixels 0..255 are scaled to [0, 1] (`x / 255`, as `tf_rmvae.data` does);
* bool pixels become 0.0 / 1.0;
* float pixels must lie in [0, 1]: values outside fail with `IMAGE_RANGE_MESSAGE` rather than being clipped,
  because the usual mistake, raw 0..255 floats, would otherwise "train" on nonsense. NaN/Inf are left to the
  model's non-finite policy (`RecursiveMixtureVAE(nonfinite_inputs=...)`);
* flat vectors `[B, H*W*C]`, label-only batches and dicts without `"image"` fail with a message saying what to do.

The range check is one cheap in-graph reduction (`assert_unit_range`). XLA compiles `tf.debugging.Assert` into a
no-op, so with `jit_compile=True` the models also check their `fit`/`evaluate` data outside the compiled step:
`checked_dataset` maps the same check over a `tf.data.Dataset` and `check_array` checks NumPy arrays.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import tensorflow as tf

IMAGE_KEY = "image"
IMAGE_RANGE_MESSAGE = "images must lie in [0, 1] (pixel intensities divided by 255)"
UINT8_SCALE = 255.0


# ---------------------------------------------------------------------------------------------- structure
def select_images(data: Any) -> Any:
    """The image part of a batch: `x` of `x`, `(x,)`, `(x, y)` or `{"image": x, ...}` (x itself is not checked)."""
    if isinstance(data, (tuple, list)):
        if not data:
            raise ValueError("An empty tuple is not a batch: pass images [B, H, W, C], (images, labels) or a "
                             "tfds-style dict {'image': images}.")
        data = data[0]
    if isinstance(data, dict):
        if IMAGE_KEY not in data:
            raise ValueError(f"A dict batch needs an {IMAGE_KEY!r} entry holding the images (tfds style: "
                             f"{{'image': ..., 'label': ...}}); got keys {sorted(map(str, data))}. Map the dataset "
                             f"to images first, e.g. `ds.map(lambda ex: ex['<your key>'])`.")
        data = data[IMAGE_KEY]
    return data


def replace_images(data: Any, images: Any) -> Any:
    """`data` with its image part (see `select_images`) replaced by `images`, the structure kept."""
    if isinstance(data, (tuple, list)):
        return type(data)([replace_images(data[0], images), *data[1:]])
    if isinstance(data, dict):
        return {**data, IMAGE_KEY: images}
    return images


def check_image_shape(shape: Sequence[int | None], image_shape: Sequence[int] | None) -> None:
    """Refuses a batch shape that is not `[B, *image_shape]` (`image_shape` None: anything of rank >= 2).

    Static shapes only (a Python check while tracing), so it costs nothing per step and works under XLA; a shape
    of unknown rank passes.
    """
    if getattr(shape, "rank", 0) is None:
        return
    shape = tuple(shape)
    expected = "[B, H, W, C]" if image_shape is None else f"[B, {', '.join(map(str, image_shape))}]"
    if len(shape) <= 1:
        raise ValueError(f"Expected a batch of images {expected}; got shape {list(shape)}, one number per example. "
                         "Is this a dataset of labels only? Pass the images, e.g. `ds.map(lambda ex: ex['image'])`.")
    if len(shape) == 2 and image_shape is not None and shape[1] in (None, int(np.prod(image_shape))):
        raise ValueError(f"Expected a batch of images {expected}; got flat vectors of shape {list(shape)}. Reshape "
                         f"them, e.g. `x.reshape(-1, {', '.join(map(str, image_shape))})`.")
    if image_shape is None:
        return  # a decoder without an image shape: the encoder takes any [B, ...]
    if len(shape) == 3 and tuple(image_shape[:2]) == shape[1:] and image_shape[2] == 1:
        raise ValueError(f"Expected a batch of images {expected}; got shape {list(shape)}, without the channel "
                         "axis. Add it, e.g. `x[..., None]` (NumPy) or `tf.expand_dims(x, -1)`.")
    if len(shape) != 4:
        raise ValueError(f"Expected a batch of images {expected}; got shape {list(shape)}.")
    if any(actual is not None and actual != want for actual, want in zip(shape[1:], image_shape)):
        raise ValueError(f"Expected a batch of images {expected} (the model's image shape); got shape {list(shape)}.")


# ---------------------------------------------------------------------------------------------- values
def assert_unit_range(images: tf.Tensor) -> tf.Tensor:
    """`images` unchanged, after an in-graph check that every finite value lies in [0, 1].

    NaN/Inf pass (they are the non-finite policy's business). One comparison and one reduction: the values are
    returned as they are, so valid inputs give bit-identical results. Dropped by XLA (see the module docstring).
    """
    outside = tf.math.is_finite(images) & ((images < 0.0) | (images > 1.0))
    check = tf.debugging.Assert(
        ~tf.reduce_any(outside), [IMAGE_RANGE_MESSAGE + "; got values in", tf.reduce_min(images), tf.reduce_max(images)]
    )
    with tf.control_dependencies([check]):
        return tf.identity(images)


def to_unit_float(images: Any) -> tf.Tensor:
    """Images of any accepted dtype as float32 in [0, 1]: uint8 scaled by 1/255, bool cast, floats range-checked."""
    images = tf.convert_to_tensor(images)
    if images.dtype == tf.uint8:
        return tf.cast(images, tf.float32) / UINT8_SCALE
    if images.dtype == tf.bool:
        return tf.cast(images, tf.float32)
    if images.dtype.is_floating:
        return assert_unit_range(tf.cast(images, tf.float32))
    raise TypeError(f"Images must be uint8 (0..255), bool or float (in [0, 1]); got {images.dtype.name}.")


def as_images(data: Any, image_shape: Sequence[int] | None = None) -> tf.Tensor:
    """A batch (any structure that `select_images` accepts) as float32 images `[B, *image_shape]` in [0, 1]."""
    images = select_images(data)
    check_image_shape(tf.convert_to_tensor(images).shape, image_shape)
    return to_unit_float(images)


# ---------------------------------------------------------------------------------------------- fit/evaluate data
def checked_dataset(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` with the range check applied to each element's float images inside `tf.data` (never under XLA)."""
    def check(*element):
        element = element[0] if len(element) == 1 else element
        images = select_images(element)
        if not tf.as_dtype(images.dtype).is_floating:
            return element
        return replace_images(element, assert_unit_range(images))

    return dataset.map(check)


def check_array(data: Any) -> None:
    """Eagerly refuses NumPy float images outside [0, 1] (`ValueError`); other inputs are left to the model."""
    try:
        images = select_images(data)
    except ValueError:
        return  # the model's own check names the problem
    if not isinstance(images, np.ndarray) or not np.issubdtype(images.dtype, np.floating):
        return
    finite = images[np.isfinite(images)]
    if finite.size and (finite.min() < 0.0 or finite.max() > 1.0):
        raise ValueError(f"{IMAGE_RANGE_MESSAGE}; got values in [{finite.min():g}, {finite.max():g}].")
