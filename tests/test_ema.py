"""The weight EMA: fp32, outside the optimizer, warm-up, exact update rule."""

import torch
from torch import nn

from pixart_lightning.ema import EMA


def test_ema_update_rule_and_warmup() -> None:
    model = nn.Linear(3, 2).to(torch.bfloat16)
    ema = EMA(model, rate=0.9)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in ema.model.parameters())
    start = ema.model.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # first update: r = min(0.9, 1/10) = 0.1
    torch.testing.assert_close(ema.model.weight, 0.1 * start + 0.9 * model.weight.float())
    for _ in range(200):
        ema.update(model)
    torch.testing.assert_close(ema.model.weight, model.weight.float())
    assert int(ema.updates) == 201 and "updates" in ema.state_dict()
