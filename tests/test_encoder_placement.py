"""Frozen encoders only where they are used: 2 CPU processes train on precomputed latents and T5 features."""

from __future__ import annotations

from pathlib import Path

from tests.encoder_use import run_on_features


def events(log: dict, after: str | None = None) -> list[str]:
    """The process's event names, all or those after the first ``after`` marker."""
    names = [e["event"] for e in log["events"]]
    return names[names.index(after) + 1 :] if after else names


def test_with_features_only_rank_0_loads_t5_and_none_once_the_prompts_are_stored(tmp_path: Path) -> None:
    """Stage 2 (FID on) then stage 3 (FID off) under DDP on latents + T5 features: rank 0 loads T5 to store the
    sample, alignment and FID prompts' features, rank 1 never; stage 3 finds them stored and nobody loads T5. The
    VAE is loaded to decode only: on rank 1 for FID, never in stage 3, where only rank 0 samples."""
    rank0, rank1 = run_on_features(tmp_path)
    assert "t5" not in events(rank1)
    assert "t5" in events(rank0) and "t5" not in events(rank0, after="stage3")
    assert "vae" in events(rank1) and "vae" not in events(rank1, after="stage3")
