"""Run the runner (``pixart_lightning.runner.run``) and record, per process, which frozen encoders it built.

Used by tests/test_encoder_placement.py (Lightning starts the second process, which runs this script again):

    python tests/encoder_use.py OUT CONFIG_FOLDER key=value ...

Every process writes OUT/rank<R>.json: its events in order (``stage<N>`` when a unit's Trainer sets up, ``t5`` /
``vae`` when a T5 or VAE is built, with its parameter count) and its peak resident memory (ru_maxrss, KiB).
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixart_lightning import text_encoder, vae  # noqa: E402
from pixart_lightning.runner import run  # noqa: E402

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


if __name__ == "__main__":
    main()
