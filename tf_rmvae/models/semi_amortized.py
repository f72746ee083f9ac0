"""`SemiAmortizedVAE`: the semi-amortized VAE (SA-VAE) of Kim, Wiseman, Miller, Sontag & Rush (ICML 2018).

An amortized Gaussian encoder (`GaussianEncoder`) proposes `lambda_0 = (loc, log_scale)` for each example;
`refine_steps` gradient ascent steps of size `refine_lr` (plain SGD, or heavy-ball momentum `refine_momentum`)
on each example's own ELBO

    ELBO(lambda; x) = E_{N(z; loc, exp(log_scale)^2)}[log p(x | z)] - KL(N(loc, scale^2) || N(0, I))

(one reparameterised sample per step, closed-form KL) turn it into `lambda_K`, at training and at test time.

Training (default `encoder_objective="unrolled"`, as Kim et al. do): the decoder takes the partial gradient of
`ELBO(lambda_K)` (lambda_K held fixed); the encoder takes the gradient of `ELBO(lambda_K)` backpropagated
through the unrolled refinement (nested `tf.GradientTape`s: the inner tape's gradients are recorded by the
outer one, so the update contains Hessian-vector products of the decoder). Kim et al. additionally clip the
refinement gradients; here each example's refinement gradient is clipped to norm `refine_clip_norm` (0 turns
clipping off). `encoder_objective="amortized"` is the cheaper, first-order option: the encoder trains on the
amortized `ELBO(lambda_0)` and the refinement runs under `stop_gradient` (the decoder still trains on
`ELBO(lambda_K)`).

Example:

    encoder = GaussianEncoder(latent_dim=32)
    model = SemiAmortizedVAE(encoder, BernoulliDecoder((28, 28, 1)), refine_steps=10, refine_lr=0.05)
    model.compile(keras.optimizers.Adam(1e-3))
    model.fit(images_dataset, epochs=10)
    log_px = model.log_likelihood(test_images, iwae_samples=5000)   # [B], refined Gaussian as proposal
"""

from __future__ import annotations

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tf_rmvae.choices import REFINE_OBJECTIVES
from tf_rmvae.config import DEFAULTS
from tf_rmvae.layers.encoders import GaussianEncoder
from tf_rmvae.models.latent_model import LatentVariableModel, replica_batch_layout
from tf_rmvae.models.legacy_weights import GAUSSIAN_LAYOUT

tfd = tfp.distributions

ENCODER_OBJECTIVES = REFINE_OBJECTIVES  # (the name this module exported first)


@keras.saving.register_keras_serializable(package="tf_rmvae")
class SemiAmortizedVAE(LatentVariableModel):
    """SA-VAE: amortized Gaussian encoder + per-example gradient refinement (see the module docstring).

    Args:
      encoder: a `GaussianEncoder` (its Gaussian is `lambda_0`).
      decoder: a layer mapping `z [..., D]` to an image distribution (e.g. `BernoulliDecoder`).
      refine_steps: K >= 0 refinement steps (0 is a plain VAE).
      refine_lr: step size of the refinement (gradient *ascent* on each example's ELBO).
      refine_momentum: heavy-ball momentum in [0, 1) (0: plain SGD).
      refine_clip_norm: per-example clip of the refinement gradient's norm (0: no clipping).
      encoder_objective: "unrolled" (default, Kim et al.: backprop through the refinement) or "amortized".

    Differences from `RecursiveMixtureVAE` worth knowing when comparing: the ELBO uses the closed-form
    Gaussian KL (TFP) with a Monte Carlo reconstruction term, as Kim et al. do, and the training noise is
    stateful (`tf.random.normal`), so SA-VAE runs are seeded but a resumed run does not repeat the same noise.
      num_samples: reparameterised samples for the ELBO of the training loss.

    Metrics: `loss` (= -refined ELBO), `elbo` (refined), `amortized_elbo`, `refinement_gain`,
    `reconstruction`, `kl`.
    """

    encoder_type = GaussianEncoder
    weights_layout = GAUSSIAN_LAYOUT

    def __init__(
        self,
        encoder: GaussianEncoder,
        decoder: keras.layers.Layer,
        refine_steps: int = DEFAULTS.refine_steps,
        refine_lr: float = DEFAULTS.refine_lr,
        refine_momentum: float = DEFAULTS.refine_momentum,
        refine_clip_norm: float = 5.0,
        encoder_objective: str = DEFAULTS.refine_encoder_objective,
        num_samples: int = 1,
        **kwargs,
    ):
        super().__init__(encoder, decoder, **kwargs)
        if int(refine_steps) < 0 or refine_lr < 0 or not 0 <= refine_momentum < 1 or refine_clip_norm < 0:
            raise ValueError(
                "Need refine_steps >= 0, refine_lr >= 0, 0 <= refine_momentum < 1 and refine_clip_norm >= 0; "
                f"got {refine_steps}, {refine_lr}, {refine_momentum}, {refine_clip_norm}."
            )
        if encoder_objective not in ENCODER_OBJECTIVES:
            raise ValueError(
                f"encoder_objective must be one of {ENCODER_OBJECTIVES}; got {encoder_objective!r}.")
        if int(num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1; got {num_samples}.")
        self.refine_steps = int(refine_steps)
        self.refine_lr = float(refine_lr)
        self.refine_momentum = float(refine_momentum)
        self.refine_clip_norm = float(refine_clip_norm)
        self.encoder_objective = encoder_objective
        self.num_samples = int(num_samples)
        self._trackers = {
            name: keras.metrics.Mean(name=name)
            for name in ("loss", "elbo", "amortized_elbo", "refinement_gain", "reconstruction", "kl")
        }

    # ------------------------------------------------------------------ variational parameters
    def amortized_parameters(self, x):
        """`x [B, ...]` -> `(loc [B, D], log_scale [B, D])` of the amortized encoder (lambda_0)."""
        x = tf.cast(x, tf.float32)
        self.ensure_built(x.shape)
        loc, scale = self.encoder.compute_parameters(x)
        return loc, tf.math.log(scale)

    def per_example_elbo(self, x, loc, log_scale, num_samples: int = 1, return_terms: bool = False):
        """`[B]` single-Gaussian ELBO of each example at `(loc, log_scale) [B, D]` (closed-form KL)."""
        noise = tf.random.normal(tf.concat([[num_samples], tf.shape(loc)], 0))
        z = loc + tf.exp(log_scale) * noise  # [S, B, D]
        reconstruction = tf.reduce_mean(self.decoder(z).log_prob(x[None]), axis=0)
        kl = tf.reduce_sum(
            tfd.kl_divergence(tfd.Normal(loc, tf.exp(log_scale)), tfd.Normal(0.0, 1.0)), axis=-1)
        if return_terms:
            return reconstruction - kl, reconstruction, kl
        return reconstruction - kl

    def _refine_from(self, x, loc, log_scale, steps):
        """Runs `steps` ascent steps from `(loc, log_scale)`; differentiable under an outer tape."""
        velocity_loc = tf.zeros_like(loc)
        velocity_scale = tf.zeros_like(log_scale)
        for _ in range(steps):
            with tf.GradientTape() as tape:
                tape.watch([loc, log_scale])
                total = tf.reduce_sum(self.per_example_elbo(x, loc, log_scale))  # examples are independent
            grad_loc, grad_scale = tape.gradient(total, [loc, log_scale])
            if self.refine_clip_norm > 0:
                norm = tf.sqrt(
                    tf.reduce_sum(tf.square(grad_loc), -1, keepdims=True)
                    + tf.reduce_sum(tf.square(grad_scale), -1, keepdims=True) + 1e-12
                )
                factor = tf.minimum(1.0, self.refine_clip_norm / norm)
                grad_loc, grad_scale = grad_loc * factor, grad_scale * factor
            velocity_loc = self.refine_momentum * velocity_loc + grad_loc
            velocity_scale = self.refine_momentum * velocity_scale + grad_scale
            loc = loc + self.refine_lr * velocity_loc
            log_scale = log_scale + self.refine_lr * velocity_scale
        return loc, log_scale

    def refine(self, x, steps: int | None = None):
        """`x [B, ...]` -> refined `(loc [B, D], log_scale [B, D])` after `steps` (default: `refine_steps`).

        Gradients do not flow back into the encoder (inference use); training uses the unrolled form itself.
        """
        x = tf.cast(x, tf.float32)
        loc, log_scale = self.amortized_parameters(x)
        loc, log_scale = tf.stop_gradient(loc), tf.stop_gradient(log_scale)
        steps = self.refine_steps if steps is None else int(steps)
        loc, log_scale = self._refine_from(x, loc, log_scale, steps)
        return tf.stop_gradient(loc), tf.stop_gradient(log_scale)

    def variational_parameters(self, x):
        """Test-time inference (what a served model computes): the refined `(loc, scale)`, `[B, D]` each."""
        loc, log_scale = self.refine(x)
        return loc, tf.exp(log_scale)

    def posterior(self, x) -> tfd.Distribution:
        """Refined `q(z | x)`: `Independent(Normal)`, batch `[B]`, event `[D]`."""
        loc, scale = self.variational_parameters(x)
        return tfd.Independent(tfd.Normal(loc, scale), reinterpreted_batch_ndims=1)

    def posterior_mean(self, x) -> tf.Tensor:
        return self.refine(x)[0]

    # ------------------------------------------------------------------ evaluation API
    def elbo(self, x, num_samples: int = 1) -> tf.Tensor:
        """`[B]` ELBO at the refined parameters."""
        x = self._unpack(x)
        loc, log_scale = self.refine(x)
        return self.per_example_elbo(x, loc, log_scale, num_samples)

    def amortized_elbo(self, x, num_samples: int = 1) -> tf.Tensor:
        """`[B]` ELBO at the amortized parameters (no refinement)."""
        x = self._unpack(x)
        loc, log_scale = self.amortized_parameters(x)
        return self.per_example_elbo(x, loc, log_scale, num_samples)

    def proposal(self, x) -> tfd.Distribution:
        """Importance proposal of `log_likelihood`: the refined Gaussian (refined once, then K samples)."""
        return self.posterior(x)

    # ------------------------------------------------------------------ training
    def _update_metrics(self, elbo, amortized, reconstruction, kl):
        values = dict(
            loss=-elbo, elbo=elbo, amortized_elbo=amortized, refinement_gain=elbo - amortized,
            reconstruction=reconstruction, kl=kl,
        )
        for name, value in values.items():
            self._trackers[name].update_state(value)
        return {name: tracker.result() for name, tracker in self._trackers.items()}

    def train_step(self, data):
        x = self._unpack(data)
        global_batch = tf.cast(replica_batch_layout(tf.shape(x)[0])[1], tf.float32)
        unrolled = self.encoder_objective == "unrolled"
        with tf.GradientTape(persistent=True) as tape:
            loc0, log_scale0 = self.amortized_parameters(x)
            amortized = self.per_example_elbo(x, loc0, log_scale0, self.num_samples)
            start = (loc0, log_scale0) if unrolled else (tf.stop_gradient(loc0), tf.stop_gradient(log_scale0))
            loc, log_scale = self._refine_from(x, *start, self.refine_steps)
            # The decoder's partial gradient: lambda_K held fixed.
            refined, reconstruction, kl = self.per_example_elbo(
                x, tf.stop_gradient(loc), tf.stop_gradient(log_scale), self.num_samples, return_terms=True
            )
            decoder_loss = self.optimizer.scale_loss(-tf.reduce_sum(refined) / global_batch)
            if unrolled:
                encoder_elbo = self.per_example_elbo(x, loc, log_scale, self.num_samples)
            else:
                encoder_elbo = amortized
            encoder_loss = self.optimizer.scale_loss(-tf.reduce_sum(encoder_elbo) / global_batch)
        decoder_vars = self.decoder.trainable_variables
        encoder_vars = self.encoder.trainable_variables
        gradients = tape.gradient(decoder_loss, decoder_vars) + tape.gradient(encoder_loss, encoder_vars)
        del tape
        gradients = [
            tf.zeros_like(v) if g is None else g for g, v in zip(gradients, decoder_vars + encoder_vars)]
        self.optimizer.apply_gradients(zip(gradients, decoder_vars + encoder_vars))
        return self._update_metrics(refined, amortized, reconstruction, kl)

    def test_step(self, data):
        x = self._unpack(data)
        loc0, log_scale0 = self.amortized_parameters(x)
        amortized = self.per_example_elbo(x, loc0, log_scale0, self.num_samples)
        loc, log_scale = self.refine(x)
        refined, reconstruction, kl = self.per_example_elbo(
            x, loc, log_scale, self.num_samples, return_terms=True)
        return self._update_metrics(refined, amortized, reconstruction, kl)

    # ------------------------------------------------------------------ serialization
    def get_config(self):
        config = super().get_config()
        config.update(
            refine_steps=self.refine_steps,
            refine_lr=self.refine_lr,
            refine_momentum=self.refine_momentum,
            refine_clip_norm=self.refine_clip_norm,
            encoder_objective=self.encoder_objective,
            num_samples=self.num_samples,
        )
        return config
