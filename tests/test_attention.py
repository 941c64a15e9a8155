"""The attention backend is a choice that reaches the kernel and keeps the numbers; captions are trimmed to
lengths in steps of 16, which changes no output."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from pixart_lightning.config import ConfigError, load_stage
from pixart_lightning.models import pixart
from pixart_lightning.models.attention import ATTENTION_BACKENDS, CPU_MATMUL_ATTENTION, attention
from pixart_lightning.models.attention_check import check_attention_backends
from pixart_lightning.models.pixart import CAPTION_LENGTH_MULTIPLE, trim_caption_padding
from tests.multiproc_train import DEMO, small_stage2

NO_CPU_KERNEL = ("efficient", "cudnn")  # SDPA has these only on GPUs


def _captions(lengths: list[int], width: int, channels: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption features padded to ``width`` tokens with random padding values, and their mask."""
    y = torch.randn(len(lengths), width, channels, generator=torch.Generator().manual_seed(seed))
    mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
    return y, mask


def test_every_backend_with_a_cpu_kernel_gives_the_math_output() -> None:
    """The whole model with padded captions, per backend; the ones without a CPU kernel fail, so the choice
    reaches SDPA."""
    model = tiny_model()
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999])
    y, mask = _captions([3, 7, 5], 7)
    outputs = {}
    for backend in ATTENTION_BACKENDS:
        model.attention_backend = backend
        with torch.no_grad():
            if backend in NO_CPU_KERNEL:
                with pytest.raises(RuntimeError, match="No viable backend|No available kernel"):
                    model(x, t, y, mask)
            else:
                outputs[backend] = model(x, t, y, mask)
    assert {"auto", "math"} <= set(outputs) and outputs["math"].abs().max() > 0.1
    for backend, out in outputs.items():
        torch.testing.assert_close(out, outputs["math"], atol=1e-5, rtol=1e-5, msg=backend)


def test_auto_attention_leaves_cudnn_out_only_when_masked(monkeypatch) -> None:
    """cuDNN's masked attention has NaN-gradient bugs and plans a graph per key length: with a mask, auto lets
    SDPA choose among the other kernels; without one it leaves SDPA's choice alone."""
    real_sdpa, seen = torch.nn.functional.scaled_dot_product_attention, []

    def spy(*args, **kwargs):
        seen.append((torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled()))
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(pixart.F, "scaled_dot_product_attention", spy)
    N = CPU_MATMUL_ATTENTION // 16 + 1  # long enough for SDPA on CPU
    q, kv = torch.randn(2, N, 2, 8), torch.randn(2, 16, 2, 8)
    attention(q, kv, kv, torch.ones(2, 16, dtype=torch.long))
    attention(q, kv, kv)
    assert seen == [(False, True), (True, True)]


def test_a_bad_attention_backend_is_a_one_line_error() -> None:
    with pytest.raises(ConfigError) as err:
        load_stage(DEMO, 2, ["data.shards=unused", "model.attention_backend=fast"])
    assert "model.attention_backend='fast': valid choices are auto, flash, efficient, cudnn, math" in str(err.value)
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match=r"^attention backend 'fast': valid choices are auto, flash, .*, math$"):
        attention(q, q, q, backend="fast")


def test_the_stage_sets_its_backend_on_the_model_and_its_average() -> None:
    """A run setting, not a model one: the saved config does not carry it."""
    module = small_stage2(1, "model.attention_backend=math")
    assert module.model.attention_backend == module.ema.model.attention_backend == "math"
    assert "attention_backend" not in module.model.cfg.to_dict()


@pytest.mark.parametrize("lengths,width,kept", [
    ([3, 7, 5], 120, 16), ([16, 2], 120, 16), ([17, 1], 120, 32), ([100, 3], 120, 112), ([113, 3], 120, 120),
    ([3, 5], 8, 16), ([37, 21], 37, 48), ([0, 0], 120, 16), ([16, 16], 120, 16), ([16, 16], 16, 16),
])
def test_stage_2_trims_captions_to_a_multiple_of_16(lengths: list[int], width: int, kept: int) -> None:
    """The batch's longest caption rounded up to a multiple of 16 (padded up when the loader padded the batch only
    to its longest caption), at most the model's caption length; the mask is kept where some padding is left."""
    assert CAPTION_LENGTH_MULTIPLE == 16
    y, mask = _captions(lengths, width)
    batch = small_stage2(1).on_before_batch_transfer({"caption_features": y, "caption_mask": mask}, 0)
    padded_y = torch.nn.functional.pad(y, (0, 0, 0, max(0, kept - width)))[:, :kept]
    padded_mask = torch.nn.functional.pad(mask, (0, max(0, kept - width)))[:, :kept]
    assert torch.equal(batch["caption_features"], padded_y)
    if padded_mask.all():
        assert batch["caption_mask"] is None
    else:
        assert torch.equal(batch["caption_mask"], padded_mask)


def test_bucketed_padding_gives_the_unpadded_output() -> None:
    """Each sample's output from the batch trimmed to 16 padded tokens equals its output from its own caption
    with no padding and no mask (masking is exact)."""
    model = tiny_model()
    lengths = [3, 7, 5]
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999])
    y, mask = trim_caption_padding(*_captions(lengths, 120))
    assert y.shape[1] == 16
    with torch.no_grad():
        batched = model(x, t, y, mask)
        alone = torch.cat([model(x[i:i + 1], t[i:i + 1], y[i:i + 1, :n]) for i, n in enumerate(lengths)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def test_the_attention_check_runs_every_backend_at_small_sizes_on_cpu() -> None:
    """The GPU check's rows on CPU: every backend with a CPU kernel matches fp32 math forward and backward in
    bf16; the others report themselves unavailable."""
    rows = check_attention_backends((5, 7), (16, 24), heads=2, head_dim=8, device="cpu")
    cases = {(r["attention"], r["tokens"], r["keys"]) for r in rows}
    assert cases == {("self", 16, 16), ("self", 24, 24), *{("cross", n, m) for n in (16, 24) for m in (5, 7)}}
    assert len(rows) == len(cases) * len(ATTENTION_BACKENDS)
    for row in rows:
        if row["backend"] in NO_CPU_KERNEL:
            assert row["status"] == "unavailable" and row["reason"], row
        else:
            assert row["status"] == "ok" and 0 < row["error"] < 5e-2 and row["dtype"] == "torch.bfloat16", row
