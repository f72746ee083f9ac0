"""Mixing proportions of the recursive mixture `q_m = (1 - eps_m) q_{m-1} + eps_m h_m`.

The proportions are stored as logits `mixing_logits[m] = logit(eps_m)`, one per component slot; slot 0's logit is
ignored (`q_1 = h_1`, so `eps_1 = 1`). After `k` active components the weight of component `m < k` is

    w_m = eps_m * prod_{m < j < k} (1 - eps_j),

which telescopes to a distribution over the active components; inactive slots get weight exactly zero. All
functions here are pure, vectorised and XLA-friendly (no Python control flow on tensor values).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

# Logits are clipped to this range: eps = sigmoid(-30) ~ 1e-13 stands for "eps = 0" with finite logs.
MAX_ABS_LOGIT = 30.0
# Log-weight of an inactive component: exp() of it is exactly 0 in float32, yet it stays finite.
INACTIVE_LOG_WEIGHT = -1e9

# Candidate mixing proportions for the line search over eps_m (0 included, so a component can be ignored).
DEFAULT_EPS_GRID = (0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def eps_to_logit(eps) -> np.ndarray:
    """Mixing proportion(s) in [0, 1] -> clipped logits (numpy, float32)."""
    eps = np.asarray(eps, dtype=np.float64)
    if np.any(eps < 0) or np.any(eps > 1) or np.any(~np.isfinite(eps)):
        raise ValueError(f"Mixing proportions must lie in [0, 1]; got {eps}.")
    with np.errstate(divide="ignore"):
        logit = np.log(eps) - np.log1p(-eps)
    return np.clip(logit, -MAX_ABS_LOGIT, MAX_ABS_LOGIT).astype(np.float32)


def uniform_mixing_logits(max_components: int) -> np.ndarray:
    """Logits with eps_m = 1/m, which make every prefix mixture q_k uniform over its k components."""
    eps = 1.0 / np.arange(1, max_components + 1)
    return eps_to_logit(eps)


def join_log_proportions(logits: tf.Tensor, is_first) -> tuple[tf.Tensor, tf.Tensor]:
    """`(log(1 - eps), log eps)` of the join `q_m = (1 - eps) q_{m-1} + eps h_m` with `eps = sigmoid(logit)`.

    The one rule for a join's proportions: the logit is clipped at `MAX_ABS_LOGIT`, and the first component has
    `eps_1 = 1` (there is no mixture before it: `log(1 - eps_1)` is `INACTIVE_LOG_WEIGHT`).

    Args:
      logits: `[...]` logits of eps.
      is_first: bool, broadcastable to `logits`: where the join is the first component's.

    Returns:
      `(log_keep, log_eps)`, each shaped like `logits` broadcast with `is_first`.
    """
    logits = tf.clip_by_value(tf.convert_to_tensor(logits, tf.float32), -MAX_ABS_LOGIT, MAX_ABS_LOGIT)
    log_eps = tf.where(is_first, 0.0, tf.math.log_sigmoid(logits))
    log_keep = tf.where(is_first, INACTIVE_LOG_WEIGHT, tf.math.log_sigmoid(-logits))
    return log_keep, log_eps


def recursive_log_weights(mixing_logits: tf.Tensor, num_active: tf.Tensor) -> tf.Tensor:
    """Log-weights of the recursive mixture.

    Args:
      mixing_logits: `[..., M]` logits of eps_m (slot 0 ignored).
      num_active: integer tensor broadcastable to `mixing_logits.shape[:-1]`: number of active components k >= 0.

    Returns:
      `[..., M]` log-weights; active slots `m < k` sum (in probability) to 1, inactive slots are
      `INACTIVE_LOG_WEIGHT`. With `k = 0` every slot is inactive.
    """
    mixing_logits = tf.convert_to_tensor(mixing_logits, tf.float32)
    num_slots = tf.shape(mixing_logits)[-1]
    slot = tf.range(num_slots)
    num_active = tf.cast(num_active, tf.int32)[..., None]
    active = slot < num_active
    is_first = tf.equal(slot, 0)
    log_keep, log_eps = join_log_proportions(mixing_logits, is_first)
    # log(1 - eps_j) contributes to every earlier component's weight, but only while slot j is active.
    log_keep = tf.where(active & ~is_first, log_keep, 0.0)
    later_keep = tf.cumsum(log_keep, axis=-1, exclusive=True, reverse=True)
    return tf.where(active, log_eps + later_keep, INACTIVE_LOG_WEIGHT)


def prefix_log_weights(mixing_logits: tf.Tensor) -> tf.Tensor:
    """Log-weights of every earlier mixture `q_{m-1}`, for each slot m.

    Args:
      mixing_logits: `[..., M]` logits (e.g. `[M]`, or `[B, M]` with per-example proportions).

    Returns:
      `[..., M, M]` tensor whose row m holds the log-weights of `q_{m-1}` (the mixture of components `< m`);
      row 0 is all inactive (there is no mixture before the first component).
    """
    mixing_logits = tf.convert_to_tensor(mixing_logits, tf.float32)
    num_slots = tf.shape(mixing_logits)[-1]
    shape = tf.concat([tf.shape(mixing_logits)[:-1], [num_slots, num_slots]], 0)
    tiled = tf.broadcast_to(mixing_logits[..., None, :], shape)
    return recursive_log_weights(tiled, tf.range(num_slots))


def candidate_log_weights(
    mixing_logits: tf.Tensor, num_active: tf.Tensor, candidate_logits: tf.Tensor, logit_offsets=None
) -> tf.Tensor:
    """Log-weights of `q_k` for each candidate value of the newest proportion eps_k.

    Args:
      mixing_logits: `[M]` current logits.
      num_active: scalar k >= 1; slot `k - 1` is the newest component.
      candidate_logits: `[G]` logits of the candidate eps values.
      logit_offsets: optional `[B, M]` per-example offsets added to every candidate's logits (per-example
        proportions: the candidates are values of the shared logit, the offsets stay as they are).

    Returns:
      `[G, M]` log-weights, row g with `eps_k = sigmoid(candidate_logits[g])`; `[G, B, M]` with offsets.
    """
    mixing_logits = tf.convert_to_tensor(mixing_logits, tf.float32)
    candidate_logits = tf.convert_to_tensor(candidate_logits, tf.float32)
    newest = tf.equal(tf.range(tf.shape(mixing_logits)[-1]), tf.cast(num_active, tf.int32) - 1)
    logits = tf.where(newest[None, :], candidate_logits[:, None], mixing_logits[None, :])
    if logit_offsets is not None:
        logits = logits[:, None, :] + tf.convert_to_tensor(logit_offsets, tf.float32)[None]
    return recursive_log_weights(logits, num_active)


def candidate_join_log_proportions(
    candidate_logits: tf.Tensor, num_active: tf.Tensor, logit_offsets=None
) -> tuple[tf.Tensor, tf.Tensor]:
    """`(log(1 - eps_k), log eps_k)` of the newest join for each candidate, as `candidate_log_weights` sets them.

    Args:
      candidate_logits: `[G]` logits of the candidate eps values.
      num_active: scalar k >= 1; slot `k - 1` is the newest component.
      logit_offsets: optional `[B, M]` per-example offsets (the newest slot's is added to every candidate).

    Returns:
      `(log_keep, log_eps)`, each `[G, 1]`; `[G, B]` with offsets.
    """
    newest = tf.cast(num_active, tf.int32) - 1
    candidates = tf.convert_to_tensor(candidate_logits, tf.float32)[:, None]  # [G, 1]
    if logit_offsets is not None:
        offsets = tf.convert_to_tensor(logit_offsets, tf.float32)
        candidates = candidates + tf.gather(offsets, newest, axis=-1)[None, :]  # [G, B]
    return join_log_proportions(candidates, tf.equal(newest, 0))


def slot_sources(num_slots, num_active) -> tf.Tensor:
    """`[M]` int32: the component each slot draws its samples from, `i` for active slots and `i mod k` beyond.

    Every slot's decoder pass is computed anyway (the component networks are batched over all `M` slots), so the
    importance-weighted bound lets the inactive slots draw extra samples from the active components: with one
    active component the `M` slots are IWAE with `k = M` samples.
    """
    slot = tf.range(num_slots)
    num_active = tf.maximum(tf.cast(num_active, tf.int32), 1)
    return tf.where(slot < num_active, slot, slot % num_active)


def slot_log_weights(log_weights: tf.Tensor, sources: tf.Tensor) -> tf.Tensor:
    """Slot log-weights `log w_src(i) - log n_src(i)`: the component's weight shared by the slots drawing from it.

    Args:
      log_weights: `[..., M]` component log-weights.
      sources: `[M]` from `slot_sources`.

    Returns:
      `[..., M]` slot log-weights; they sum (in probability) to what the component weights sum to.
    """
    # n_src(i): how many slots share slot i's component (an [M, M] comparison; XLA-friendly, unlike bincount).
    shared = tf.reduce_sum(tf.cast(tf.equal(sources[:, None], sources[None, :]), tf.float32), axis=-1)
    return tf.gather(log_weights, sources, axis=-1) - tf.math.log(shared)
