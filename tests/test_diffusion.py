"""Tests for the diffusion package: likelihood helpers, schedule, losses and samplers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.distributions import Normal, kl_divergence

from pixart_lightning.diffusion import (
    approx_standard_normal_cdf,
    create_diffusion,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
    sample,
)
from pixart_lightning.diffusion.sampling import dpm_solver_scheduler, guided_model_fn

LN2 = math.log(2.0)


def reference_schedule() -> dict[str, np.ndarray]:
    """Independent float64 re-derivation of the linear schedule and posterior terms."""
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    ac = np.cumprod(1.0 - betas)
    ac_prev = np.concatenate([[1.0], ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    return {
        "betas": betas,
        "ac": ac,
        "coef_x0": np.sqrt(ac_prev) * betas / (1.0 - ac),
        "coef_xt": np.sqrt(1.0 - betas) * (1.0 - ac_prev) / (1.0 - ac),
        "log_post_var": np.log(np.concatenate([[post_var[1]], post_var[1:]])),
    }


def quantised_images(*shape: int, generator: torch.Generator) -> Tensor:
    """Random 8-bit images mapped to [-1, 1], with both extremes present."""
    x = torch.randint(0, 256, shape, generator=generator).double() / 127.5 - 1.0
    x.view(-1)[:2] = torch.tensor([-1.0, 1.0], dtype=x.dtype)
    return x


class FixedOutput(nn.Module):
    """Model returning learnable ε and v tensors regardless of input; records its timesteps."""

    def __init__(self, eps: Tensor, v: Tensor) -> None:
        super().__init__()
        self.eps = nn.Parameter(eps.clone())
        self.v = nn.Parameter(v.clone())
        self.seen_t: Tensor | None = None

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        self.seen_t = t
        return torch.cat([self.eps, self.v], dim=1)


class OracleEps(nn.Module):
    """Predicts the exact ε (or v) that maps x_t back to a known x0; ignores conditioning."""

    def __init__(self, x0: Tensor, learn_sigma: bool = True, prediction: str = "epsilon") -> None:
        super().__init__()
        self.x0 = x0
        self.learn_sigma = learn_sigma
        self.prediction = prediction
        self.ac = torch.from_numpy(reference_schedule()["ac"])
        self.calls: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def forward(self, x: Tensor, t: Tensor, force_drop_ids: Tensor | None = None, **_: object) -> Tensor:
        self.calls.append((t.dtype, tuple(t.shape)))
        ac = self.ac[t].to(x.dtype).view(-1, 1, 1, 1)
        x0 = self.x0.repeat(x.shape[0] // self.x0.shape[0], 1, 1, 1)  # CFG doubles the batch
        eps = (x - ac.sqrt() * x0) / (1.0 - ac).sqrt()
        if self.prediction == "v":
            eps = ac.sqrt() * eps - (1.0 - ac).sqrt() * x0
        return torch.cat([eps, torch.zeros_like(eps)], 1) if self.learn_sigma else eps


# --------------------------------------------------------------------------- losses


def test_normal_kl_matches_torch_distributions() -> None:
    """normal_kl agrees with the closed-form KL from torch.distributions."""
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = torch.randn(4, 64, generator=g, dtype=torch.float64)
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)
    assert torch.all(normal_kl(m1, lv1, m1, lv1) == 0)


def test_normal_kl_accepts_python_scalars() -> None:
    """Scalar log-variances broadcast against tensor means."""
    m = torch.tensor([0.0, 1.0], dtype=torch.float64)
    expected = torch.tensor([0.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(normal_kl(m, 0.0, 0.0, 0.0), expected)


def test_discretized_log_likelihood_matches_direct_computation() -> None:
    """Bin probabilities equal Φ differences (edge bins open-ended), exact with the tanh cdf."""
    g = torch.Generator().manual_seed(1)
    x = quantised_images(4096, generator=g)
    means = x + 0.05 * torch.randn(x.shape, generator=g, dtype=torch.float64)
    log_scales = torch.empty_like(x).uniform_(math.log(0.01), math.log(0.3), generator=g)
    sigma = log_scales.exp()
    got = discretized_gaussian_log_likelihood(x, means, log_scales)

    def reference(cdf) -> Tensor:
        upper = cdf((x + 1 / 255 - means) / sigma)
        lower = cdf((x - 1 / 255 - means) / sigma)
        prob = torch.where(x == -1, upper, torch.where(x == 1, 1 - lower, upper - lower))
        return prob.clamp(min=1e-12).log()

    torch.testing.assert_close(got, reference(approx_standard_normal_cdf), rtol=0, atol=1e-10)
    exact = reference(Normal(0.0, 1.0).cdf)
    assert torch.allclose(got.exp(), exact.exp(), rtol=0, atol=5e-4)


def test_discretized_log_likelihood_edge_bins_integrate_to_infinity() -> None:
    """An extreme value far outside the mean still gets all the tail mass of its edge bin."""
    x = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    means = torch.tensor([-5.0, 5.0], dtype=torch.float64)
    got = discretized_gaussian_log_likelihood(x, means, torch.zeros(2, dtype=torch.float64))
    torch.testing.assert_close(got, torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-4)


def test_mean_flat_keeps_batch_dimension() -> None:
    """mean_flat averages every non-batch dimension, including for 1-D input."""
    t = torch.arange(24.0).reshape(2, 3, 4)
    torch.testing.assert_close(mean_flat(t), torch.tensor([5.5, 17.5]))
    torch.testing.assert_close(mean_flat(torch.tensor([1.0, 2.0])), torch.tensor([1.0, 2.0]))


# --------------------------------------------------------------------------- schedule


def test_linear_schedule_endpoints() -> None:
    """The full schedule is 1000 linear betas from 1e-4 to 0.02 with an identity timestep map."""
    d = create_diffusion()
    assert d.num_timesteps == 1000 and len(d.betas) == 1000
    assert d.betas.dtype == np.float64
    assert d.betas[0] == 1e-4 and d.betas[-1] == 0.02
    assert torch.equal(d.timestep_map, torch.arange(1000))


@pytest.mark.parametrize("respacing", [100, "100"])
def test_respaced_schedule_preserves_alphas_cumprod(respacing: int | str) -> None:
    """Respacing to 100 steps keeps ᾱ at the mapped timesteps, which span 0..999."""
    full, short = create_diffusion(), create_diffusion(respacing)
    assert short.num_timesteps == 100 and len(short.betas) == 100
    tmap = short.timestep_map
    assert tmap.dtype == torch.long and tmap[0] == 0 and tmap[-1] == 999
    assert torch.all(tmap[1:] > tmap[:-1])
    np.testing.assert_allclose(short.alphas_cumprod, full.alphas_cumprod[tmap.numpy()], rtol=1e-12)
    assert short.betas[5] > full.betas[tmap[5]]


def test_q_sample_statistics() -> None:
    """q_sample has mean sqrt(ᾱ)·x0 and standard deviation sqrt(1 − ᾱ)."""
    d, ac = create_diffusion(), reference_schedule()["ac"]
    g = torch.Generator().manual_seed(2)
    x0 = torch.full((200_000, 1, 1, 1), 0.5, dtype=torch.float64)
    t = torch.full((x0.shape[0],), 300, dtype=torch.long)
    xt = d.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    assert abs(xt.mean().item() - math.sqrt(ac[300]) * 0.5) < 5e-3
    assert abs(xt.std().item() - math.sqrt(1 - ac[300])) < 5e-3


def test_posterior_mean_and_variance_known_value() -> None:
    """q(x_{t-1} | x_t, x0) at t=1 matches the closed form evaluated by hand."""
    d = create_diffusion()
    b0, b1 = 1e-4, 1e-4 + (0.02 - 1e-4) / 999
    ac0, ac1 = 1 - b0, (1 - b0) * (1 - b1)
    x0, xt = torch.ones(1, 1, 1, 1, dtype=torch.float64), torch.full((1, 1, 1, 1), 0.5, dtype=torch.float64)
    mean, var, log_var = d.q_posterior_mean_variance(x0, xt, torch.tensor([1]))
    expected_mean = math.sqrt(ac0) * b1 / (1 - ac1) * 1.0 + math.sqrt(1 - b1) * (1 - ac0) / (1 - ac1) * 0.5
    expected_var = b1 * (1 - ac0) / (1 - ac1)
    assert mean.item() == pytest.approx(expected_mean, rel=1e-12)
    assert var.item() == pytest.approx(expected_var, rel=1e-12)
    assert log_var.item() == pytest.approx(math.log(expected_var), rel=1e-12)


def test_tables_are_cast_to_input_dtype() -> None:
    """Gathered schedule values follow the input dtype (float32 in, float32 out)."""
    d = create_diffusion()
    x0 = torch.randn(2, 4, 3, 5)
    out = d.p_mean_variance(torch.randn(2, 8, 3, 5), d.q_sample(x0, torch.tensor([0, 10])), torch.tensor([0, 10]))
    assert all(v.dtype == torch.float32 for v in out.values())


def test_the_schedule_moves_to_a_device_once_not_per_loss() -> None:
    """After the first use on a device, losses and ancestral steps make no tensor from host memory (on a GPU,
    each would be a blocking copy from the host); the gathered values are the float64 tables'."""
    from tests.test_performance import SyncCounter

    d = create_diffusion(10)
    x0, t = torch.randn(2, 4, 2, 2, dtype=torch.float64), torch.tensor([0, 9])
    model = FixedOutput(torch.randn_like(x0), torch.zeros_like(x0))
    d.training_losses(model, x0, t)
    with SyncCounter() as seen:
        d.training_losses(model, x0, t)
        d.p_sample(lambda x, t_model: torch.cat([x, x], dim=1), x0, 5)
        gathered = d.q_sample(torch.ones_like(x0), t, torch.zeros_like(x0))[:, 0, 0, 0]
    assert seen.host_data == [] and seen.ops == [], (seen.host_data, seen.ops)
    assert torch.equal(gathered, torch.from_numpy(d.sqrt_alphas_cumprod[[0, 9]]))


# --------------------------------------------------------------------------- training losses


def _loss_setup(t_value: int, eps_offset: float, seed: int = 3):
    """Diffusion, data, noise and a FixedOutput model for a non-square latent batch at step t."""
    g = torch.Generator().manual_seed(seed)
    b, c, h, w = 2, 3, 4, 6
    x0 = quantised_images(b, c, h, w, generator=g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    v = torch.empty_like(x0).uniform_(-1, 1, generator=g)
    model = FixedOutput(noise + eps_offset * torch.randn(x0.shape, generator=g, dtype=torch.float64), v)
    t = torch.full((b,), t_value, dtype=torch.long)
    return create_diffusion(), x0, noise, v, model, t


@pytest.mark.parametrize("t_value", [1, 500, 999])
def test_vb_at_positive_t_is_posterior_kl_in_bits(t_value: int) -> None:
    """With ε = true noise, mse is 0 and vb is KL(q‖p)/ln2 evaluated from the schedule by hand."""
    d, x0, noise, v, model, t = _loss_setup(t_value, eps_offset=0.0)
    losses = d.training_losses(model, x0, t, noise=noise)
    assert losses["mse"].shape == losses["vb"].shape == losses["loss"].shape == (2,)
    assert torch.all(losses["mse"] == 0)

    s = reference_schedule()
    ac, beta = s["ac"][t_value], s["betas"][t_value]
    xt = math.sqrt(ac) * x0 + math.sqrt(1 - ac) * noise
    q_mean = s["coef_x0"][t_value] * x0 + s["coef_xt"][t_value] * xt
    frac = (v + 1) / 2
    p_log_var = frac * math.log(beta) + (1 - frac) * s["log_post_var"][t_value]
    kl = 0.5 * (p_log_var - s["log_post_var"][t_value] - 1 + math.exp(s["log_post_var"][t_value]) / p_log_var.exp())
    expected = kl.flatten(1).mean(1) / LN2
    torch.testing.assert_close(losses["vb"], expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(losses["loss"], losses["mse"] + losses["vb"])
    assert torch.allclose(q_mean, d.q_posterior_mean_variance(x0, xt, t)[0])


def test_vb_with_wrong_eps_includes_mean_term() -> None:
    """With a wrong ε the KL also contains the mean mismatch from the implied x0."""
    d, x0, noise, v, model, t = _loss_setup(200, eps_offset=0.3)
    losses = d.training_losses(model, x0, t, noise=noise)
    s = reference_schedule()
    ac = s["ac"][200]
    xt = math.sqrt(ac) * x0 + math.sqrt(1 - ac) * noise
    pred_x0 = (xt - math.sqrt(1 - ac) * model.eps.detach()) / math.sqrt(ac)
    q_mean = s["coef_x0"][200] * x0 + s["coef_xt"][200] * xt
    p_mean = s["coef_x0"][200] * pred_x0 + s["coef_xt"][200] * xt
    frac = (v + 1) / 2
    p_log_var = frac * math.log(s["betas"][200]) + (1 - frac) * s["log_post_var"][200]
    expected = normal_kl(q_mean, s["log_post_var"][200], p_mean, p_log_var).flatten(1).mean(1) / LN2
    torch.testing.assert_close(losses["vb"], expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(losses["mse"], ((noise - model.eps.detach()) ** 2).flatten(1).mean(1))


def test_vb_at_t0_is_decoder_nll_in_bits() -> None:
    """At t=0 vb is the discretized-Gaussian NLL of x0 under p(x0|x1), in bits."""
    d, x0, noise, v, model, t = _loss_setup(0, eps_offset=0.2)
    losses = d.training_losses(model, x0, t, noise=noise)
    s = reference_schedule()
    ac = s["ac"][0]
    xt = math.sqrt(ac) * x0 + math.sqrt(1 - ac) * noise
    mean = (xt - math.sqrt(1 - ac) * model.eps.detach()) / math.sqrt(ac)  # posterior mean = pred x0 at t=0
    frac = (v + 1) / 2
    log_var = frac * math.log(s["betas"][0]) + (1 - frac) * s["log_post_var"][0]
    nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).flatten(1).mean(1) / LN2
    torch.testing.assert_close(losses["vb"], nll, rtol=1e-6, atol=1e-9)
    assert torch.all(losses["vb"] > 0)


def test_vb_gradient_only_reaches_variance_channels() -> None:
    """Backprop of vb leaves ε untouched but trains v; mse trains ε."""
    d, x0, noise, _, model, t = _loss_setup(0, eps_offset=0.2)
    t = torch.tensor([0, 400])
    d.training_losses(model, x0, t, noise=noise)["vb"].sum().backward()
    assert model.eps.grad is None or torch.all(model.eps.grad == 0)
    assert model.v.grad is not None and model.v.grad.abs().sum() > 0
    model.zero_grad()
    d.training_losses(model, x0, t, noise=noise)["mse"].sum().backward()
    assert model.eps.grad.abs().sum() > 0


def test_fixed_variance_returns_only_mse() -> None:
    """learn_sigma=False: the model outputs C channels and the loss is the plain ε-MSE."""
    d = create_diffusion(learn_sigma=False)
    x0, noise = torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5)
    losses = d.training_losses(lambda x, t: torch.zeros_like(x), x0, torch.tensor([3, 700]), noise=noise)
    assert set(losses) == {"mse", "loss"}
    torch.testing.assert_close(losses["loss"], (noise**2).flatten(1).mean(1))


def test_model_gets_original_long_timesteps_and_kwargs() -> None:
    """A respaced diffusion calls the model with original integer timesteps and forwards kwargs."""
    d = create_diffusion(10)
    seen = {}

    def model(x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        seen.update(t=t, y=y)
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    y = torch.tensor([7, 8])
    d.training_losses(model, torch.zeros(2, 4, 2, 2), torch.tensor([0, 9]), model_kwargs={"y": y})
    assert seen["t"].dtype == torch.long and seen["t"].shape == (2,)
    assert seen["t"].tolist() == [0, 999] and seen["y"] is y


# --------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize(("sampler", "steps", "tol"), [("dpm++", 20, 1e-3), ("ancestral", 50, 1e-3)])
def test_samplers_recover_x0_from_oracle(sampler: str, steps: int, tol: float, prediction: str) -> None:
    """Given the exact ε (or v) for a known x0, both samplers land on x0 (guidance path included)."""
    x0 = torch.rand(2, 4, 6, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    model = OracleEps(x0, prediction=prediction)
    out = sample(
        model,
        x0.shape,
        {"y": torch.tensor([1, 2])},
        sampler=sampler,
        steps=steps,
        generator=torch.Generator().manual_seed(5),
        prediction=prediction,
    )
    assert out.shape == x0.shape
    assert (out - x0).abs().max() < tol
    assert len(model.calls) == steps
    assert all(dtype == torch.long and shape == (4,) for dtype, shape in model.calls)


def test_ancestral_with_fixed_variance() -> None:
    """Ancestral sampling works with C-channel models when learn_sigma=False."""
    x0 = torch.rand(1, 4, 4, 4, generator=torch.Generator().manual_seed(6)) * 2 - 1
    out = sample(
        OracleEps(x0, learn_sigma=False),
        x0.shape,
        None,
        sampler="ancestral",
        steps=25,
        cfg_scale=1.0,
        learn_sigma=False,
        generator=torch.Generator().manual_seed(7),
    )
    assert (out - x0).abs().max() < 0.1


def test_cfg_combines_eps_and_takes_cond_variance() -> None:
    """Guided ε = ε_u + s(ε_c − ε_u) on all channels; v comes from the conditional half."""
    calls = []

    def model(x: Tensor, t: Tensor, y: Tensor, mask: Tensor, force_drop_ids: Tensor) -> Tensor:
        calls.append((x.shape[0], t.clone(), y.clone(), force_drop_ids.clone()))
        keep = (force_drop_ids == 0).view(-1, 1, 1, 1).to(x.dtype)
        eps = keep.expand_as(x)  # ε_c = 1, ε_u = 0
        v = 0.3 * keep.expand_as(x) - 0.7 * (1 - keep.expand_as(x))
        return torch.cat([eps, v], 1)

    y = torch.tensor([5, 6, 7])
    fn = guided_model_fn(model, {"y": y, "mask": torch.ones(1)}, cfg_scale=4.5)
    out = fn(torch.randn(3, 4, 2, 2), torch.tensor([10, 20, 30]))
    assert torch.all(out[:, :4] == 4.5)
    torch.testing.assert_close(out[:, 4:], torch.full((3, 4, 2, 2), 0.3))
    batch, t, y2, drop = calls[0]
    assert batch == 6 and t.tolist() == [10, 20, 30] * 2 and y2.tolist() == [5, 6, 7] * 2
    assert drop.tolist() == [0, 0, 0, 1, 1, 1]


def test_cfg_scale_one_is_a_single_plain_forward() -> None:
    """cfg_scale == 1 calls the model once on the original batch without force_drop_ids."""
    seen = []

    def model(x: Tensor, t: Tensor, **kwargs: Tensor) -> Tensor:
        seen.append((x.shape[0], set(kwargs)))
        return torch.cat([x, x], 1)

    x = torch.randn(2, 4, 2, 2)
    out = guided_model_fn(model, {"y": torch.tensor([1, 2])}, cfg_scale=1.0)(x, torch.tensor([3, 3]))
    assert seen == [(2, {"y"})]
    assert torch.equal(out[:, :4], x)


@pytest.mark.parametrize("sampler", ["dpm++", "ancestral"])
def test_sampling_is_deterministic_per_seed(sampler: str) -> None:
    """The same generator seed reproduces samples exactly; another seed changes them."""

    def model(x: Tensor, t: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        return torch.cat([0.3 * x, torch.zeros_like(x)], 1)

    def run(seed: int) -> Tensor:
        return sample(model, (1, 4, 4, 4), {}, sampler=sampler, steps=10, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(0), run(0))
    assert not torch.allclose(run(0), run(1))


def test_unknown_sampler_lists_valid_names() -> None:
    """An unknown sampler name raises ValueError naming the valid choices."""
    with pytest.raises(ValueError) as info:
        sample(lambda x, t: x, (1, 4, 2, 2), None, sampler="euler")
    assert "dpm++" in str(info.value) and "ancestral" in str(info.value)


@pytest.mark.parametrize("sampler", ["dpm++", "ancestral"])
def test_unknown_prediction_is_refused_by_both_samplers(sampler: str) -> None:
    """An unknown prediction is a ValueError naming the choices, not a silent ε (DPM-Solver++ once took it as ε)."""
    with pytest.raises(ValueError, match="valid choices are epsilon, v"):
        sample(lambda x, t: x, (1, 4, 2, 2), None, sampler=sampler, prediction="x0")


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_dpm_solver_runs_on_the_training_schedule(prediction: str) -> None:
    """diffusers' scheduler behind DPM-Solver++ has the training diffusion's ᾱ and the model's prediction type."""
    scheduler = dpm_solver_scheduler(prediction)
    np.testing.assert_allclose(scheduler.alphas_cumprod.double().numpy(), create_diffusion().alphas_cumprod, rtol=1e-6)
    assert scheduler.config.prediction_type == {"epsilon": "epsilon", "v": "v_prediction"}[prediction]


# --------------------------------------------------------------------------- v-prediction


def test_v_target_and_x0_round_trip() -> None:
    """v = √ᾱ·ε − √(1−ᾱ)·x0, and predict_x0 inverts both parameterisations exactly."""
    eps_d, v_d = create_diffusion(), create_diffusion(prediction="v")
    g = torch.Generator().manual_seed(8)
    x0, noise = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 870])
    ac = torch.from_numpy(reference_schedule()["ac"])[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(v_d.target(x0, noise, t), ac.sqrt() * noise - (1 - ac).sqrt() * x0)
    assert eps_d.target(x0, noise, t) is noise
    xt = eps_d.q_sample(x0, t, noise)
    torch.testing.assert_close(v_d.predict_x0(v_d.target(x0, noise, t), xt, t), x0)
    torch.testing.assert_close(eps_d.predict_x0(noise, xt, t), x0)


def test_v_hybrid_loss_matches_epsilon_for_equivalent_predictions() -> None:
    """A v model and an ε model making the same implied x0 get the same VLB; the MSE uses each target."""
    eps_d, v_d = create_diffusion(), create_diffusion(prediction="v")
    g = torch.Generator().manual_seed(9)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t, var = torch.tensor([0, 400, 999]), torch.rand(3, 2, 4, 4, generator=g) * 2 - 1
    eps_hat = noise + 0.1 * torch.randn(3, 2, 4, 4, generator=g)
    xt = eps_d.q_sample(x0, t, noise)
    # The v that implies the same x0 as eps_hat at x_t.
    x0_hat = eps_d.predict_x0(eps_hat, xt, t)
    ac = torch.from_numpy(reference_schedule()["ac"]).float()[t].view(-1, 1, 1, 1)
    v_hat = (ac.sqrt() * xt - x0_hat) / (1 - ac).sqrt()
    out_eps = eps_d.training_losses(lambda x, s: torch.cat([eps_hat, var], 1), x0, t, noise=noise)
    out_v = v_d.training_losses(lambda x, s: torch.cat([v_hat, var], 1), x0, t, noise=noise)
    torch.testing.assert_close(out_v["vb"], out_eps["vb"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_v["mse"], ((v_d.target(x0, noise, t) - v_hat) ** 2).mean((1, 2, 3)))
    with pytest.raises(ValueError, match="valid choices"):
        create_diffusion(prediction="x0")


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_min_snr_weights_the_mse_as_an_x0_loss_capped_at_gamma(prediction: str) -> None:
    """Min-SNR-γ: the weighted MSE equals min(SNR, γ) x the x0 error the prediction implies; unweighted by default,
    and the VLB is left as it is."""
    plain, weighted = create_diffusion(prediction=prediction), create_diffusion(prediction=prediction, min_snr_gamma=5)
    g = torch.Generator().manual_seed(10)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([10, 300, 950])  # SNR far above, near and far below γ
    output = torch.randn(3, 4, 4, 4, generator=g)
    out_plain = plain.training_losses(lambda x, s: output, x0, t, noise=noise)
    out_weighted = weighted.training_losses(lambda x, s: output, x0, t, noise=noise)
    ac = torch.from_numpy(reference_schedule()["ac"]).float()[t]
    snr = ac / (1 - ac)
    x0_error = ((plain.predict_x0(output[:, :2], plain.q_sample(x0, t, noise), t) - x0) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(out_weighted["mse"], torch.minimum(snr, torch.tensor(5.0)) * x0_error, rtol=1e-4, atol=0)
    torch.testing.assert_close(out_weighted["vb"], out_plain["vb"])
    assert snr[0] > 5 > snr[2] and not torch.equal(out_weighted["mse"], out_plain["mse"])
    assert torch.equal(out_plain["mse"], ((plain.target(x0, noise, t) - output[:, :2]) ** 2).mean((1, 2, 3)))
