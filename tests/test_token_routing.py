"""Token routing (TREAD) and patch masking (MDT/MicroDiT) while training: models/routing.py, the backbone's forward,
the stage's draws and loss, the config checks and the FLOPs count."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize, tiny_model

from pixart_lightning.config import ConfigError, load_stage
from pixart_lightning.diffusion import mean_flat
from pixart_lightning.encoders.vae import PixelSpace
from pixart_lightning.models.routing import TokenRoute, TokenRouting
from pixart_lightning.training import flops
from pixart_lightning.training.draws import Slot, StepDraws
from stages import STAGE_MODULES

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo"
CPU = torch.device("cpu")


def inputs(batch: int = 3) -> dict:
    """Text-mode inputs for ``tiny_model``: 4x4 tokens of an 8x8 latent, captions of 5 tokens, no caption drops."""
    return dict(x=torch.randn(batch, 4, 8, 8), t=torch.randint(0, 1000, (batch,)), y=torch.randn(batch, 5, 16),
                mask=torch.ones(batch, 5), force_drop_ids=torch.zeros(batch, dtype=torch.long))


def half_route(batch: int = 3, start: int = 1, end: int = 3) -> TokenRoute:
    route = TokenRouting(0.5, start, end).route(torch.rand(batch, 16))
    assert route is not None and route.kept.shape == (batch, 8)
    return route


def test_ratio_zero_routes_nothing_and_a_full_route_is_the_plain_forward_bit_for_bit() -> None:
    model, x = tiny_model(depth=4).train(), inputs()
    assert TokenRouting(0.0, 1, 3).route(torch.rand(3, 16)) is None
    assert TokenRouting(0.05, 1, 3).route(torch.rand(3, 16)) is None  # int(0.05 * 16) = 0 tokens leave
    everything = TokenRoute(torch.arange(16).expand(3, 16), 1, 3)
    assert torch.equal(model(**x, route=everything), model(**x))


def test_eval_mode_never_routes() -> None:
    model, x = tiny_model(depth=4), inputs()
    assert not model.training
    assert torch.equal(model(**x, route=half_route()), model(**x))
    model.train()
    assert not torch.equal(model(**x, route=half_route()), model(**x))


@pytest.mark.parametrize("start, end", [(1, 3), (0, 4)])
def test_routed_tokens_skip_the_span_unchanged_and_kept_ones_are_processed(start: int, end: int) -> None:
    model, x, route = tiny_model(depth=4).train(), inputs(), half_route(start=start, end=end)
    inputs_of: dict[str, torch.Tensor] = {}  # what each block and the final layer receive
    for name, layer in [*((str(i), b) for i, b in enumerate(model.blocks)), ("final", model.final_layer)]:
        layer.register_forward_pre_hook(lambda _, args, name=name: inputs_of.__setitem__(name, args[0].detach()))
    plain_entry = {}
    if start == 0:  # the span starts at the embedding: its input is what block 0 gets without a route
        model(**x)
        plain_entry = {"0": inputs_of["0"]}
    out_of: dict[str, torch.Tensor] = {}
    if start > 0:
        model.blocks[start - 1].register_forward_hook(lambda _, args, out: out_of.__setitem__("entry", out.detach()))
    model(**x, route=route)
    assert {i: inputs_of[str(i)].shape[1] for i in range(4)} == {i: 8 if start <= i < end else 16 for i in range(4)}
    entering = out_of["entry"] if start > 0 else plain_entry["0"]
    leaving = inputs_of[str(end)] if end < 4 else inputs_of["final"]
    routed = torch.ones(3, 16, dtype=torch.bool).scatter(1, route.kept, False)
    assert torch.equal(leaving[routed], entering[routed])
    assert torch.equal(inputs_of[str(start)], route.gather(entering))
    assert not torch.allclose(leaving[~routed], entering[~routed])


def test_gradients_reach_every_block_through_a_route() -> None:
    model = tiny_model(depth=4).train()
    model(**inputs(), route=half_route()).square().mean().backward()
    for name, param in model.named_parameters():
        if name.startswith("blocks."):
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_route_draws_follow_the_global_batch_and_the_seed() -> None:
    """Micro-batch m of rank r draws slot m x world + r of one global draw: any split routes the same tokens."""
    whole = StepDraws(7, 3, Slot(), CPU).token_scores(8, 16)
    split = [StepDraws(7, 3, Slot(micro=m, rank=r, world=2, accumulation=2), CPU).token_scores(2, 16)
             for m in range(2) for r in range(2)]
    world_of_one = StepDraws(7, 3, Slot(world=1, accumulation=4), CPU)
    assert torch.equal(torch.cat(split), torch.cat([StepDraws(7, 3, Slot(micro=m, world=1, accumulation=4), CPU)
                                                    .token_scores(2, 16) for m in range(4)]))
    assert world_of_one.token_scores(2, 16).shape == (2, 16)
    assert torch.equal(whole, StepDraws(7, 3, Slot(), CPU).token_scores(8, 16))
    assert not torch.equal(whole, StepDraws(7, 4, Slot(), CPU).token_scores(8, 16))
    assert not torch.equal(whole, StepDraws(8, 3, Slot(), CPU).token_scores(8, 16))
    # the main stream is untouched by the token scores, and each sample routes its own tokens
    draws = StepDraws(7, 3, Slot(), CPU)
    before = draws.diffusion((8, 3, 4, 4), 1000, 0.1)
    draws.token_scores(8, 16)
    assert torch.equal(before["noise"], draws.diffusion((8, 3, 4, 4), 1000, 0.1)["noise"])
    kept = TokenRouting(0.5, 1, 3).route(whole).kept
    assert len({tuple(row.tolist()) for row in kept}) == 8


def small_stage(*extra: str):
    cfg = load_stage(DEMO, 1, ["data.shards=unused", "model.depth=4", "model.hidden_size=48", "model.patch_size=2",
                               "data.resolution=8", "train.accelerator=cpu", "train.precision=32", *extra])
    torch.manual_seed(0)
    module = STAGE_MODULES[1](cfg, randomize(STAGE_MODULES[1].initial_model(cfg, None, None)), PixelSpace(), None)
    return module.train()


def stage_losses(module) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x0, labels = torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 27, (4,), generator=gen)
    return module.losses(x0, {"y": labels})


def test_loss_parity_at_zero_percent_and_a_routed_loss_that_trains() -> None:
    plain = stage_losses(small_stage())
    for zero in ("model.token_routing={ratio: 0.0}", "model.patch_masking={ratio: 0.0}"):
        module = small_stage(zero)
        assert module.token_routing is not None
        assert all(torch.equal(plain[k], v) for k, v in stage_losses(module).items())
    routed_module = small_stage("model.token_routing={ratio: 0.5}")
    assert routed_module.token_routing == TokenRouting(0.5, 1, 3)
    routed = stage_losses(routed_module)
    assert torch.isfinite(routed["loss"]).all() and not torch.equal(routed["loss"], plain["loss"])
    routed["loss"].mean().backward()
    assert all(p.grad is not None for p in routed_module.model.blocks.parameters())


def test_patch_masking_drops_tokens_everywhere_and_counts_only_kept_patches() -> None:
    module = small_stage("model.patch_masking={ratio: 0.75}")
    assert module.token_routing == TokenRouting(0.75, 0, 4, masked_loss=True)
    route = TokenRoute(torch.tensor([[0, 5], [3, 15]]), 0, 4)
    mask = route.patch_mask(4, 4, 2)
    assert mask.shape == (2, 1, 8, 8) and mask.sum().item() == 2 * 2 * 4
    assert mask[0, 0, :2, :2].eq(1).all() and mask[0, 0, 2:4, 2:4].eq(1).all() and mask[1, 0, 6:, 6:].eq(1).all()
    error = torch.rand(2, 3, 8, 8)
    assert torch.allclose(mean_flat(error, mask), torch.stack([error[i][:, mask[i, 0].bool()].mean() for i in range(2)]))
    assert torch.allclose(mean_flat(error, torch.ones(2, 1, 8, 8)), mean_flat(error))
    losses = stage_losses(module)
    assert torch.isfinite(losses["loss"]).all() and {"mse", "vb"} <= losses.keys()


@pytest.mark.parametrize("override, message", [
    ("model.token_routing={ratio: 1.0}", r"model.token_routing.ratio=1.0: must be in \[0, 1\)"),
    ("model.patch_masking={ratio: -0.1}", r"model.patch_masking.ratio=-0.1: must be in \[0, 1\)"),
    ("model.token_routing={start: 3, end: 2}", r"model.token_routing.start=3, end=2: need 0 <= start < end <= "
                                               r"depth=4 \(end null: depth - 1\), e.g. start=1, end=3"),
    ("model.token_routing={end: 5}", r"start=1, end=5: need 0 <= start < end <= depth=4"),
])
def test_config_checks_name_the_valid_values(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_stage(DEMO, 1, [override])


def test_routing_and_masking_are_exclusive_and_not_for_stage_4() -> None:
    with pytest.raises(ConfigError, match="model.token_routing and model.patch_masking exclude each other"):
        load_stage(DEMO, 1, ["model.token_routing={ratio: 0.5}", "model.patch_masking={ratio: 0.5}"])
    with pytest.raises(ConfigError, match="are for stages 1-3: set them to null in stage 4"):
        load_stage(DEMO, 4, ["model.token_routing={ratio: 0.5}"])
    assert load_stage(DEMO, 1, []).model.token_routing is None  # off by default


def test_flops_count_the_kept_tokens_in_the_routed_span() -> None:
    cfg = load_stage(DEMO, 2, []).pixart_config(caption_channels=32)
    plain = flops.train_flops_per_image(cfg, 24, 24, 1, 32)
    assert flops.train_flops_per_image(cfg, 24, 24, 1, 32, TokenRouting(0.0, 1, 3)) == plain
    middle = flops.train_flops_per_image(cfg, 24, 24, 1, 32, TokenRouting(0.5, 1, 3))
    everywhere = flops.train_flops_per_image(cfg, 24, 24, 1, 32, TokenRouting(0.5, 0, 4))
    # the embeddings and the caption cost the same; each routed block saves the same: 2 blocks, then 4
    assert plain > middle > everywhere
    assert plain - everywhere == pytest.approx(2 * (plain - middle))


def test_the_step_time_benchmark_runs_and_prints_its_ratio() -> None:
    """benchmarks/token_routing.py (docs/performance.md) in its smallest form."""
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "benchmarks/token_routing.py", "--steps", "1", "--warmup", "0", "--batch", "4"],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "routed/plain" in run.stdout and "TokenRouting(ratio=0.5, start=1, end=3" in run.stdout
