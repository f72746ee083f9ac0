"""The allowed values of the settings that name a choice, in one place without TensorFlow.

`tf_rmvae.config` validates a `RunConfig` against them (and `trainers/train.py` makes them its enum flags)
without importing TensorFlow; the modules that implement each choice import them from here.
"""

#: Training methods of `RecursiveMixtureVAE`: Recursive Mixture Estimation, one Gaussian, a jointly trained
#: mixture, boosting variational inference.
METHODS = ("rme", "vae", "mixture", "boosting")
#: Methods that add components one at a time (recursively).
RECURSIVE_METHODS = ("rme", "boosting")
#: When components train: one joins per stage, or all of them every step.
SCHEDULES = ("stagewise", "sweep")
#: What the decoder and the mixing proportions train on: the stratified ELBO or importance-weighted bound.
BOUNDS = ("elbo", "iw")
#: The values of the `bound` setting: a bound, or "auto", the method's default (`resolve_bound`).
BOUND_SETTINGS = ("auto", *BOUNDS)
#: What a batch with NaN/Inf pixels does: stop naming the batch, or skip those examples.
NONFINITE_POLICIES = ("raise", "skip")
#: Encoder and decoder networks.
ARCHITECTURES = ("dense", "conv")
#: Likelihoods p(x|z) of a run; "auto": Bernoulli for binary datasets, Gaussian otherwise.
DECODERS = ("auto", "bernoulli", "gaussian")
#: `tf.distribute` strategies by name (`tf_rmvae.distribute.make_strategy`).
STRATEGIES = ("default", "mirrored", "multi_worker_mirrored", "tpu")
#: Keras global dtype policies (`tf_rmvae.distribute.set_precision`).
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def resolve_bound(method: str, bound: str) -> str:
    """The bound that the `bound` setting names; "auto" is the method's default.

    RME's default is the importance-weighted bound: RME on it was above RME on the ELBO in every budget and seed
    measured (README "Results"). The paper's RME is `bound="elbo"`. The other methods train on the ELBO unless told
    (`bound="iw"` with `method="vae"` and k samples is IWAE).
    """
    if bound != "auto":
        return bound
    return "iw" if method == "rme" else "elbo"


def resolve_max_log_ratio(max_log_ratio: float) -> float | None:
    """The cap of RME's and boosting's per-sample KL log-ratio that a `max_log_ratio` setting names: any negative
    value is None, uncapped (so a flag or a harness setting can say "no cap" with a number)."""
    return None if max_log_ratio < 0 else max_log_ratio


def uses_shared_trunk(shared_trunk: bool, num_components: int) -> bool:
    """Whether the components are heads on one trunk: only with several, since one component is one network either
    way (so a VAE's weights do not depend on the setting)."""
    return bool(shared_trunk) and num_components > 1


def is_stagewise(method: str, schedule: str | None) -> bool:
    """Whether a method trains its components stage by stage (the newest one on its own criterion): the recursive
    methods on schedule "stagewise"; the others train all components jointly."""
    return method in RECURSIVE_METHODS and schedule == "stagewise"


def adds_components(method: str, schedule: str | None, num_components: int) -> bool:
    """Whether components join one at a time during training, on the `epochs_per_component` schedule: stage-wise
    (`is_stagewise`) with several components."""
    return is_stagewise(method, schedule) and num_components > 1
