"""The allowed values of the settings that name a choice, in one place without TensorFlow.

`tf_rmvae.config` validates a `RunConfig` against them (and `trainers/train.py` makes them its enum flags)
without importing TensorFlow; the modules that implement each choice import them from here.
"""

import math

#: Training methods of `RecursiveMixtureVAE`: Recursive Mixture Estimation, one Gaussian, a jointly trained
#: mixture, boosting variational inference.
METHODS = ("rme", "vae", "mixture", "boosting")
#: Methods a run can train: those of `RecursiveMixtureVAE` and SA-VAE (`SemiAmortizedVAE`: one Gaussian encoder whose
#: output is refined by gradient steps on each example's ELBO).
RUN_METHODS = (*METHODS, "savae")
#: What SA-VAE's encoder trains on: the ELBO at the end of the unrolled refinement, or its own (amortized) ELBO.
REFINE_OBJECTIVES = ("unrolled", "amortized")
#: How a run's training batches are drawn: epoch e's order and binarization a function of (seed, e) (a resumed run
#: sees the uninterrupted run's batches), or one pipeline reshuffled on every pass (the benchmark's cells trained
#: so before they were run configurations; a resumed run sees other batches than an uninterrupted one).
DATA_ORDERS = ("epoch_keyed", "reshuffled")
#: Methods that add components one at a time (recursively).
RECURSIVE_METHODS = ("rme", "boosting")
#: When components train: one joins per stage, or all of them every step.
SCHEDULES = ("stagewise", "sweep")
#: What the decoder and the mixing proportions train on: the stratified ELBO or importance-weighted bound.
BOUNDS = ("elbo", "iw")
#: The values of the `bound` setting: a bound, or "auto", the method's default (`resolve_bound`).
BOUND_SETTINGS = ("auto", *BOUNDS)
#: How the encoder's importance-weighted objectives are differentiated: the ordinary reparameterisation gradient,
#: doubly reparameterised (DReG, Tucker et al. 2019: the score term replaced by squared normalised weights), or, for
#: a jointly trained mixture, the generalized DReG (every component's score terms reparameterised, Bauer & Mnih 2021).
ENCODER_GRADIENTS = ("reparam", "dreg", "gdreg")
#: The values of the `encoder_gradient` setting: an estimator, or "auto" (`resolve_encoder_gradient`).
ENCODER_GRADIENT_SETTINGS = ("auto", *ENCODER_GRADIENTS)
#: What a batch with NaN/Inf pixels does: stop naming the batch, or skip those examples.
NONFINITE_POLICIES = ("raise", "skip")
#: Encoder and decoder networks.
ARCHITECTURES = ("dense", "conv")
#: Likelihoods p(x|z) of a run; "auto": Bernoulli for binary datasets, Gaussian otherwise.
DECODERS = ("auto", "bernoulli", "gaussian")
#: `tf.distribute` strategies by name (`tf_rmvae.run.strategies.make_strategy`).
STRATEGIES = ("default", "mirrored", "multi_worker_mirrored", "tpu")
#: Keras global dtype policies (`tf_rmvae.run.strategies.set_precision`).
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16")


def resolve_bound(method: str, bound: str) -> str:
    """The bound that the `bound` setting names; "auto" is the method's default.

    RME's default is the importance-weighted bound: RME on it was above RME on the ELBO in every budget and seed
    measured (docs/results.md). The paper's RME is `bound="elbo"`. The other methods train on the ELBO unless told
    (`bound="iw"` with `method="vae"` and k samples is IWAE).
    """
    if bound != "auto":
        return bound
    return "iw" if method == "rme" else "elbo"


def encoder_objective_problem(method: str, bound: str, component_bound: str, num_samples: int,
                              encoder_gradient: str, encoder_groups: int) -> str | None:
    """Why `encoder_gradient` and `encoder_groups` do not apply to a model, or None when they do.

    DReG applies to an importance-weighted objective: IWAE (`method="vae"` on the "iw" bound), RME's components on their
    importance-weighted criteria, or a jointly trained mixture on the "iw" bound (`method="mixture"`, the stratified
    bound's DReG; "gdreg", its generalized DReG, to that mixture only). `encoder_groups = G > 1` is PIWAE: a VAE on
    the "iw" bound whose encoder trains on MIWAE(G, S / G) (`num_samples` S divisible by G) while its decoder trains
    on IWAE(S). `num_samples` 0 ("auto") is read as `resolve_num_samples` gives it, `encoder_gradient` "auto" as
    `resolve_encoder_gradient` gives it."""
    if encoder_gradient not in ENCODER_GRADIENT_SETTINGS:
        return f"encoder_gradient must be one of {ENCODER_GRADIENT_SETTINGS}; got {encoder_gradient!r}."
    encoder_gradient = resolve_encoder_gradient(method, bound, component_bound, encoder_gradient)
    if int(encoder_groups) < 1:
        return f"encoder_groups must be >= 1; got {encoder_groups}."
    bound = resolve_bound(method, bound)
    iwae = method == "vae" and bound == "iw"
    if encoder_groups > 1:
        samples = resolve_num_samples(method, bound, component_bound, num_samples)
        if not iwae:
            return f"encoder_groups > 1 (PIWAE) needs method 'vae' on bound 'iw'; got {method!r} on {bound!r}."
        if samples % encoder_groups:
            return f"encoder_groups ({encoder_groups}) must divide num_samples ({samples})."
    mixture_iw = method == "mixture" and bound == "iw"
    if encoder_gradient == "gdreg" and not mixture_iw:
        return ("encoder_gradient='gdreg' (the generalized DReG of a mixture proposal) applies to method 'mixture' on "
                f"bound 'iw'; got method {method!r}, bound {bound!r} (use 'dreg' for IWAE and RME).")
    if encoder_gradient == "dreg":
        rme_iw = method == "rme" and resolve_component_bound(method, bound, component_bound) == "iw"
        if not (iwae or rme_iw or mixture_iw):
            return ("encoder_gradient='dreg' applies to method 'vae' on bound 'iw' (IWAE), to method 'rme' with "
                    f"component_bound 'iw' and to method 'mixture' on bound 'iw'; got method {method!r}, bound "
                    f"{bound!r}.")
    return None


def resolve_encoder_gradient(method: str, bound: str, component_bound: str, encoder_gradient: str) -> str:
    """The estimator that the `encoder_gradient` setting names; "auto" is "dreg" for RME on importance-weighted
    component criteria (`resolve_component_bound`): with DReG its components were better proposals and better
    posteriors at 40 epochs in every seed measured (docs/results.md); "reparam" otherwise (IWAE-DReG and the mixture's
    DReG are asked for by name, so `method="vae"` on the "iw" bound stays IWAE and a mixture keeps its numbers)."""
    if encoder_gradient != "auto":
        return encoder_gradient
    return "dreg" if method == "rme" and resolve_component_bound(method, bound, component_bound) == "iw" else "reparam"


def resolve_component_bound(method: str, bound: str, component_bound: str) -> str:
    """The bound in each RME component's criterion that the `component_bound` setting names; "auto" is "iw" for RME
    on the importance-weighted bound (`resolve_bound`), "elbo" otherwise (so `bound="elbo"` alone gives the paper's
    bound and criteria, with one sample per component). RME with importance-weighted component criteria and several
    samples per component beat IWAE with as many decoder passes at 100 epochs (docs/results.md)."""
    if component_bound != "auto":
        return component_bound
    return "iw" if method == "rme" and resolve_bound(method, bound) == "iw" else "elbo"


#: `num_samples` of RME with importance-weighted component criteria where the setting is 0 ("auto"): with three
#: components, 15 decoder passes per step, as IWAE k = 15 (docs/results.md).
RME_DEFAULT_SAMPLES = 5


def resolve_num_samples(method: str, bound: str, component_bound: str, num_samples: int) -> int:
    """Samples per component per step that the `num_samples` setting names; 0 ("auto") is `RME_DEFAULT_SAMPLES` for
    RME on importance-weighted component criteria (`resolve_component_bound`), 1 otherwise."""
    if num_samples:
        return num_samples
    iw_components = resolve_component_bound(method, bound, component_bound) == "iw"
    return RME_DEFAULT_SAMPLES if method == "rme" and iw_components else 1


def resolve_epochs_per_component(epochs_per_component: int, epochs: int, num_components: int) -> int:
    """Epochs per stage that the `epochs_per_component` setting names; 0 ("auto") spreads the components evenly
    over `epochs`: ceil(epochs / M), so the last one joins with about a stage of training left (100 epochs, M = 3:
    at epochs 34 and 68)."""
    if epochs_per_component:
        return epochs_per_component
    return max(1, math.ceil(epochs / num_components))


#: What the best checkpoint and early stopping compare, by the bound a run trains on: `(epoch log, mode)`. The
#: validation value of the bound trained: `val_loss` is the negative importance-weighted bound of an "iw" run (its
#: ELBO is not what it maximises: RME's default components are proposals whose ELBO lags, docs/results.md).
BEST_MONITORS = {"elbo": ("val_elbo", "max"), "iw": ("val_loss", "min")}


def resolve_best_monitor(method: str, bound: str) -> tuple[str, str]:
    """`(monitor, mode)` of the best-validation checkpoint of a run on the `bound` setting (`resolve_bound`)."""
    return BEST_MONITORS[resolve_bound(method, bound)]


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
