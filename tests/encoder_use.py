"""Run the runner (``pixart_lightning.runner.chain.run``) and record, per process, which frozen encoders it built.

Used by tests/test_encoder_placement.py and benchmarks/encoder_memory.py through :func:`run_on_features` (Lightning
starts the second process, which runs this script again):

    python tests/encoder_use.py OUT CONFIG_FOLDER key=value ...

Every process writes OUT/rank<R>.json: its events in order (``stage<N>`` when a unit's Trainer sets up, ``t5`` /
``vae`` when a T5 or VAE is built, with its parameter count) and its peak resident memory (ru_maxrss, KiB).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pixart_lightning.data.extract import ExtractSettings, extract  # noqa: E402
from pixart_lightning.encoders import text as text_encoder  # noqa: E402
from pixart_lightning.encoders import vae  # noqa: E402
from pixart_lightning.runner.chain import run  # noqa: E402
from pixart_lightning.shapes.synth import synthesize  # noqa: E402
from pixart_lightning.shapes.tiny_models import build_tiny_models  # noqa: E402

EVENTS: list[dict] = []


def record_builds(cls: type, name: str) -> None:
    """Log every construction of ``cls`` (the wrappers around the loaded T5 and VAE) with its parameter count."""
    build = cls.__init__

    def logged(self, *args, **kwargs) -> None:
        build(self, *args, **kwargs)
        EVENTS.append({"event": name, "params": sum(p.numel() for p in self.parameters())})

    cls.__init__ = logged


class UnitMarker(L.Callback):
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        EVENTS.append({"event": f"stage{pl_module.cfg.stage}"})


def main() -> None:
    out, config, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    record_builds(text_encoder.T5TextEncoder, "t5")
    record_builds(vae.VAE, "vae")
    run(config, None, overrides, callbacks=[UnitMarker()])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (out / f"rank{rank_zero_only.rank}.json").write_text(json.dumps({"events": EVENTS, "peak_rss_kib": peak}))


def run_on_features(work: Path, t5: Path | None = None) -> tuple[dict, dict]:
    """Tiny encoders (or the T5 folder ``t5``) extract latents and T5 features of a small shapes world; stage 2 (FID
    on) then stage 3 train on them under 2-process DDP through this script. Each rank's log, rank 0 first."""
    tiny = build_tiny_models(work / "tiny") | ({"t5": t5} if t5 else {})
    world = work / "world"
    synthesize(world, count=32, seed=0, resolution=16, samples_per_shard=16, progress=False)
    extract(str(world), work / "features", ExtractSettings(
        vae=str(tiny["vae"]), text_encoder=str(tiny["t5"]), resolution=16, max_length=16), progress=False)
    config = work / "config"
    config.mkdir()
    (config / "base.yaml").write_text((ROOT / "configs" / "demo" / "base.yaml").read_text())
    (config / "stage2.yaml").write_text(f"fid:\n  reference: {world}\n")
    (config / "stage3.yaml").write_text("train:\n  max_steps: 2\n")
    overrides = [
        f"out_dir={work / 'run'}", f"data.shards={work / 'features'}", f"vae.name={tiny['vae']}",
        f"text_encoder.name={tiny['t5']}", "text_encoder.max_length=16", "data.resolution=16", "model.depth=2",
        "model.hidden_size=48", "model.patch_size=2", "data.batch_size=2", "data.num_workers=0",
        "data.shuffle_buffer=8", "train.max_steps=2", "train.devices=2", "train.strategy=ddp", "train.threads=1",
        "train.progress_bar=false", "samples.steps=2", "samples.cfg_scales=[1.0]", "eval.alignment_prompts=2",
        "samples.prompts=[a red circle,a blue square]", "fid.num_images=4", "fid.batch_size=2", "fid.steps=2",
        "fid.reference_count=8",
    ]
    proc = subprocess.run([sys.executable, __file__, str(work), str(config), *overrides],
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-4000:])
    rank0, rank1 = (json.loads((work / f"rank{r}.json").read_text()) for r in (0, 1))
    return rank0, rank1


if __name__ == "__main__":
    main()
