"""Gaussian diffusion with learned-range variance (IDDPM / PixArt-α recipe), predicting ε or v.

PixArt-α predicts ε. v = √ᾱ·ε − √(1−ᾱ)·x0 is offered because with the linear schedule an image's
colours are decided at high noise, where an ε target says little about x0: a tiny model trained for
minutes learns colour with v and hardly at all with ε (``docs/stages.md`` and the shared demo calibration). The
hybrid loss works with either; the variance channels and the VLB are the same. The schedule's numbers are
:mod:`pixart_lightning.diffusion.schedule`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from pixart_lightning.diffusion.losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from pixart_lightning.diffusion.schedule import NUM_TIMESTEPS, linear_betas, space_timesteps

# fn(x_t, t_model) -> raw model output; t_model holds the ORIGINAL integer timesteps.
ModelOutputFn = Callable[[Tensor, Tensor], Tensor]
Prediction = Literal["epsilon", "v"]
PREDICTIONS = ("epsilon", "v")
# The per-timestep float64 tables the losses and samplers gather from.
SCHEDULE_TABLES = (
    "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "log_betas",
    "mse_weights",
)


def check_prediction(prediction: str) -> Prediction:
    """``prediction`` if the diffusion knows it (``epsilon``, ``v``); a one-line ValueError otherwise."""
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction={prediction!r}: valid choices are {', '.join(PREDICTIONS)}")
    return prediction


def randn(
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Standard normal noise drawn from `generator` (on its own device) and moved to `device`."""
    draw_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=draw_device, dtype=dtype).to(device)


class GaussianDiffusion:
    """Forward process, posterior, model-parameterised reverse step and training losses."""

    def __init__(
        self,
        betas: np.ndarray,
        use_timesteps: Sequence[int] | None = None,
        learn_sigma: bool = True,
        prediction: Prediction = "epsilon",
        min_snr_gamma: float | None = None,
    ) -> None:
        check_prediction(prediction)
        betas = np.asarray(betas, dtype=np.float64)
        if use_timesteps is None:
            use_timesteps = list(range(len(betas)))
        else:
            use_timesteps = [int(t) for t in use_timesteps]
            betas = self._respaced_betas(betas, use_timesteps)

        self.learn_sigma = learn_sigma
        self.prediction = prediction
        self.min_snr_gamma = min_snr_gamma
        self.num_timesteps = len(betas)
        self.timestep_map = torch.tensor(use_timesteps, dtype=torch.long)

        alphas_cumprod = np.cumprod(1.0 - betas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)

        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.alphas_cumprod_prev = alphas_cumprod_prev
        self.sqrt_alphas_cumprod = np.sqrt(alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / alphas_cumprod - 1.0)
        self.posterior_variance = posterior_variance
        # β̃_0 is 0; borrow β̃_1 so the log stays finite (a one-step schedule has no β̃_1, use β).
        self.posterior_log_variance_clipped = np.log(
            np.append(posterior_variance[1], posterior_variance[1:]) if len(betas) > 1 else betas
        )
        self.posterior_mean_coef1 = betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod)
        self.log_betas = np.log(betas)
        self.mse_weights = self._mse_weights(alphas_cumprod, prediction, min_snr_gamma)
        self._device_tables: dict[torch.device, dict[str, Tensor]] = {}

    @staticmethod
    def _respaced_betas(betas: np.ndarray, use_timesteps: list[int]) -> np.ndarray:
        """Betas whose cumulative product matches the base ᾱ at the kept timesteps."""
        valid = use_timesteps == sorted(set(use_timesteps)) and set(use_timesteps) <= set(range(len(betas)))
        if not use_timesteps or not valid:
            raise ValueError("use_timesteps must be a sorted, non-empty subset of the base timesteps")
        kept = np.cumprod(1.0 - betas)[use_timesteps]
        return 1.0 - kept / np.append(1.0, kept[:-1])

    @staticmethod
    def _mse_weights(alphas_cumprod: np.ndarray, prediction: Prediction, gamma: float | None) -> np.ndarray:
        """The weight of each timestep's MSE: 1, or Min-SNR-γ (Hang et al. 2023), which weighs the loss as an x0 loss
        at min(SNR, γ), so the many nearly clean timesteps stop dominating the gradient: min(SNR, γ) / SNR on ε and
        min(SNR, γ) / (SNR + 1) on v (whose MSE is (SNR + 1) times the x0 one)."""
        if gamma is None:
            return np.ones_like(alphas_cumprod)
        snr = alphas_cumprod / (1.0 - alphas_cumprod)
        return np.minimum(snr, gamma) / (snr + 1.0 if prediction == "v" else snr)

    def _tables_on(self, device: torch.device) -> dict[str, Tensor]:
        """The schedule as float64 tensors on ``device`` (and the timestep map), copied there on first use.

        Copying a table from host memory on every gather would make each loss wait for a blocking
        host-to-device transfer on a GPU; one copy per device keeps the training step free of them.
        """
        if device not in self._device_tables:
            tables = {name: torch.from_numpy(getattr(self, name)).to(device) for name in SCHEDULE_TABLES}
            self._device_tables[device] = tables | {"timestep_map": self.timestep_map.to(device)}
        return self._device_tables[device]

    def _gather(self, table: str, t: Tensor, like: Tensor) -> Tensor:
        """Pick the named table's value at t per sample (on t's device), cast to like's dtype and shaped to
        broadcast against it."""
        values = self._tables_on(t.device)[table][t].to(like.dtype)
        return values.reshape(-1, *([1] * (like.ndim - 1)))

    def model_timesteps(self, t: Tensor) -> Tensor:
        """Map schedule indices to the original integer timesteps the model was trained on."""
        return self._tables_on(t.device)["timestep_map"][t]

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Draw x_t ~ q(x_t | x_0)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (
            self._gather("sqrt_alphas_cumprod", t, x0) * x0
            + self._gather("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def q_posterior_mean_variance(self, x0: Tensor, xt: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._gather("posterior_mean_coef1", t, xt) * x0 + self._gather("posterior_mean_coef2", t, xt) * xt
        variance = self._gather("posterior_variance", t, xt)
        log_variance = self._gather("posterior_log_variance_clipped", t, xt)
        return mean, variance, log_variance

    def p_mean_variance(
        self, model_output: Tensor, xt: Tensor, t: Tensor, clip_denoised: bool = False
    ) -> dict[str, Tensor]:
        """Turn a raw model output into the Gaussian p(x_{t-1} | x_t) and the implied x_0."""
        channels = xt.shape[1]
        if self.learn_sigma:
            frac = (model_output[:, channels:] + 1.0) / 2.0
            min_log = self._gather("posterior_log_variance_clipped", t, xt)
            max_log = self._gather("log_betas", t, xt)
            log_variance = frac * max_log + (1.0 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            variance = self._gather("posterior_variance", t, xt).expand_as(xt)
            log_variance = self._gather("posterior_log_variance_clipped", t, xt).expand_as(xt)

        pred_x0 = self.predict_x0(model_output[:, :channels], xt, t)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x0, xt, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_x0": pred_x0}

    def predict_x0(self, prediction: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """x0 implied by the model's ε or v prediction at x_t."""
        if self.prediction == "v":
            return (
                self._gather("sqrt_alphas_cumprod", t, xt) * xt
                - self._gather("sqrt_one_minus_alphas_cumprod", t, xt) * prediction
            )
        return (
            self._gather("sqrt_recip_alphas_cumprod", t, xt) * xt
            - self._gather("sqrt_recipm1_alphas_cumprod", t, xt) * prediction
        )

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the mean channels are trained to predict: ε, or v = √ᾱ·ε − √(1−ᾱ)·x0."""
        if self.prediction == "v":
            return (
                self._gather("sqrt_alphas_cumprod", t, x0) * noise
                - self._gather("sqrt_one_minus_alphas_cumprod", t, x0) * x0
            )
        return noise

    def _vb_bits(self, model_output: Tensor, x0: Tensor, xt: Tensor, t: Tensor, weight: Tensor | None = None) -> Tensor:
        """Per-sample variational-bound term L_t in bits (averaged with ``weight`` over the pixels, when given)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, xt, t)
        pred = self.p_mean_variance(model_output, xt, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, pred["mean"], pred["log_variance"]), weight)
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(x0, pred["mean"], 0.5 * pred["log_variance"]), weight)
        return torch.where(t == 0, decoder_nll, kl) / math.log(2.0)

    def training_losses(
        self,
        model: Callable[..., Tensor],
        x0: Tensor,
        t: Tensor,
        model_kwargs: dict | None = None,
        noise: Tensor | None = None,
        loss_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample losses: MSE on ε (or v), plus the VLB (bits) on the variance channels if learned; with
        ``loss_mask`` (B, 1, H, W), averaged over the pixels it marks (patch masking) instead of all."""
        if noise is None:
            noise = torch.randn_like(x0)
        xt = self.q_sample(x0, t, noise)
        output = model(xt, self.model_timesteps(t), **(model_kwargs or {}))

        channels = x0.shape[1]
        mean_hat = output[:, :channels]
        mse = mean_flat((self.target(x0, noise, t) - mean_hat) ** 2, loss_mask)
        if self.min_snr_gamma is not None:
            mse = mse * self._gather("mse_weights", t, mse)
        if not self.learn_sigma:
            return {"mse": mse, "loss": mse}

        # Detaching the mean prediction means the VLB only shapes the variance channels.
        frozen_output = torch.cat([mean_hat.detach(), output[:, channels:]], dim=1)
        vb = self._vb_bits(frozen_output, x0, xt, t, loss_mask)
        return {"mse": mse, "vb": vb, "loss": mse + vb}

    def p_sample(
        self,
        model_output_fn: ModelOutputFn,
        x: Tensor,
        t_index: int,
        generator: torch.Generator | None = None,
        clip_denoised: bool = False,
    ) -> Tensor:
        """One ancestral step x_t -> x_{t-1}; noiseless at the final step."""
        t = torch.full((x.shape[0],), t_index, dtype=torch.long, device=x.device)
        out = self.p_mean_variance(model_output_fn(x, self.model_timesteps(t)), x, t, clip_denoised)
        if t_index == 0:
            return out["mean"]
        noise = randn(x.shape, generator, x.device, x.dtype)
        return out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise

    @torch.no_grad()
    def p_sample_loop(
        self,
        model_output_fn: ModelOutputFn,
        shape: Sequence[int],
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        clip_denoised: bool = False,
    ) -> Tensor:
        """Ancestral sampling from pure noise down to x_0."""
        x = randn(shape, generator, device)
        for i in tqdm(range(self.num_timesteps - 1, -1, -1), disable=not progress):
            x = self.p_sample(model_output_fn, x, i, generator, clip_denoised)
        return x


def create_diffusion(
    timestep_respacing: str | int | None = None,
    num_timesteps: int = NUM_TIMESTEPS,
    learn_sigma: bool = True,
    prediction: Prediction = "epsilon",
    min_snr_gamma: float | None = None,
) -> GaussianDiffusion:
    """Build the PixArt-α diffusion, optionally respaced to fewer evenly spaced steps, its MSE optionally
    Min-SNR-γ weighted."""
    if timestep_respacing is None or timestep_respacing == "":
        use_timesteps = None
    else:
        use_timesteps = space_timesteps(num_timesteps, int(timestep_respacing))
    return GaussianDiffusion(
        linear_betas(num_timesteps), use_timesteps=use_timesteps, learn_sigma=learn_sigma, prediction=prediction,
        min_snr_gamma=min_snr_gamma,
    )
