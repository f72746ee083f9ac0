"""Inference and training-step speed of RME against a plain VAE and SA-VAE, as ratios.

Inference for the same inputs at each batch size: (a) the mixture encoder's single batched pass (M components),
(b) a plain VAE encoder (M = 1; also IWAE's test-time inference), (c) a VAE encoder with as many parameters as the
M encoders (`vae_equal_params`), (d) SA-VAE with `savae_steps` refinement steps, (e) mixture encoders with one
shared trunk and M heads for each M in `shared_components`. Training: one `train_step` of
`rme` with M = 2, 4, 8 (all M components active) relative to `vae`, at batch 100, and for each shared-trunk M the
shared encoder's step and IWAE's with k = M. Every number is the median of
`repeats` calls after warm-up (outputs fetched to the host), measured both as a `tf.function` graph and with
`jit_compile=True` (XLA); the inference models, and the training steps, are called in turn in every round, so a
slowdown of the shared machine hits them alike. Networks are untrained: speed does not depend on the weights.

    python -m benchmarks.speed                     # full measurement, writes benchmarks/results/speed.json
    python -m benchmarks.speed --tiny              # seconds-long smoke run (tests)

Targets for M = 4 independent component networks: batch 1: RME <= 2 x VAE encoder and SA-VAE(10) >=
10 x RME; batch 1000: RME <= 1.25 x M x VAE encoder; training step at batch 100: RME <= 1.25 x M x VAE step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
from typing import NamedTuple, Sequence

import keras
import numpy as np
import tensorflow as tf

import tf_rmvae
from tf_rmvae.choices import BOUND_SETTINGS
from tf_rmvae.config import RunConfig
from tf_rmvae.run import evaluation
from tf_rmvae.run import factory as model_factory

IMAGE_SHAPE = (28, 28, 1)
MODES = ("function", "jit")


@dataclasses.dataclass
class SpeedConfig:
    batch_sizes: Sequence[int] = (1, 100, 1000)
    components: Sequence[int] = (2, 4, 8)
    target_components: int = 4
    savae_steps: Sequence[int] = (5, 10, 20)
    shared_components: Sequence[int] = ()  # M of the shared-trunk encoders timed for inference
    # (M, S) of shared-trunk RME with S samples per slot and importance-weighted component criteria whose training
    # step is timed (the harness's `--num_samples=S --component_bounds=iw`); their inference is the M-head encoder's
    sampled_shared: Sequence[tuple[int, int]] = ()
    # Also time the DReG twins of IWAE k = M (`shared_components`) and of the sampled shared-trunk RME: their encoder
    # trains on its own loss (`RecursiveMixtureTrainer.gradients`: still one backward pass through the decoder).
    dreg: bool = False
    # Also time each model whose encoder trains on a loss of its own with each loss's own backward pass through the
    # decoder (`two_pass_train_step`, the step before `RecursiveMixtureTrainer.gradients` took one): "NAME_twopass".
    two_pass: bool = False
    hidden_units: Sequence[int] = (500, 500)
    latent_dim: int = 32
    train_batch_size: int = 100
    repeats: int = 20
    modes: Sequence[str] = MODES
    # The bound RME's training step is timed on: "elbo" is what the committed speed*.json measured; "auto" (RME's
    # default, the importance-weighted bound) has the same decoder passes per step.
    bound: str = "elbo"
    output: str | None = "benchmarks/results/speed.json"

    @property
    def reference_steps(self) -> int:
        """The SA-VAE step count of the batch-1 target (10, or the middle of the measured counts)."""
        steps = list(self.savae_steps)
        return 10 if 10 in steps else steps[len(steps) // 2]


def tiny_config(**overrides) -> SpeedConfig:
    values = dict(
        batch_sizes=(1, 16), components=(2,), target_components=2, savae_steps=(1, 2), hidden_units=(16,),
        latent_dim=4, train_batch_size=8, repeats=3, modes=("function",), output=None,
    )
    values.update(overrides)
    return SpeedConfig(**values)


def _model(config: SpeedConfig, method: str = "vae", components: int = 1, **settings) -> keras.Model:
    """The compiled model of a run configuration (`tf_rmvae.run.factory`) at the speed run's sizes, every
    component active (the full cost); `settings` are other `RunConfig` fields."""
    run = RunConfig.from_preset(
        model_dir="(in memory)", method=method, num_components=components, hidden_units=tuple(config.hidden_units),
        latent_dim=config.latent_dim, export_dir="", **settings).validate().resolved()
    model = model_factory.build_compiled_model(run, IMAGE_SHAPE, binary=True)
    if hasattr(model.encoder, "num_active_components"):
        model.encoder.num_active_components.assign(components)
    return model


def _encoder(config: SpeedConfig, components: int, **settings) -> tf_rmvae.RecursiveMixtureEncoder:
    """A mixture encoder of `components` components (all active) built by the model factory."""
    method = "vae" if components == 1 else "rme"
    settings = dict(dict(shared_trunk=False, bound="elbo", component_bound="elbo"), **settings)
    return _model(config, method, components, **settings).encoder


def _images(batch: int, seed: int = 0) -> tf.Tensor:
    rng = np.random.default_rng(seed)
    return tf.constant((rng.random((batch, *IMAGE_SHAPE)) < 0.13).astype(np.float32))


def inference_times(config: SpeedConfig, mode: str) -> dict[str, dict[int, float]]:
    """`{model name: {batch size: median seconds}}` for one mode ("function" or "jit")."""
    jit = mode == "jit"
    m = config.target_components
    vae_encoder = _encoder(config, 1)
    rme_encoder = _encoder(config, m)
    equal_encoder = _encoder(config, 1, encoder_parameters_of=m)
    savae = _model(config, "savae")
    functions = {
        "vae_encoder": tf.function(vae_encoder.compute_parameters, jit_compile=jit),
        f"rme_encoder_M{m}": tf.function(rme_encoder.compute_parameters, jit_compile=jit),
        f"vae_equal_params_encoder_M{m}": tf.function(equal_encoder.compute_parameters, jit_compile=jit),
    }
    for components in config.shared_components:
        shared = _encoder(config, components, shared_trunk=True)
        functions[f"rme_shared_encoder_M{components}"] = tf.function(shared.compute_parameters, jit_compile=jit)
    for steps in config.savae_steps:
        functions[f"savae_{steps}"] = tf.function(
            lambda x, k=steps: savae.refine(x, steps=k), jit_compile=jit)
    times: dict[str, dict[int, float]] = {name: {} for name in functions}
    for batch in config.batch_sizes:  # the models in turn in every round (`time_functions`): side by side
        for name, seconds in evaluation.time_functions(functions, _images(batch), repeats=config.repeats).items():
            times[name][batch] = seconds
    return times


class _TimedModel(NamedTuple):
    """One model whose training step `train_step_times` times (`RecursiveMixtureVAE` arguments)."""

    name: str
    method: str
    components: int
    shared_trunk: bool = False
    bound: str = "elbo"
    samples: int = 1
    component_bound: str = "elbo"
    encoder_gradient: str = "reparam"


def train_step_times(config: SpeedConfig, mode: str) -> dict[str, list[float]]:
    """`{"vae": [s, ...], "rme_M2": [...], ..., "iwae_k8": [...]}`: seconds of one training step at `train_batch_size`
    in each round, the models' steps called in turn in every round (`evaluation.time_rounds`), so a slowdown of a
    shared machine hits them alike and their per-round ratios stay comparable (`evaluation.paired_ratio`)."""
    jit = mode == "jit"
    x = _images(config.train_batch_size, seed=1)
    steps = {}
    # RME with M independent networks, for each shared-trunk M the shared encoder beside IWAE with k = M (as many
    # decoder passes per step), and the shared-trunk RME with S samples per slot (M x S decoder passes;
    # `frontier.train_step_name` names them alike)
    models = [_TimedModel("vae", "vae", 1)]
    models += [_TimedModel(f"rme_M{m}", "rme", m, bound=config.bound) for m in config.components]
    for m in config.shared_components:
        models += [_TimedModel(f"rme_shared_M{m}", "rme", m, shared_trunk=True, bound=config.bound),
                   _TimedModel(f"iwae_k{m}", "vae", 1, bound="iw", samples=m)]
    models += [_TimedModel(f"rme_shared_M{m}_ciw_S{n}", "rme", m, shared_trunk=True, bound=config.bound, samples=n,
                           component_bound="iw") for m, n in config.sampled_shared]
    if config.dreg:
        models += [_TimedModel(f"iwae_dreg_k{m}", "vae", 1, bound="iw", samples=m, encoder_gradient="dreg")
                   for m in config.shared_components]
        models += [_TimedModel(f"rme_shared_M{m}_ciw_S{n}_dreg", "rme", m, shared_trunk=True, bound="iw",
                               samples=n, component_bound="iw", encoder_gradient="dreg")
                   for m, n in config.sampled_shared]
    for spec in models:
        for two_pass in (False, True) if config.two_pass else (False,):
            keras.utils.set_random_seed(0)
            model = _model(config, spec.method, spec.components, shared_trunk=spec.shared_trunk, bound=spec.bound,
                           num_samples=spec.samples, component_bound=spec.component_bound,
                           encoder_gradient=spec.encoder_gradient, lambda_kl=0.3)
            if two_pass and not model.rme.criterion.trains_components:
                continue  # one loss: one backward pass either way
            step = two_pass_train_step(model) if two_pass else model.train_step
            steps[spec.name + ("_twopass" if two_pass else "")] = tf.function(step, jit_compile=jit)
    return evaluation.time_rounds(steps, x, repeats=config.repeats)


def two_pass_train_step(model: tf_rmvae.RecursiveMixtureVAE):
    """`model`'s own training step with each loss's gradient taken by its own backward pass through the decoder
    (`gradient_routes`), as it was before `RecursiveMixtureTrainer.gradients` took one pass for both: the same
    gradients (tested in `tests/test_decoder_pass.py`), timed beside it. Changes `model` (a model built to be timed)."""

    if model.rme.criterion.reads_transports:
        raise ValueError("encoder_gradient='gdreg' has no two-pass step: its gradient along the other components' "
                         "transports comes from RecursiveMixtureTrainer.gradients only.")

    def routed_gradients(tape, losses, variables):
        return [pair for loss, route in model.rme.gradient_routes(losses, variables)
                for pair in zip(tape.gradient(loss, route), route)]

    model.rme.gradients = routed_gradients  # this instance only: `apply_gradients` calls it
    return model.train_step


def ratios_and_targets(config: SpeedConfig, inference: dict, training_rounds: dict) -> tuple[dict, list[dict]]:
    """Ratios to the VAE and the issue's targets (value, bound, PASS/FAIL); training steps as paired ratios, the
    median over rounds of the two steps' times in the same round (`train_step_times`)."""
    training, ratio = training_rounds, evaluation.paired_ratio
    m = config.target_components
    rme = f"rme_encoder_M{m}"
    vae = "vae_encoder"
    ratios = {}
    for batch in config.batch_sizes:
        ratios[f"rme_M{m}/vae_encoder@{batch}"] = inference[rme][batch] / inference[vae][batch]
        for steps in config.savae_steps:
            savae_time = inference[f"savae_{steps}"][batch]
            ratios[f"savae_{steps}/rme_M{m}@{batch}"] = savae_time / inference[rme][batch]
    for components in config.components:
        ratios[f"train_rme_M{components}/train_vae@{config.train_batch_size}"] = (
            ratio(training[f"rme_M{components}"], training["vae"])
        )
    # The sampled shared-trunk RME against IWAE with as many decoder passes or the next M it was timed with (3 x 5
    # against k = 16: the pairing), and every DReG twin against its plain twin.
    for heads, samples in config.sampled_shared:
        iwae = next((f"iwae_k{k}" for k in sorted(config.shared_components) if k >= heads * samples), None)
        for suffix in ("", "_dreg"):
            for name in (f"rme_shared_M{heads}_ciw_S{samples}{suffix}",
                         f"rme_shared_M{heads}_ciw_S{samples}{suffix}_twopass"):
                if iwae is not None and name in training:
                    ratios[f"train_{name}/train_{iwae}@{config.train_batch_size}"] = ratio(
                        training[name], training[iwae])
    for name in training:
        if name.endswith("_twopass"):
            ratios[f"train_{name}/train_{name.removesuffix('_twopass')}@{config.train_batch_size}"] = (
                ratio(training[name], training[name.removesuffix("_twopass")]))
        elif name.endswith("_dreg") or name.startswith("iwae_dreg_"):
            plain = name.removesuffix("_dreg").replace("iwae_dreg_", "iwae_")
            if plain in training:
                ratios[f"train_{name}/train_{plain}@{config.train_batch_size}"] = ratio(training[name], training[plain])
    small, large = min(config.batch_sizes), max(config.batch_sizes)
    targets = [
        dict(name=f"batch {small}: RME(M={m}) <= 2 x VAE encoder",
             value=ratios[f"rme_M{m}/vae_encoder@{small}"], bound=2.0, kind="<="),
        dict(name=f"batch {small}: SA-VAE({config.reference_steps}) >= 10 x RME(M={m})",
             value=ratios[f"savae_{config.reference_steps}/rme_M{m}@{small}"], bound=10.0, kind=">="),
        dict(name=f"batch {large}: RME(M={m}) <= 1.25 x M x VAE encoder",
             value=ratios[f"rme_M{m}/vae_encoder@{large}"], bound=1.25 * m, kind="<="),
    ]
    if m in config.components:
        targets.append(dict(
            name=f"train step batch {config.train_batch_size}: RME(M={m}) <= 1.25 x M x VAE",
            value=ratios[f"train_rme_M{m}/train_vae@{config.train_batch_size}"], bound=1.25 * m, kind="<=",
        ))
    for target in targets:
        value, bound = target["value"], target["bound"]
        ok = value <= bound if target["kind"] == "<=" else value >= bound
        target["status"] = "PASS" if ok else "FAIL"
    return ratios, targets


def run(config: SpeedConfig, log=print) -> dict:
    """Measures every mode, prints times, ratios and targets, writes JSON to `config.output` (if set)."""
    result = dict(
        config={k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()},
        device=_device(), platform=platform.platform(), tensorflow=tf.__version__, modes={},
    )
    for mode in config.modes:
        inference = inference_times(config, mode)
        rounds = train_step_times(config, mode)
        ratios, targets = ratios_and_targets(config, inference, rounds)
        training = {name: float(np.median(times)) for name, times in rounds.items()}
        result["modes"][mode] = dict(
            inference_ms={name: {str(b): 1000 * t for b, t in by_batch.items()}
                          for name, by_batch in inference.items()},
            train_step_ms={name: 1000 * t for name, t in training.items()}, ratios=ratios, targets=targets,
        )
        log(f"== {mode} ({'XLA' if mode == 'jit' else 'tf.function graph'}), {result['device']}")
        log("inference ms (median): " + "; ".join(
            f"{name}: " + ", ".join(f"b{b}={1000 * t:.3f}" for b, t in by_batch.items())
            for name, by_batch in inference.items()
        ))
        log("train step ms (median): " + ", ".join(f"{n}={1000 * t:.2f}" for n, t in training.items()))
        for name, value in ratios.items():
            log(f"  ratio {name} = {value:.2f}")
        for target in targets:
            log(f"  [{target['status']}] {target['name']}: {target['value']:.2f} "
                f"(bound {target['bound']:.2f})")
        if config.output:  # after every mode, so a slow later mode cannot lose the earlier one
            os.makedirs(os.path.dirname(config.output) or ".", exist_ok=True)
            with open(config.output, "w") as f:
                json.dump(result, f, indent=1)
            log(f"wrote {config.output}")
    return result


def _device() -> str:
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return "GPU " + tf.config.experimental.get_device_details(gpus[0]).get("device_name", gpus[0].name)
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores visible)"


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="seconds-long smoke run (small networks, few repeats)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch_sizes", default=None, help="comma-separated, e.g. 1,100,1000")
    parser.add_argument(
        "--components", default=None, help="comma-separated M of the training-step measurement")
    parser.add_argument("--hidden_units", default=None, help="comma-separated encoder/decoder widths")
    parser.add_argument("--modes", default=None, help="function,jit")
    parser.add_argument("--savae_steps", default=None, help="comma-separated SA-VAE refinement steps")
    parser.add_argument(
        "--shared_components", default=None, help="comma-separated M of shared-trunk encoders to time")
    parser.add_argument(
        "--sampled_shared", default=None,
        help="comma-separated MxS (e.g. 4x4): training step of shared-trunk RME with S samples per slot and "
             "importance-weighted component criteria")
    parser.add_argument("--dreg", action="store_true",
                        help="also time the DReG twins of IWAE (--shared_components) and of --sampled_shared")
    parser.add_argument("--two_pass", action="store_true",
                        help="also time the models whose encoder trains on its own loss with two backward passes "
                             "through the decoder (NAME_twopass: the step before one pass took both)")
    parser.add_argument("--output", default=None, help="JSON path ('' to write nothing)")
    parser.add_argument("--bound", default=None, choices=BOUND_SETTINGS,
                        help="the bound RME's training step is timed on (default elbo)")
    args = parser.parse_args(argv)
    config = tiny_config() if args.tiny else SpeedConfig()
    ints = lambda text: tuple(int(v) for v in text.split(","))
    if args.repeats is not None:
        config.repeats = args.repeats
    if args.batch_sizes:
        config.batch_sizes = ints(args.batch_sizes)
    if args.components:
        config.components = ints(args.components)
    if args.hidden_units:
        config.hidden_units = ints(args.hidden_units)
    if args.modes:
        config.modes = tuple(args.modes.split(","))
    if args.savae_steps:
        config.savae_steps = ints(args.savae_steps)
    if args.shared_components:
        config.shared_components = ints(args.shared_components)
    if args.sampled_shared:
        config.sampled_shared = tuple(tuple(int(v) for v in pair.split("x")) for pair in args.sampled_shared.split(","))
    if args.output is not None:
        config.output = args.output or None
    if args.bound:
        config.bound = args.bound
    config.dreg = args.dreg
    config.two_pass = args.two_pass
    return run(config)


if __name__ == "__main__":
    main()
