"""The weight EMA: fp32, outside the optimizer, constant rate by default, optional warm-up, exact update rule."""

import pytest
import torch
from torch import nn

from pixart_lightning.config import load_stage
from pixart_lightning.training import ema as ema_module
from pixart_lightning.training.ema import EMA


def _moved(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)


def test_ema_rate_is_constant_by_default() -> None:
    """As the official code: p_ema <- 0.9 p_ema + 0.1 p from the first update on (no warm-up to restart)."""
    model = nn.Linear(3, 2).to(torch.bfloat16)
    ema = EMA(model, rate=0.9)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in ema.model.parameters())
    start = ema.model.weight.clone()
    _moved(model)
    ema.update(model)
    torch.testing.assert_close(ema.model.weight, 0.9 * start + 0.1 * model.weight.float())
    ema.update(model, skip=torch.tensor(False))  # the device-weight path computes the same rule
    torch.testing.assert_close(ema.model.weight, 0.81 * start + 0.19 * model.weight.float())
    assert int(ema.updates) == 2 and "updates" in ema.state_dict()


def test_ema_warmup_rule() -> None:
    model = nn.Linear(3, 2).to(torch.bfloat16)
    ema = EMA(model, rate=0.9, warmup=True)
    start = ema.model.weight.clone()
    _moved(model)
    ema.update(model)  # first update: r = min(0.9, 1/10) = 0.1
    torch.testing.assert_close(ema.model.weight, 0.1 * start + 0.9 * model.weight.float())
    for _ in range(200):
        ema.update(model)
    torch.testing.assert_close(ema.model.weight, model.weight.float())
    assert int(ema.updates) == 201


@pytest.mark.parametrize("warmup", [False, True])
def test_skipped_step_leaves_the_average_exactly(warmup: bool) -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    ema = EMA(model, rate=0.99, warmup=warmup)
    _moved(model)
    ema.update(model)
    before = [p.clone() for p in ema.model.parameters()]
    _moved(model)
    ema.update(model, skip=torch.tensor(True))
    assert all(torch.equal(a, b) for a, b in zip(before, ema.model.parameters()))
    assert int(ema.updates) == 1


def test_parameters_are_averaged_in_bounded_groups(monkeypatch) -> None:
    """Groups of about CHUNK_ELEMENTS bound the update's temporary copy; the result is the same."""
    model = nn.Sequential(*(nn.Linear(8, 8) for _ in range(4)))
    whole, grouped = EMA(model, rate=0.5), EMA(model, rate=0.5)
    _moved(model)
    whole.update(model, skip=torch.tensor(False))
    monkeypatch.setattr(ema_module, "CHUNK_ELEMENTS", 100)
    grouped.update(model, skip=torch.tensor(False))
    assert len(grouped._groups) > 1 and len(whole._groups) == 1
    for a, b in zip(whole.model.parameters(), grouped.model.parameters()):
        torch.testing.assert_close(a, b)


def test_recipes_state_their_ema() -> None:
    """The paper recipe keeps 0.9999 constant; the demo warms up (its stages are a few hundred steps)."""
    xl, demo = load_stage("configs/pixart-xl2", 2), load_stage("configs/demo", 2)
    assert (xl.optim.ema_rate, xl.optim.ema_warmup) == (0.9999, False)
    assert demo.optim.ema_warmup
