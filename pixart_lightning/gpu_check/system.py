"""Checks 7 and 8: every attention backend against the math kernel, and the demo's stage chain on the device."""

from __future__ import annotations

from collections import Counter

from pixart_lightning.files import sha256
from pixart_lightning.gpu_check import PROJECT
from pixart_lightning.gpu_check.harness import Context, Unavailable
from pixart_lightning.runner.chain import run
from pixart_lightning.runner.unit import FINAL


def check_attention(ctx: Context) -> None:
    """Self-attention and masked caption cross-attention in bf16, forward and backward, each backend vs math."""
    try:
        from pixart_lightning.models.attention_check import check_attention_backends
    except ImportError as err:
        raise Unavailable(f"pixart_lightning.models.attention_check.check_attention_backends: {err}") from None
    s = ctx.sizes
    rows = ctx.record("rows", check_attention_backends(
        s.attention_captions, s.attention_tokens, heads=s.attention_heads, head_dim=s.attention_head_dim,
        device=ctx.device))
    ctx.record("statuses", dict(Counter(row["status"] for row in rows)))
    ctx.record("all_usable_backends_agree", all(row["status"] in ("ok", "unavailable") for row in rows))


def check_chain(ctx: Context) -> None:
    """configs/demo stages 1 -> 2 through the runner, shortened: stage 2 starts from stage 1's final weights."""
    s = ctx.sizes
    cuda = ctx.device.type == "cuda"
    out = ctx.work / "run"
    units = run(PROJECT / "configs" / "demo", [1, 2], [
        f"out_dir={out}", f"train.accelerator={'gpu' if cuda else 'cpu'}", "train.progress_bar=false",
        f"stage1.train.max_steps={s.chain_steps[0]}", f"stage2.train.max_steps={s.chain_steps[1]}",
        f"data.synth.count={s.chain_images}", f"eval.alignment_prompts={s.chain_alignment_prompts}", "fid.reference=''",
        *([f"data.batch_size={s.chain_batch}"] if s.chain_batch else []), *([] if cuda else ["samples.steps=2"]),
    ])
    manifests = {unit.stage: unit.manifest() for unit in units}
    for stage, m in manifests.items():
        ctx.record(f"stage{stage}", {"status": m.get("status"), "steps": m.get("steps"),
                                     "wall_time_s": m.get("wall_time_s"),
                                     "alignment": m.get("alignment", {}).get("alignment")})
    handed = manifests[2].get("parent") or {}
    ctx.record("handoff_matches_stage1_weights",
               handed.get("sha256") == sha256(units[0].dir / FINAL) if handed else False)
    ctx.record("summary_written", all(m.get("status") == "done" and (u.dir / "samples" / "final.png").is_file()
                                      for u, m in zip(units, manifests.values())))
