"""One backward pass through the decoder for a decoder loss and an encoder loss that read its output differently.

The decoder trains on the mixture's bound `L_d`, the encoder's component networks on their criteria `L_e` (RME), or
on their own importance-weighted objective (IWAE-DReG, PIWAE). Both read the decoder's output
`f_i = log p(x | z_i)`, `[S, B, M]`, with different cotangents: the decoder's weights need
`sum_i c_i df_i/dtheta` with `c_i = dL_d/df_i`, the encoder `a_i df_i/dz_i` with `a_i = dL_e/df_i` (DReG: each
component's squared normalised weights). Taking each loss's gradient costs two backward passes through the
decoder. The backward pass is linear in its cotangent and sample i's z-gradient sees only its own `f_i`, so one
pass with cotangent `c` gives the decoder's gradient and `c_i df_i/dz_i` at every sample; times `a_i / c_i`, that
is the encoder's (`shared_cotangent`, `gradients`).

The generalized DReG of a mixture (`objectives.stratified_importance_weighted_gdreg`) also reads each sample's
`f_i` along other components' transports: `route(..., transported=Z)` adds `[S, B, M, K]` copies of `f` whose
cotangents `b_ik` push `b_ik / c_i` times the same z-gradient along `Z[..., k, :]` (value `z_i`, another path to the
encoder's parameters). Those copies have no gradient of their own (stopped): only `gradients` routes them.

The losses' other routes (`log p(z)`, `log q`, the proportions) are cheap and keep their own backward passes: in
`separate_routes()` the decoder's input and output are cut from the losses (`switch`), so `L_d` and `L_e` reach
it only through the cotangents set here. Outside that context `switch` is the identity, gradients included, so
the per-batch terms stay ordinarily differentiable.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, NamedTuple

import tensorflow as tf

# Floor of the decoder's cotangent, a fraction of the example's largest. Where the bound gives a sample (almost) no
# weight (a component joining at eps ~ 0, underflow) the sample's z-gradient `c_i df/dz` must stay representable;
# raising `c_i` moves the decoder's gradient by at most this fraction of a sample's gradient. float32 and bfloat16
# (float32's exponent range): 2^-64, far below their rounding, with ~20 decades left before the backward pass
# underflows. float16 (5 exponent bits): 2^-14, its smallest normal, below its rounding (2^-11) of the decoder's
# gradient, while the raised samples' backward pass stays near float16's normal range at the usual loss scales.
COTANGENT_FLOOR = {"float16": 2.0**-14}
DEFAULT_COTANGENT_FLOOR = 2.0**-64
# Cap of `log(a_i / c_i)`: `exp` of it is finite in float32 (a ratio times a z-gradient that underflowed to 0 is 0,
# never inf * 0).
MAX_LOG_RATIO = 80.0

_STATE = threading.local()  # per thread: tf.distribute runs each replica's step in its own thread


def cotangent_floor(compute_dtype: str) -> float:
    """The floor (`shared_cotangent`) for a decoder computing in `compute_dtype` (e.g. a layer's `compute_dtype`)."""
    return COTANGENT_FLOOR.get(str(compute_dtype), DEFAULT_COTANGENT_FLOOR)


@contextlib.contextmanager
def separate_routes():
    """Within it (on this thread) `switch` passes no gradient: take the routed gradients in it."""
    previous = getattr(_STATE, "separate", False)
    _STATE.separate = True
    try:
        yield
    finally:
        _STATE.separate = previous


@tf.custom_gradient
def switch(value: tf.Tensor):
    """The identity; in `separate_routes()` its gradient is None. The decoder's input and output go through it,
    so that there the losses reach the decoder only through the cotangents given to `gradients`."""

    def gradient(upstream):
        return None if getattr(_STATE, "separate", False) else upstream

    return tf.identity(value), gradient


@tf.custom_gradient
def _cut(value: tf.Tensor):
    """The identity without a gradient; unlike `tf.stop_gradient` its output stays on the tape (a tape records no
    op whose inputs it does not watch), so `gradients` can take a loss's gradient for it."""

    def gradient(upstream):
        return None

    return tf.identity(value), gradient


class DecoderRoute(NamedTuple):
    """The tensors around one decoder call: `z [S, B, M, D]` -> `log p(x | z) [S, B, M]`."""

    latents: tf.Tensor  # z, the encoder's samples
    decoder_input: tf.Tensor  # switch(z): what the decoder reads
    log_likelihood: tf.Tensor  # the decoder's output, f
    log_likelihood_used: tf.Tensor  # switch(f): what the losses read
    transported_latents: tf.Tensor | None = None  # [S, B, M, K, D]: z moved along K transports (value z)
    transported_log_likelihood: tf.Tensor | None = None  # [S, B, M, K]: f there (value f; gradient by `gradients`)


def route(x: tf.Tensor, z: tf.Tensor, log_likelihood_fn: Callable[[tf.Tensor, tf.Tensor], tf.Tensor],
          transported: tf.Tensor | None = None) -> DecoderRoute:
    """Calls `log_likelihood_fn(x, z)` (`[S, B, M]`) between two `switch`es. `transported`: optional
    `[S, B, M, K, D]` samples moved along other transports (module docstring); the decoder is not called on them."""
    decoder_input = switch(z)
    log_likelihood = log_likelihood_fn(x, decoder_input)
    if transported is None:
        return DecoderRoute(z, decoder_input, log_likelihood, switch(log_likelihood))
    copies = tf.broadcast_to(_cut(log_likelihood)[..., None], tf.shape(transported)[:-1])
    return DecoderRoute(z, decoder_input, log_likelihood, switch(log_likelihood), transported, copies)


def shared_cotangent(
    decoder_cotangent: tf.Tensor, encoder_cotangent: tf.Tensor, floor: float = DEFAULT_COTANGENT_FLOOR
) -> tuple[tf.Tensor, tf.Tensor]:
    """The cotangent of one backward pass through the decoder, and what rescales its z-gradients for the encoder.

    Args:
      decoder_cotangent: `[S, B, M]` `c = dL_d/df` (<= 0 for a loss that is a negative bound).
      encoder_cotangent: `[S, B, M]` `a = dL_e/df`.
      floor: each `|c_i|` is raised to at least `floor` times its example's largest `|c|` (a zero takes the sign of
        a negative bound's cotangent, -).

    Returns:
      `(cotangent, ratio)`, `[S, B, M]` each: `c` floored, and `a / cotangent` computed in log space and capped at
      `exp(MAX_LOG_RATIO)`; 0 where `a` is 0 or the whole example's `c` is (a skipped example).
    """
    sign, raised = _floored(decoder_cotangent, floor)
    return sign * raised, _ratio(encoder_cotangent, raised, sign)


def _floored(decoder_cotangent: tf.Tensor, floor: float) -> tuple[tf.Tensor, tf.Tensor]:
    """`(sign, raised)`, `[S, B, M]` each: the floored cotangent's sign and magnitude (`shared_cotangent`)."""
    magnitude = tf.abs(decoder_cotangent)
    largest = tf.reduce_max(magnitude, axis=[0, 2], keepdims=True)  # [1, B, 1]
    return tf.where(decoder_cotangent > 0, 1.0, -1.0), tf.maximum(magnitude, floor * largest)


def _ratio(encoder_cotangent: tf.Tensor, raised: tf.Tensor, sign: tf.Tensor) -> tf.Tensor:
    """`a / (sign * raised)` in log space, capped (`shared_cotangent`); 0 where `a` or `raised` is 0."""
    defined = (encoder_cotangent != 0) & (raised > 0)
    log_ratio = tf.math.log(tf.where(defined, tf.abs(encoder_cotangent), 1.0)) - tf.math.log(
        tf.where(defined, raised, 1.0))
    ratio = tf.sign(encoder_cotangent) * sign * tf.exp(tf.minimum(log_ratio, MAX_LOG_RATIO))
    return tf.where(defined, ratio, 0.0)


def gradients(
    tape: tf.GradientTape,
    decoder_loss: tf.Tensor,
    encoder_loss: tf.Tensor,
    decoder_route: DecoderRoute,
    decoder_variables: list,
    encoder_variables: list,
    floor: float = DEFAULT_COTANGENT_FLOOR,
) -> tuple[list, list]:
    """`decoder_loss`'s gradient for `decoder_variables` and `encoder_loss`'s for `encoder_variables`, with one
    backward pass through the decoder (module docstring); equal to the two losses' own gradients up to rounding
    and the floor. `tape`: a persistent tape that recorded both losses, their decoder call made by `route`."""
    used = decoder_route.log_likelihood_used
    with separate_routes():
        copies = decoder_route.transported_log_likelihood
        if copies is None:
            encoder_cotangents = [tape.gradient(encoder_loss, used)]
        else:  # one backward pass through the criteria for both
            encoder_cotangents = tape.gradient(encoder_loss, [used, copies])
        decoder_cotangent, encoder_cotangent, *transport_cotangent = (
            tf.zeros_like(like) if g is None else g
            for g, like in zip([tape.gradient(decoder_loss, used), *encoder_cotangents], [used, used, copies]))
        sign, raised = _floored(decoder_cotangent, floor)  # shared_cotangent, keeping both for the transports
        cotangent, ratio = sign * raised, _ratio(encoder_cotangent, raised, sign)
        *decoder_gradients, latent_gradient = tape.gradient(
            [decoder_route.log_likelihood, decoder_loss], list(decoder_variables) + [decoder_route.decoder_input],
            output_gradients=[cotangent, tf.ones_like(decoder_loss)])
        if latent_gradient is None:  # the decoder does not read z
            latent_gradient = tf.zeros_like(decoder_route.latents)
        targets = [encoder_loss, decoder_route.latents]
        cotangents = [tf.ones_like(encoder_loss), tf.cast(ratio[..., None], latent_gradient.dtype) * latent_gradient]
        if transport_cotangent:  # the same z-gradient along the other transports
            transport_ratio = _ratio(transport_cotangent[0], raised[..., None], sign[..., None])
            targets.append(decoder_route.transported_latents)
            cotangents.append(tf.cast(transport_ratio[..., None], latent_gradient.dtype)
                              * latent_gradient[..., None, :])
        encoder_gradients = tape.gradient(targets, list(encoder_variables), output_gradients=cotangents)
    return decoder_gradients, encoder_gradients
