"""Offline feature extraction: VAE latents and T5 caption features into shards the stages read directly.

Why: T5-XXL costs about 1.1 TFLOP per caption, more than a PixArt-XL/2 training step per image at
256 px, and the VAE encoder is not free either. Both are frozen, so their outputs are computed once.

For each input shard the extractor writes an output shard of the same name whose samples keep the
caption and metadata members and gain ``features.safetensors`` (:mod:`.features`): the VAE
posterior's mean and std at the sample's aspect-ratio bucket size (the same resize and centre crop as
the training loader), and the T5 features of its caption trimmed to the real tokens, in fp16 or bf16.
The images are dropped unless asked to keep them.

Settings that training would refuse (a resolution that is not a multiple of patch size x VAE factor) are
refused before any model loads, by the stage config's own validation.

Work is split by shard: shard i belongs to process i % world_size (``RANK``/``WORLD_SIZE`` or
``SLURM_PROCID``/``SLURM_NTASKS`` by default). Each output shard is written under a temporary name and
renamed when complete, with a ``.stats.json`` beside it, so a rerun skips finished shards. The settings
(``extract.json``) are recorded with the first finished shard: a run that fails before that leaves nothing
a corrected rerun must match. Whichever process finds every shard done writes ``manifest.json``: the bucket
counts the loader schedules by, and the encoders, sizes and dtypes the runner checks a stage config against.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from tqdm import tqdm

from pixart_lightning.config import ConfigError, DataSection, ModelSection, StageConfig, VAESection, validate
from pixart_lightning.data.counts import Counts, add_up, finished_stats, shard_finished, write_shard_stats
from pixart_lightning.data.features import FEATURES_KEY, encode_features
from pixart_lightning.data.samples import (
    IMAGE_EXTENSIONS,
    fit_to_bucket,
    image_member,
    open_image,
    original_size,
    read_caption,
    sample_meta,
    sample_name,
)
from pixart_lightning.data.shards import DataError, batched, data_buckets, tar_shards
from pixart_lightning.data.sources import complete_samples
from pixart_lightning.data.workers import process_device, process_rank, share
from pixart_lightning.encoders.loading import DTYPES, load_text_encoder, load_vae
from pixart_lightning.encoders.vae import SD_VAE_DOWNSAMPLE
from pixart_lightning.files import atomic_path, write_json_atomic
from pixart_lightning.models.config import CAPTION_TOKENS

MANIFEST, SETTINGS = "manifest.json", "extract.json"


@dataclass(kw_only=True)
class ExtractSettings:
    """What the features are; recorded in the output and compared on resume and by the runner."""

    vae: str | None
    """Hub id or folder of the VAE, ``pixel`` for pixel space, or None for no latents."""
    text_encoder: str | None
    """Hub id or folder of the T5, or None for no caption features."""
    resolution: int = 256
    multi_scale: bool = False
    min_ratio: float = 0.25
    max_ratio: float = 4.0
    patch_size: int = 2
    caption_key: str = "txt"
    max_length: int = CAPTION_TOKENS
    t5_dtype: str = "bf16"
    """bf16: what T5-XXL computes in on a GPU (PixArt-α extracts in bf16 too), so storing it loses nothing there."""
    t5_compress: bool = True
    """Pack the T5 features losslessly (:func:`.features.pack_t5`): about 70 % of the raw bf16 bytes."""
    keep_images: bool = False


class Extractor:
    """The frozen encoders and the bucket table, applied to one shard at a time."""

    def __init__(self, settings: ExtractSettings, device: str | torch.device, batch_size: int):
        self.settings, self.device, self.batch_size = settings, torch.device(device), batch_size
        on_gpu = self.device.type == "cuda"
        # fp16 VAE and bf16 T5 on a GPU, as PixArt-α's extractors; the posterior moments are stored in fp16 anyway.
        self.vae = load_vae(settings.vae, dtype="fp16" if on_gpu else "fp32").to(self.device) if settings.vae else None
        self.encoder = (load_text_encoder(settings.text_encoder, settings.max_length, "bf16" if on_gpu else "fp32")
                        if settings.text_encoder else None)
        if self.encoder is not None:
            self.encoder.model.to(self.device)
        factor = self.vae.downsample_factor if self.vae is not None else SD_VAE_DOWNSAMPLE
        self.buckets = data_buckets(settings.resolution, settings.patch_size * factor, settings.multi_scale,
                                    settings.min_ratio, settings.max_ratio)
        self.t5_dtype = DTYPES[settings.t5_dtype]
        # Without latents the images are what stages train on: keep them.
        self.keep_images = settings.keep_images or self.vae is None

    def _prepared(self, raw: dict[str, Any], skipped: Counts) -> dict[str, Any] | None:
        """The raw sample with its metadata, bucket-fitted pixels and caption; None (counted) when unusable."""
        key = sample_name(raw)
        try:
            meta = sample_meta(raw)
        except ValueError as err:  # also json's JSONDecodeError
            skipped.add(f"unreadable json ({type(err).__name__})", key)
            return None
        try:
            caption = read_caption(raw, self.settings.caption_key, meta) if self.encoder is not None else None
        except ValueError as err:  # no, empty, non-UTF-8 or non-text caption
            skipped.add(str(err), key)
            return None
        item = {"raw": raw, "meta": meta, "caption": caption}
        if self.vae is not None:
            ext = image_member(raw)
            if ext is None:
                skipped.add("no image", key)
                return None
            try:
                image = open_image(raw[ext])
            except Exception as err:  # noqa: BLE001 - any undecodable image is skipped and counted
                skipped.add(f"undecodable ({type(err).__name__})", key)
                return None
            item["size"] = original_size(meta, (image.height, image.width))
            item["ratio"], item["pixels"] = fit_to_bucket(image, self.buckets)
        return item

    @torch.inference_mode()
    def _features(self, items: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        """Latent moments (per bucket group) and trimmed T5 features of a batch of prepared samples."""
        out: list[dict[str, torch.Tensor]] = [{} for _ in items]
        if self.vae is not None:
            for ratio in {item["ratio"] for item in items}:
                index = [i for i, item in enumerate(items) if item["ratio"] == ratio]
                pixels = torch.stack([items[i]["pixels"] for i in index]).to(self.device).float() / 127.5 - 1.0
                mean, std = self.vae.encode_posterior(pixels.to(self.vae.dtype))
                for j, i in enumerate(index):
                    out[i]["latent_mean"] = mean[j].to(torch.float16)
                    out[i]["latent_std"] = std[j].to(torch.float16)
        if self.encoder is not None:
            features, mask = self.encoder.encode([item["caption"] for item in items], trim=True)
            lengths = mask.sum(dim=1).tolist()
            for i, length in enumerate(lengths):
                out[i]["t5"] = features[i, :length].to(self.t5_dtype)
        return out

    def _output(self, item: dict[str, Any], features: dict[str, torch.Tensor]) -> dict[str, Any]:
        raw = item["raw"]
        sample = {k: v for k, v in raw.items() if not k.startswith("__") or k == "__key__"}
        if not self.keep_images:
            sample = {k: v for k, v in sample.items() if k not in IMAGE_EXTENSIONS}
        if "ratio" in item:
            h, w = self.buckets[item["ratio"]]
            sample["json"] = json.dumps(item["meta"] | {"bucket": [h, w], "original_size": list(item["size"])}).encode()
        sample[FEATURES_KEY] = encode_features(compress_t5=self.settings.t5_compress, **features)
        return sample

    def shard(self, url: str, target: Path, progress: tqdm) -> dict[str, Any]:
        """Extract one shard into ``target`` (atomically); its statistics.

        A shard that yields nothing because it could not be read is not marked done: a rerun retries it.
        """
        skipped = Counts()
        buckets: dict[str, int] = {}
        t5_tokens = written = 0
        with atomic_path(target) as partial, wds.TarWriter(str(partial), encoder=False) as sink:
            for batch in batched(complete_samples(url, lambda err: skipped.tar_error(url, err)), self.batch_size):
                items = [p for raw in batch if (p := self._prepared(raw, skipped)) is not None]
                for item, features in zip(items, self._features(items) if items else []):
                    if not all(torch.isfinite(v).all() for v in features.values()):  # e.g. an fp16 overflow
                        skipped.add("non-finite features", sample_name(item["raw"]))
                        continue
                    sink.write(self._output(item, features))
                    if "ratio" in item:
                        name = "x".join(str(v) for v in self.buckets[item["ratio"]])
                        buckets[name] = buckets.get(name, 0) + 1
                    t5_tokens += features["t5"].shape[0] if "t5" in features else 0
                    written += 1
                progress.update(len(batch))
            if written == 0 and skipped.tar_errors:  # nothing renamed into place
                raise DataError(f"{url}: could not be read ({skipped.summary()}); fix it and run the same command again")
        _record_settings(target.parent, self.settings)
        stats = {"samples": written, **skipped.fields(), "bucket_counts": buckets, "t5_tokens": t5_tokens,
                 "bytes": target.stat().st_size}
        write_shard_stats(target, stats)
        return stats


def extract(
    source: str, out_dir: str | os.PathLike, settings: ExtractSettings, *, batch_size: int = 32,
    device: str | None = None, rank: int | None = None, world_size: int | None = None, progress: bool = True,
) -> dict[str, Any]:
    """Extract this process's share of ``source``'s shards into ``out_dir``; the manifest once all are done."""
    if settings.vae is None and settings.text_encoder is None:
        raise ValueError("nothing to extract: give a VAE, a text encoder, or both")
    if settings.t5_dtype not in DTYPES:
        raise ValueError(f"t5_dtype {settings.t5_dtype!r}: valid choices are {', '.join(DTYPES)}")
    if settings.t5_compress and settings.t5_dtype == "fp32":
        raise ValueError("t5_compress packs 16-bit features: use t5_dtype fp16 or bf16, or no compression")
    check_trainable(settings, source)
    # Local model folders are recorded as absolute paths, so the runner can compare them with a stage's.
    settings = replace(settings, **{k: str(Path(v).resolve()) for k in ("vae", "text_encoder")
                                    if (v := getattr(settings, k)) and Path(v).exists()})
    urls = [str(p) for p in tar_shards(source)]
    if any(Path(u).parent.resolve() == Path(out_dir).resolve() for u in urls):
        raise ValueError(f"{out_dir}: the output folder must not be the source folder (its shards would be replaced)")
    rank, world_size = process_rank(rank, world_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = [Path(u).name for u in urls]
    _check_settings(out, settings, [out / n for n in names])
    mine = [(u, out / n) for u, n in share(list(zip(urls, names)), rank, world_size)]
    todo = [(u, t) for u, t in mine if not shard_finished(t)]
    device = device or process_device(rank)
    print(f"extract: rank {rank}/{world_size}: {len(todo)} of {len(mine)} shards to do "
          f"({len(mine) - len(todo)} done already) -> {out}", flush=True)
    if todo:
        extractor = Extractor(settings, device, batch_size)
        with tqdm(desc=f"extract (rank {rank})", unit="sample", disable=not progress) as bar:
            for url, target in todo:
                bar.set_postfix_str(Path(url).name)
                extractor.shard(url, target, bar)
    return _finish(out, names, settings) or {"shards_done_here": len(todo)}


def check_trainable(settings: ExtractSettings, source: str) -> None:
    """Refuse latents that training would refuse, before any model loads: the stage config's own validation of
    these settings (the resolution, which is the multi-scale base too, a multiple of patch size x VAE factor; the
    ratio range), with the nearest valid resolutions."""
    if settings.vae is None:
        return
    stage = StageConfig(
        stage=3 if settings.multi_scale else 2, vae=VAESection(name=settings.vae),
        model=ModelSection(patch_size=settings.patch_size),
        data=DataSection(shards=source, resolution=settings.resolution, multi_scale=settings.multi_scale,
                         min_ratio=settings.min_ratio, max_ratio=settings.max_ratio))
    try:
        validate(stage)
    except ConfigError as err:
        step = settings.patch_size * stage.latent_factor
        below = settings.resolution // step * step
        nearest = " or ".join(str(r) for r in (below, below + step) if r > 0)
        hint = f"; the nearest valid resolutions are {nearest}" if settings.resolution % step else ""
        raise ValueError(f"training would refuse these features: {'; '.join(err.problems)}{hint}") from None


def _finish(out: Path, names: list[str], settings: ExtractSettings) -> dict[str, Any] | None:
    """The manifest, written once every shard's statistics are there (None while other ranks work)."""
    shards = [out / n for n in names]
    if not all(shard_finished(s) for s in shards):
        return None
    totals = add_up(finished_stats(shards))
    manifest: dict[str, Any] = {"kind": "features", **asdict(settings), "latents": "posterior mean and std, fp16",
                                "shards": names, "count": totals.pop("samples"), **totals}
    write_json_atomic(out / MANIFEST, manifest)
    return manifest


def _record_settings(out: Path, settings: ExtractSettings) -> None:
    """Record the settings with every finished shard, before its statistics mark it done (the same file each
    time: a resumed run has the same settings)."""
    write_json_atomic(out / SETTINGS, asdict(settings))


def _check_settings(out: Path, settings: ExtractSettings, shards: list[Path]) -> None:
    """Once one of ``shards`` is finished, the folder is resumed only with the settings it was extracted with;
    before that (e.g. after a run that failed on loading a model) any settings go."""
    path = out / SETTINGS
    if not (path.is_file() and any(shard_finished(s) for s in shards)):
        return
    found = json.loads(path.read_text())
    differ = [f"{k}: {found.get(k)!r} there, {v!r} asked" for k, v in asdict(settings).items() if found.get(k) != v]
    if differ:
        raise FileExistsError(f"{out} holds features extracted with other settings ({'; '.join(differ)}); run with "
                              "its settings to resume it, or write the new features to another folder")
