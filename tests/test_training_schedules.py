"""What a stage schedules over steps and timesteps: the learning rate (linear warm-up, then constant as the paper or a
cosine to zero at the stage's end) and the training timesteps (uniform as the paper, or logit-normal)."""

import math

import pytest
import torch

from pixart_lightning.config import ConfigError, load_stage
from pixart_lightning.training.draws import Slot, StepDraws
from pixart_lightning.training.optim import build_optimizer, lr_factor
from tests.test_stages import DEMO


def test_warmup_then_constant_or_cosine() -> None:
    for schedule in ("constant", "cosine"):
        factors = [lr_factor(s, warmup=10, total=100, schedule=schedule) for s in range(100)]
        assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    constant = [lr_factor(s, warmup=10, total=100, schedule="constant") for s in range(100)]
    cosine = [lr_factor(s, warmup=10, total=100, schedule="cosine") for s in range(100)]
    assert constant[10:] == [1.0] * 90
    assert cosine[9] == 1.0 and all(a > b for a, b in zip(cosine[9:], cosine[10:]))  # strictly down after the peak
    assert cosine[54] == pytest.approx(0.5 * (1 + math.cos(math.pi * 45 / 91)))
    assert 0 < cosine[-1] < 1e-3  # the last step still moves, barely


def test_the_optimizer_follows_the_configured_schedule(tmp_path) -> None:
    cfg = load_stage(DEMO, 2, [f"out_dir={tmp_path}", "optim.lr_schedule=cosine", "optim.warmup_steps=2",
                               "train.max_steps=6"])
    model = torch.nn.Linear(2, 2)
    built = build_optimizer(model.parameters(), cfg)
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    peak = cfg.optim.lr
    assert rates[:2] == pytest.approx([peak / 2, peak]) and rates[2] < peak and rates[5] < rates[4] < rates[3]


def test_unknown_schedule_and_bad_gamma_fail_at_start(tmp_path) -> None:
    with pytest.raises(ConfigError, match="lr_schedule.*constant.*cosine"):
        load_stage(DEMO, 2, [f"out_dir={tmp_path}", "optim.lr_schedule=linear"])
    with pytest.raises(ConfigError, match="min_snr_gamma=0.0: must be a positive number"):
        load_stage(DEMO, 2, [f"out_dir={tmp_path}", "diffusion.min_snr_gamma=0"])


def test_logit_normal_timesteps_lean_where_asked_and_leave_uniform_draws_as_they_were() -> None:
    draws = StepDraws(seed=0, step=3, slot=Slot(), device=torch.device("cpu"))
    uniform = draws.diffusion((4096, 3, 2, 2), 1000, 0.1)
    again = StepDraws(0, 3, Slot(), torch.device("cpu")).diffusion((4096, 3, 2, 2), 1000, 0.1)
    assert all(torch.equal(uniform[k], again[k]) for k in uniform)  # a function of (seed, step) only
    gen = torch.Generator().manual_seed(hash((0, 3, 0)) % (2**63))  # the stream the uniform draws come from
    assert torch.equal(uniform["t"], torch.randint(0, 1000, (4096,), generator=gen))
    leaning = draws.diffusion((4096, 3, 2, 2), 1000, 0.1, logit_normal=(1.0, 1.0))
    t = leaning["t"].float()
    assert 0 <= t.min() and t.max() <= 999 and leaning["noise"].shape == (4096, 3, 2, 2)
    assert t.median().item() == pytest.approx(1000 * torch.sigmoid(torch.tensor(1.0)).item(), abs=15)
    assert (t > 650).float().mean() > 0.6 > (uniform["t"] > 650).float().mean()


def test_bad_logit_normal_spread_fails_at_start(tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"diffusion.logit_normal.std=0.0: must be a positive number"):
        load_stage(DEMO, 2, [f"out_dir={tmp_path}", "diffusion.logit_normal={mean: 0.5, std: 0}"])
    with pytest.raises(ConfigError, match=r"diffusion.logit_normal shapes the diffusion loss, which stage 4 does not "
                       r"train with .*: set stage4.diffusion.logit_normal=null"):
        load_stage(DEMO, 4, [f"out_dir={tmp_path}", "diffusion.logit_normal={mean: 0.5, std: 1}"])


def test_logit_normal_draws_stay_in_range_at_the_extremes() -> None:
    """sigmoid(z) rounds to 1 for large z in float32: the draw is clamped to the last timestep, never past it."""
    draws = StepDraws(seed=1, step=0, slot=Slot(), device=torch.device("cpu"))
    t = draws.diffusion((64, 3, 2, 2), 1000, 0.0, logit_normal=(40.0, 1.0))["t"]
    assert int(t.min()) == int(t.max()) == 999
