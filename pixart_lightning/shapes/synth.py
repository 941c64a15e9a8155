"""Writing the shapes world as webdataset tar shards with a ``world.json`` manifest."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from pixart_lightning.files import atomic_folder
from pixart_lightning.shapes import world

MANIFEST = "world.json"
FORMAT_VERSION = 1  # bump when rendering, captions or sample fields change, so older folders are not reused
MAX_ATTEMPTS = 1000  # resamples of one sample before the filters are declared unsatisfiable


def _draw(
    seed: int, index: int, sizes: Sequence[tuple[int, int]], two_shape_fraction: float, min_aesthetic: float | None,
    templates: Sequence[int] | None = None,
) -> tuple[world.Scene, str, tuple[int, int], int, int]:
    """Sample ``index``: its scene, caption, size, and how many held-out and low-score draws it skipped."""
    rng = np.random.default_rng([seed, index])
    size = sizes[rng.integers(len(sizes))]
    held_out = filtered = 0
    for _ in range(MAX_ATTEMPTS):
        scene = world.sample_scene(rng, two_shape_fraction)
        caption = world.caption_for(scene, rng, templates)
        if world.is_held_out(caption):
            held_out += 1
        elif min_aesthetic is not None and world.aesthetic_score(scene) < min_aesthetic:
            filtered += 1
        else:
            return scene, caption, size, held_out, filtered
    raise RuntimeError(f"sample {index}: no scene passed the filters in {MAX_ATTEMPTS} draws (min_aesthetic too high?)")


def _encode(
    index: int, scene: world.Scene, caption: str, height: int, width: int, recolor: dict[str, list[int]] | None = None
) -> dict[str, str | bytes]:
    """The webdataset sample: PNG image (colours repainted by ``recolor``), caption, class label and JSON metadata."""
    # 4× up to 128 px, fewer above (at least 2×): the canvas stays near 512 px a side, so large images stay cheap.
    supersample = max(2, min(4, 512 // max(height, width)))
    buffer = io.BytesIO()
    world.render_image(scene, height, width, supersample, recolor).save(buffer, format="PNG")
    label = world.class_label(scene)
    meta = {
        "caption": caption,
        "short_caption": world.short_caption(scene),
        "label": label,
        "class_name": world.class_name(label),
        "aesthetic": world.aesthetic_score(scene),
        "height": height,
        "width": width,
        "aspect_ratio": height / width,
        "original_size": [height, width],
        "scene": {"background": scene.background, "shapes": [vars(s) for s in scene.shapes]},
    }
    return {
        "__key__": f"{index:08d}",
        "png": buffer.getvalue(),
        "txt": caption.encode("utf-8"),
        "cls": str(label).encode("utf-8"),
        "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
    }


def _existing(out: Path, params: dict) -> dict | None:
    """The manifest of a complete folder written with ``params``; None if there is none (or an empty folder)."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        raise FileExistsError(f"{out} holds other files and no shapes world ({MANIFEST}); the shapes world is "
                              "written only into a new or empty folder")
    manifest = json.loads(manifest_path.read_text())
    differ = {k: (manifest.get(k), v) for k, v in params.items() if manifest.get(k) != v}
    if differ:
        raise FileExistsError(f"{out} holds a shapes dataset with other parameters (found, wanted): {differ}")
    return manifest


def _write(folder: Path, params: dict, progress: bool) -> dict:
    """Write every sample's shards and then the manifest into ``folder``."""
    sizes = [tuple(b) for b in params["buckets"]] if params["buckets"] else [(params["resolution"],) * 2]
    counts = {f"{h}x{w}": 0 for h, w in sizes}
    held_out = filtered = 0
    pattern = str(folder / "shard-%06d.tar")
    # A fixed mtime makes the tar files themselves reproducible; the samples are bytes already, so no encoder.
    with wds.ShardWriter(pattern, maxcount=params["samples_per_shard"], verbose=0, mtime=0, encoder=False) as sink:
        for i in tqdm(range(params["count"]), desc="shapes world", unit="img", disable=not progress):
            scene, caption, (h, w), skipped_held, skipped_low = _draw(
                params["seed"], i, sizes, params["two_shape_fraction"], params["min_aesthetic"], params["templates"]
            )
            sink.write(_encode(i, scene, caption, h, w, params["recolor"]))
            counts[f"{h}x{w}"] += 1
            held_out += skipped_held
            filtered += skipped_low
    manifest = params | {
        "bucket_counts": counts,
        "shards": sorted(p.name for p in folder.glob("shard-*.tar")),
        "held_out_resamples": held_out,
        "filtered_resamples": filtered,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def synthesize(
    out_dir: str | os.PathLike,
    *,
    count: int,
    seed: int,
    resolution: int,
    buckets: Sequence[tuple[int, int]] | None = None,
    two_shape_fraction: float = 0.0,
    min_aesthetic: float | None = None,
    templates: Sequence[int] | None = None,
    recolor: Mapping[str, Sequence[int]] | None = None,
    samples_per_shard: int = 1000,
    progress: bool = True,
) -> dict:
    """Write ``count`` shapes-world samples as tar shards plus ``world.json`` (reused if already complete).

    ``recolor`` paints named colours with other RGB values (``{"red": (0, 128, 128)}``) while the scenes, captions
    and labels stay those of the plain world: the same seed draws the same scenes, only their pixels differ.
    """
    sizes = [(int(h), int(w)) for h, w in buckets] if buckets else [(resolution, resolution)]
    if count < 1 or samples_per_shard < 1 or min(min(s) for s in sizes) < 16:
        raise ValueError("count and samples_per_shard must be positive, and every image side at least 16")
    unknown = sorted(set(recolor or {}) - set(world.COLORS))
    if unknown or any(len(v) != 3 or not all(0 <= int(c) <= 255 for c in v) for v in (recolor or {}).values()):
        raise ValueError(f"recolor maps colours of {sorted(world.COLORS)} to RGB triples in [0, 255]; got {recolor}")
    params = {
        "version": FORMAT_VERSION,
        "seed": seed,
        "count": count,
        "resolution": resolution,
        "buckets": [list(s) for s in sizes] if buckets else None,
        "two_shape_fraction": two_shape_fraction,
        "min_aesthetic": min_aesthetic,
        "templates": sorted(templates) if templates else None,
        "recolor": {name: [int(c) for c in rgb] for name, rgb in sorted(recolor.items())} if recolor else None,
        "samples_per_shard": samples_per_shard,
    }
    out = Path(out_dir)
    if (manifest := _existing(out, params)) is not None:
        print(f"Reusing the shapes world in {out} ({count} samples)")
        return manifest
    # Written beside the target and renamed at the end: a half-written folder never looks complete.
    try:
        with atomic_folder(out) as partial:
            manifest = _write(partial, params, progress)
    except FileExistsError:
        # Another process of the job published the same dataset first (_existing raises if it is another one).
        manifest = _existing(out, params)
        print(f"Reusing the shapes world in {out} ({count} samples)")
    return manifest
