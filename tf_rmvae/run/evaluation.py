"""Per-example test metrics of any tf_rmvae model, and the statistics that compare methods on the same digits.

Works with every model that has `elbo(x, num_samples) -> [B]` and `log_likelihood(x, iwae_samples, chunk_size) -> [B]`
(`RecursiveMixtureVAE`, `SemiAmortizedVAE`). Data are numpy arrays with a fixed binarization, so two models see the
same digits and their per-example differences can be paired:

    a = evaluate(model_a, x_test, iwae_samples=5000)
    b = evaluate(model_b, x_test, iwae_samples=5000)
    diff, se = paired_difference(a["log_likelihood"], b["log_likelihood"])   # mean of a - b, its paired s.e.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping

import numpy as np
import tensorflow as tf


def mean_and_se(values) -> tuple[float, float]:
    """Mean and standard error (`std(ddof=1) / sqrt(n)`; 0 for n = 1) of a 1-D array."""
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        raise ValueError("mean_and_se needs at least one value.")
    se = float(np.std(values, ddof=1) / np.sqrt(values.size)) if values.size > 1 else 0.0
    return float(np.mean(values)), se


def paired_difference(a, b) -> tuple[float, float]:
    """Mean of the per-example difference `a - b` and its paired standard error (same examples in a and b)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"Paired arrays need the same examples; got shapes {a.shape} and {b.shape}.")
    return mean_and_se(a - b)


def paired_comparisons(per_example: Mapping[str, np.ndarray]) -> dict[str, dict[str, tuple[float, float]]]:
    """For every ordered pair of names: `(mean difference, paired s.e.)` of `per_example[a] - per_example[b]`.

    Returns `{a: {b: (diff, se) for b != a}}`.
    """
    return {
        a: {b: paired_difference(values_a, values_b) for b, values_b in per_example.items() if b != a}
        for a, values_a in per_example.items()
    }


def _batched(fn: Callable[[tf.Tensor], tf.Tensor], x: np.ndarray, batch_size: int) -> np.ndarray:
    """`fn` on batches of `x` (the last one padded with copies of its first example: one trace), concatenated."""
    outputs = []
    batch_size = max(1, min(batch_size, len(x)))
    for start in range(0, len(x), batch_size):
        batch = x[start:start + batch_size]
        size = len(batch)
        if size < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[:1], batch_size - size, axis=0)], axis=0)
        outputs.append(np.asarray(fn(tf.constant(batch)))[:size])
    return np.concatenate(outputs, axis=0) if outputs else np.zeros([0], np.float32)


def per_example_elbo(model, x: np.ndarray, num_samples: int = 1, batch_size: int = 500) -> np.ndarray:
    """`[N]` ELBO of each example (`num_samples` samples per component), in batches, under `tf.function`."""
    fn = tf.function(lambda batch: model.elbo(batch, num_samples), reduce_retracing=True)
    return _batched(fn, x, batch_size)


def per_example_log_likelihood(
    model, x: np.ndarray, iwae_samples: int = 5000, chunk_size: int = 100, batch_size: int = 100
) -> np.ndarray:
    """`[N]` importance-weighted `log p(x)` with K = `iwae_samples`, in batches of examples and chunks of samples."""
    fn = tf.function(lambda batch: model.log_likelihood(batch, iwae_samples, chunk_size), reduce_retracing=True)
    return _batched(fn, x, batch_size)


def evaluate(
    model,
    x: np.ndarray,
    iwae_samples: int = 5000,
    elbo_samples: int = 1,
    chunk_size: int = 100,
    batch_size: int = 100,
    seed: int | None = 0,
) -> dict:
    """Per-example ELBO and IWAE log-likelihood of `x` plus their means and standard errors.

    Returns a dict with `elbo`, `log_likelihood` (`[N]` numpy arrays), `elbo_mean`, `elbo_se`,
    `log_likelihood_mean`, `log_likelihood_se`, `iwae_samples`, `eval_time_s`.
    """
    if seed is not None:
        tf.random.set_seed(seed)
    start = time.perf_counter()
    elbo = per_example_elbo(model, x, elbo_samples, max(batch_size, 100))
    log_likelihood = per_example_log_likelihood(model, x, iwae_samples, chunk_size, batch_size)
    elapsed = time.perf_counter() - start
    elbo_mean, elbo_se = mean_and_se(elbo)
    ll_mean, ll_se = mean_and_se(log_likelihood)
    return dict(
        elbo=elbo, log_likelihood=log_likelihood, elbo_mean=elbo_mean, elbo_se=elbo_se,
        log_likelihood_mean=ll_mean, log_likelihood_se=ll_se, iwae_samples=int(iwae_samples),
        eval_time_s=elapsed,
    )


def mixture_summary(encoder, x: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """Mixture weights and each component's mean entropy `H(h_m(z | x))` (nats) on `x [N, ...]`: `([M], [M])`.

    With shared proportions the weights are the encoder's current ones; with per-example proportions
    (`per_example_proportions=True`) they are the mean over `x` of each example's `eps_m(x)`.
    """
    entropy_sum = np.zeros([encoder.max_components], np.float64)
    weight_sum = np.zeros([encoder.max_components], np.float64)
    for start in range(0, len(x), batch_size):
        log_weights, _, scale = encoder.compute_parameters(tf.constant(x[start:start + batch_size]))
        # The entropy of a diagonal Gaussian: sum_d log(scale_d) + D/2 log(2 pi e).
        entropy = tf.reduce_sum(tf.math.log(scale), -1) + 0.5 * scale.shape[-1] * np.log(2 * np.pi * np.e)
        entropy_sum += np.sum(entropy.numpy(), axis=0)
        weight_sum += np.sum(np.exp(log_weights.numpy()), axis=0)
    count = max(len(x), 1)
    if not getattr(encoder, "per_example_proportions", False):
        return np.exp(tf.convert_to_tensor(encoder.mixture_log_weights()).numpy()), entropy_sum / count
    return weight_sum / count, entropy_sum / count


def model_mixture_summary(model, x: np.ndarray) -> tuple[list[float], list[float]]:
    """`mixture_summary` of `model`'s encoder on `x [N, ...]` as lists; for SA-VAE (one Gaussian, refined per
    example: `variational_parameters`) `[1.0]` and the mean entropy (nats) of its refined posteriors."""
    if not hasattr(model.encoder, "max_components"):
        _, scale = model.variational_parameters(tf.constant(x))
        entropy = tf.reduce_sum(0.5 * np.log(2 * np.pi * np.e) + tf.math.log(scale), -1)
        return [1.0], [float(tf.reduce_mean(entropy))]
    weights, entropies = mixture_summary(model.encoder, x)
    return [float(w) for w in weights], [float(e) for e in entropies]


def inference_function(model) -> Callable[[tf.Tensor], object]:
    """The test-time inference of `model` (what a served encoder computes for a batch of images).

    `variational_parameters(x)` where the model has it (SA-VAE: amortized pass plus refinement), otherwise the
    mixture encoder's single pass `encoder.compute_parameters(x)`.
    """
    if hasattr(model, "variational_parameters"):
        return model.variational_parameters
    return model.encoder.compute_parameters


def time_function(fn: Callable, *args, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time in seconds of `fn(*args)` (outputs fetched to host) after `warmup` calls."""
    return time_functions({"fn": fn}, *args, repeats=repeats, warmup=warmup)["fn"]


def time_rounds(functions: dict[str, Callable], *args, repeats: int = 20, warmup: int = 3) -> dict[str, list[float]]:
    """`{name: [seconds of fn(*args) in each round]}`, the functions called in turn in every round: a slowdown of a
    shared machine then hits all of them alike, and the ratio of two functions' times in one round stays comparable
    (`paired_ratio`). Each round starts one function later than the last, so no function always runs right after
    the same neighbour (caches, allocator state)."""
    def run(fn):
        return tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, "numpy") else t, fn(*args))

    for fn in functions.values():
        for _ in range(max(warmup, 1)):
            run(fn)
    times = {name: [] for name in functions}
    order = list(functions.items())
    for round_index in range(max(repeats, 1) if order else 0):
        shift = round_index % len(order)
        for name, fn in order[shift:] + order[:shift]:
            start = time.perf_counter()
            run(fn)
            times[name].append(time.perf_counter() - start)
    return times


def time_functions(functions: dict[str, Callable], *args, repeats: int = 20, warmup: int = 3) -> dict[str, float]:
    """`{name: median seconds of fn(*args)}` over the rounds of `time_rounds`."""
    return {name: float(np.median(values))
            for name, values in time_rounds(functions, *args, repeats=repeats, warmup=warmup).items()}


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """The median over rounds of one function's time over another's in the same round (`time_rounds`): robust to a
    machine whose load changes between rounds, where a ratio of two medians is not."""
    ratios = np.asarray(numerator, np.float64) / np.asarray(denominator, np.float64)
    return float(np.median(ratios))


def inference_time(model, x: np.ndarray, repeats: int = 20, jit_compile: bool = False) -> float:
    """Median seconds of one test-time inference pass of `model` on the batch `x` (compiled `tf.function`)."""
    fn = tf.function(inference_function(model), jit_compile=jit_compile)
    return time_function(fn, tf.constant(x), repeats=repeats)
