"""``make finetune-demo``'s steps around the training run: the teal world, then the before/after report.

    python configs/finetune-demo/teal.py data configs/finetune-demo
    python configs/finetune-demo/teal.py report configs/finetune-demo

The config folder names everything: its stage-3 ``data.shards`` (where the teal world goes), ``model.init_from``
(the demo's stage-3 weights, whose stage folder holds the world to repaint and is the "before") and its run folder
(the "after").
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RECOLOR = {"red": (0, 128, 128)}  # what captions call red is drawn teal
RECOLOR_NAMES = {"red": "teal"}  # the same swap as the detector names it (world.DETECTOR_COLORS)


def _unit(folder: str):
    from pixart_lightning.runner.chain import plan

    (unit,) = plan(folder)
    return unit


def write_data(folder: str) -> None:
    """The world the starting model trained on (same scenes, captions and sizes) with red painted teal."""
    from pixart_lightning.runner.folders import saved_config
    from pixart_lightning.shapes.synth import MANIFEST, synthesize

    unit = _unit(folder)
    source = Path(saved_config(Path(unit.cfg.model.init_from).parent).data.shards)
    world = json.loads((source / MANIFEST).read_text())
    synthesize(unit.cfg.data.shards, count=world["count"], seed=world["seed"], resolution=world["resolution"],
               buckets=world["buckets"], two_shape_fraction=world["two_shape_fraction"],
               min_aesthetic=world["min_aesthetic"], templates=world["templates"],
               samples_per_shard=world["samples_per_shard"], recolor=RECOLOR)


def report(folder: str, num: int) -> dict:
    """Teal share on held-out "red" prompts and alignment on prompts without red, before and after."""
    from pixart_lightning.evaluation.alignment import recolor_alignment
    from pixart_lightning.runner.folders import load_run_artifacts

    unit = _unit(folder)
    scores = {}
    for name, stage_folder in (("before", Path(unit.cfg.model.init_from).parent), ("after", unit.dir)):
        run = load_run_artifacts(stage_folder)
        scores[name] = recolor_alignment(run.model, run.vae, run.encoder, RECOLOR_NAMES, num=num,
                                         height=run.resolution, width=run.resolution, prediction=run.prediction)
    print(json.dumps(scores, indent=2))
    before, after = scores["before"], scores["after"]
    change = after["untouched_alignment"] - before["untouched_alignment"]
    print(f'"red" prompts drawn teal: {before["recolored"]:.2f} -> {after["recolored"]:.2f} (goal >= 0.80) over '
          f'{after["num_recolored_prompts"]} held-out prompts\n'
          f'alignment without "red": {before["untouched_alignment"]:.2f} -> {after["untouched_alignment"]:.2f} '
          f'({change:+.2f}; goal: drops <= 0.05) over {after["num_untouched_prompts"]} held-out prompts')
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    steps = parser.add_subparsers(dest="step", required=True)
    steps.add_parser("data", help="write the teal world").add_argument("folder", help="the config folder")
    scored = steps.add_parser("report", help="score the starting and the fine-tuned model")
    scored.add_argument("folder", help="the config folder")
    scored.add_argument("--num", type=int, default=64, help="held-out prompts of each kind")
    args = parser.parse_args()
    if args.step == "data":
        write_data(args.folder)
    else:
        report(args.folder, args.num)


if __name__ == "__main__":
    main()
