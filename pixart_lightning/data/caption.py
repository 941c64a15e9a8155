"""Re-caption webdataset shards with LLaVA, as PixArt-α did to get its dense captions.

Why: alt-text captions are short and often unrelated to the picture; PixArt-α attributes much of its training
efficiency to captions that describe the image in detail, written by LLaVA with the prompt
"Describe this image and its style in a very detailed manner." When the sample already has a caption it is passed
to the model as a hint (``seed_with_caption``), which keeps proper names and subjects the image alone cannot give.
Images are padded to a square of the processor's mean colour before LLaVA sees them, as the official PixArt-α
captioning does (LLaVA's "pad" aspect mode): the processor's own resize-and-centre-crop would leave the sides of
wide images (and the top and bottom of tall ones) uncaptioned. ``image_aspect="crop"`` keeps the processor's crop.

How: each input shard becomes an output shard of the same name whose samples keep every original member
byte-for-byte and gain ``dense.txt`` (train on it with the reader's caption key). Shard ``i`` belongs to rank
``i % world_size``; each output shard is written under a temporary name and renamed when complete, with its
statistics and settings (model, token limit, image aspect, caption seeding) beside it, so a rerun skips the shards
already done and an interrupted job resumes shard by shard; a rerun with other settings is refused.
Samples whose image cannot be decoded (or whose dense caption comes out empty) are dropped and counted; a tar cut
short keeps every sample before the cut. Every run writes ``caption-manifest.json``: the totals of every finished
shard, whichever run or rank captioned it. Rank 0 copies the dataset manifest beside the shards.

Generation stops at the model's end token or at ``max_new_tokens``: by default the model's own generation config's
limit (``FALLBACK_MAX_NEW_TOKENS`` when it sets none). Each shard prints its tokens/s and the ETA of the rest.
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm
from transformers import AutoConfig, AutoProcessor, BatchFeature, GenerationConfig, LlavaForConditionalGeneration
from webdataset import TarWriter

from pixart_lightning.data.counts import Counts, add_up, finished_stats, shard_finished, stats_path, write_shard_stats
from pixart_lightning.data.samples import caption_text, image_member, open_image
from pixart_lightning.data.shards import MANIFEST_NAMES, DataError, batched, tar_shards
from pixart_lightning.data.sources import complete_samples
from pixart_lightning.data.workers import process_device, process_rank, share
from pixart_lightning.files import atomic_path, write_json_atomic
from pixart_lightning.hub import load_pretrained

log = logging.getLogger(__name__)

DEFAULT_LLAVA = "llava-hf/llava-1.5-7b-hf"
DENSE_KEY = "dense.txt"
CAPTION_MANIFEST = "caption-manifest.json"
FALLBACK_MAX_NEW_TOKENS = 256
"""New tokens per caption when neither the command nor the model's generation config sets a limit."""
PROMPT = "Describe this image and its style in a very detailed manner."
SEEDED_PROMPT = 'Given the caption of this image "{caption}", describe this image and its style in a very detailed manner.'
IMAGE_ASPECTS = ("pad", "crop")
SETTINGS_KEY = "settings"
"""Where a shard's statistics record the settings it was captioned with."""
MISSING_ONLY = "missing_only"
"""The setting that keeps a sample's own caption as its ``dense.txt`` and captions only the samples without one."""


def caption_prompt(caption: str | None = None) -> str:
    """The instruction for one image: the paper's prompt, or its seeded form when an original caption exists."""
    caption = (caption or "").strip()
    return SEEDED_PROMPT.format(caption=caption) if caption else PROMPT


def generation_limit(config: GenerationConfig) -> int:
    """The model's own limit on new tokens per caption: its generation config's ``max_new_tokens``, else
    ``FALLBACK_MAX_NEW_TOKENS`` (its ``max_length`` counts the prompt's hundreds of image tokens too)."""
    return config.max_new_tokens or FALLBACK_MAX_NEW_TOKENS


def model_generation_limit(name_or_path: str) -> int:
    """:func:`generation_limit` of a model read from its config files alone (no weights loaded), so that a rerun
    compares its settings before loading anything; without a generation_config.json transformers derives the
    generation config from config.json, and so does this."""
    try:
        config = load_pretrained(GenerationConfig.from_pretrained, name_or_path, "LLaVA generation config")
    except OSError:
        model_config = load_pretrained(AutoConfig.from_pretrained, name_or_path, "LLaVA config")
        config = GenerationConfig.from_model_config(model_config)
    return generation_limit(config)


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """``image`` centred on a square canvas of colour ``fill``, its longer side the square's side."""
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


class Captioner:
    """A LLaVA model and its processor that turn a batch of images (and optional captions) into dense captions.

    ``image_aspect`` is ``pad`` (square canvas of the processor's mean colour, the whole image seen) or ``crop``
    (the processor's centre crop). ``max_new_tokens=None`` follows the model (:func:`generation_limit`).
    """

    def __init__(
        self, name_or_path: str, max_new_tokens: int | None = None, dtype: str = "auto", device: str | None = None,
        image_aspect: str = "pad",
    ):
        if image_aspect not in IMAGE_ASPECTS:
            raise ValueError(f"image_aspect={image_aspect!r}: choose one of {', '.join(IMAGE_ASPECTS)}")
        self.image_aspect = image_aspect
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _torch_dtype(dtype, self.device)
        self.processor = load_pretrained(AutoProcessor.from_pretrained, name_or_path, "LLaVA processor")
        self.processor.tokenizer.padding_side = "left"  # generation appends to the right end of every row
        # The image mean as 8-bit RGB (truncated, as LLaVA does): the padding normalises to about zero.
        self.pad_colour = tuple(int(255 * channel) for channel in self.processor.image_processor.image_mean)
        model = load_pretrained(
            LlavaForConditionalGeneration.from_pretrained, name_or_path, "LLaVA captioner", dtype=self.dtype
        )
        self.model = model.to(self.device).eval()
        self.max_new_tokens = max_new_tokens or generation_limit(model.generation_config)

    def chat(self, caption: str | None) -> str:
        """The full model input for one image: a user turn holding the image and the instruction."""
        turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": caption_prompt(caption)}]}]
        return self.processor.apply_chat_template(turn, add_generation_prompt=True)

    def inputs(self, images: Sequence[Image.Image], captions: Sequence[str | None]) -> BatchFeature:
        """The model's input batch: token ids, attention mask and pixel values (padded to square if ``pad``)."""
        if self.image_aspect == "pad":
            images = [pad_to_square(image, self.pad_colour) for image in images]
        return self.processor(
            images=list(images), text=[self.chat(c) for c in captions], padding=True, return_tensors="pt"
        ).to(self.device, dtype=self.dtype)

    @torch.inference_mode()
    def caption(self, images: Sequence[Image.Image], captions: Sequence[str | None]) -> tuple[list[str], int]:
        """Greedy dense captions, one per image, decoded from the new tokens only; and how many tokens were
        generated (padding after a row's end token not counted)."""
        inputs = self.inputs(images, captions)
        pad = self.processor.tokenizer.pad_token_id
        tokens = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False, pad_token_id=pad)
        new_tokens = tokens[:, inputs["input_ids"].shape[1]:]
        texts = [text.strip() for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]
        return texts, int((new_tokens != pad).sum())

    def __call__(self, images: Sequence[Image.Image], captions: Sequence[str | None]) -> list[str]:
        return self.caption(images, captions)[0]


def recaption(
    source: str,
    out_dir: str | Path,
    *,
    model: str = DEFAULT_LLAVA,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    seed_with_caption: bool = True,
    dtype: str = "auto",
    device: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    image_aspect: str = "pad",
    missing_only: bool = False,
) -> dict[str, Any]:
    """Write a dense-captioned copy of this rank's shards of ``source`` to ``out_dir``; returns the caption
    manifest (totals over every finished shard) with this run's ``shards_done`` and ``shards_already_done``.

    ``dtype="auto"`` is bfloat16 on CUDA and float32 otherwise; ``device=None`` picks ``cuda:{rank % gpus}``
    when CUDA is available. ``max_new_tokens=None`` follows the model (:func:`generation_limit`).
    ``image_aspect``: see :class:`Captioner`. The model is loaded only if some shard of this rank is still to do.
    ``missing_only``: only samples without a ``txt`` caption go to the model; the others keep their own caption as
    ``dense.txt`` (``pixart-lightning finetune``'s default: the user's captions are kept).
    """
    rank, world_size = process_rank(rank, world_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = tar_shards(source)
    if any(shard.parent.resolve() == out_dir.resolve() for shard in shards):
        raise ValueError(f"{out_dir}: the output folder must not be the source folder")
    mine = share(shards, rank, world_size)
    targets = [out_dir / shard.name for shard in shards]
    for shard in mine:
        _count_unrecorded(out_dir / shard.name)
    if Path(model).is_dir():
        model = str(Path(model).resolve())  # the folder, wherever the command is run from
    settings = {"model": model, "max_new_tokens": max_new_tokens or model_generation_limit(model),
                "seed_with_caption": seed_with_caption, "image_aspect": image_aspect,
                **({MISSING_ONLY: True} if missing_only else {})}  # absent otherwise: older folders still resume
    _check_settings(out_dir, settings, targets)
    todo = [shard for shard in mine if not shard_finished(out_dir / shard.name)]
    device = device or process_device(rank)
    if todo:
        captioner = Captioner(model, settings["max_new_tokens"], dtype, device, image_aspect)
        start = time.perf_counter()
        with tqdm(desc=f"recaption rank {rank}", unit="sample", disable=not progress) as bar:
            for done, shard in enumerate(todo, 1):
                stats = _recaption_shard(shard, out_dir, captioner, batch_size, settings, bar)
                print(_shard_report(shard, stats, done, len(todo), time.perf_counter() - start), flush=True)
    prompts = {"prompt": PROMPT, "seeded_prompt": SEEDED_PROMPT if seed_with_caption else None}
    manifest = _write_manifest(out_dir, targets, settings | prompts)
    if rank == 0:
        _copy_dataset_manifest(shards[0].parent, out_dir)
    log.info("recaption manifest: %s", json.dumps(manifest))
    return manifest | {"shards_done": len(todo), "shards_already_done": len(mine) - len(todo)}


def _count_unrecorded(target: Path) -> None:
    """A shard finished by a version that wrote no statistics beside it is finished all the same (it was renamed
    into place when complete): its statistics are written by counting its samples, not by captioning it again.
    Its settings were not recorded, so none are claimed."""
    if not target.is_file() or stats_path(target).is_file():
        return
    skipped = Counts()
    count = sum(1 for _ in complete_samples(str(target), lambda err: skipped.tar_error(str(target), err)))
    write_shard_stats(target, {"samples": count, **skipped.fields(), "new_tokens": 0, "seconds": 0.0})


def _check_settings(out_dir: Path, settings: dict[str, Any], targets: list[Path]) -> None:
    """A folder is resumed only with the settings its finished shards were captioned with, so that one folder
    never mixes captions of two models or limits."""
    recorded = [stats[SETTINGS_KEY] for stats in finished_stats(targets) if SETTINGS_KEY in stats]
    found = next((r for r in recorded if r != settings), None)
    if found is None:
        return
    differ = [f"{k}: {found.get(k)!r} there, {settings.get(k)!r} asked" for k in {**found, **settings}
              if found.get(k) != settings.get(k)]
    raise FileExistsError(f"{out_dir} holds captions made with other settings ({'; '.join(differ)}); run with its "
                          "settings to resume it, or write the new captions to another folder")


def _write_manifest(out_dir: Path, targets: list[Path], settings: dict[str, Any]) -> dict[str, Any]:
    """``caption-manifest.json``: the settings and the totals of every finished one of ``targets``."""
    finished = [{k: v for k, v in stats.items() if k != SETTINGS_KEY} for stats in finished_stats(targets)]
    empty = {"samples": 0, **Counts().fields(), "new_tokens": 0, "seconds": 0.0}
    totals = add_up([empty, *finished])
    manifest = {**settings, "shards": len(targets), "shards_finished": len(finished),
                "count": totals.pop("samples"), **totals}
    write_json_atomic(out_dir / CAPTION_MANIFEST, manifest)
    return manifest


def _shard_report(shard: Path, stats: dict[str, Any], done: int, todo: int, elapsed: float) -> str:
    """One line per finished shard: its captions, tokens/s, and the ETA of this run's remaining shards."""
    rate = stats["new_tokens"] / max(stats["seconds"], 1e-9)
    eta = datetime.timedelta(seconds=round(elapsed / done * (todo - done)))
    return (f"caption: {shard.name}: {stats['samples']} captions, {stats['new_tokens']} new tokens, {rate:.1f} "
            f"tokens/s; {todo - done} of {todo} shards left, ETA {eta}")


def _recaption_shard(
    shard: Path, out_dir: Path, captioner: Captioner, batch_size: int, settings: dict[str, Any], bar: tqdm,
) -> dict[str, Any]:
    """Caption one shard into ``out_dir/<shard name>`` (renamed into place when complete, its statistics and
    ``settings`` written beside it); returns the statistics."""
    start = time.perf_counter()
    skipped = Counts()
    written = new_tokens = 0
    target = out_dir / shard.name
    with atomic_path(target) as partial:
        with TarWriter(str(partial), encoder=False) as sink:
            for batch in batched(_readable(shard, skipped), batch_size):
                samples, images = zip(*batch, strict=True)
                own = [caption_text(s, "txt", {}) for s in samples]
                kept = {i: caption for i, caption in enumerate(own) if caption and settings.get(MISSING_ONLY)}
                asked = [i for i in range(len(samples)) if i not in kept]
                seeds = [own[i] if settings["seed_with_caption"] else None for i in asked]
                written_captions, tokens = captioner.caption([images[i] for i in asked], seeds) if asked else ([], 0)
                captions = kept | dict(zip(asked, written_captions, strict=True))
                dense_captions = [captions[i] for i in range(len(samples))]
                new_tokens += tokens
                for sample, dense in zip(samples, dense_captions, strict=True):
                    bar.update()
                    if not dense:
                        skipped.add("empty dense caption", f"{shard}:{sample['__key__']}")
                        continue
                    sink.write({**_members(sample), DENSE_KEY: dense.encode("utf-8")})
                    written += 1
        if written == 0 and skipped.tar_errors:  # unreadable, not empty: leave it to a rerun
            raise DataError(f"{shard}: could not be read ({skipped.summary()}); fix it and run the same command again")
    stats = {"samples": written, **skipped.fields(), "new_tokens": new_tokens,
             "seconds": round(time.perf_counter() - start, 3), SETTINGS_KEY: settings}
    write_shard_stats(target, stats)
    return stats


def _readable(shard: Path, skipped: Counts) -> Iterator[tuple[dict[str, Any], Image.Image]]:
    """The complete samples of a shard with their decoded RGB image; the others are counted in ``skipped``."""
    for sample in complete_samples(str(shard), lambda err: skipped.tar_error(str(shard), err)):
        name = f"{shard}:{sample['__key__']}"
        ext = image_member(sample)
        if ext is None:
            skipped.add("no image", name)
            continue
        try:
            image = open_image(sample[ext])
        except Exception as err:  # noqa: BLE001 - PIL raises several types for bad bytes
            skipped.add(f"undecodable ({type(err).__name__})", name)
            continue
        yield sample, image


def _members(sample: dict[str, Any]) -> dict[str, Any]:
    """The sample's key and file members, without the reader's bookkeeping (``__url__`` etc.)."""
    return {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}


def _torch_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be 'auto' or a torch floating type such as 'bfloat16', got {name!r}")
    return dtype


def _copy_dataset_manifest(folder: Path, out_dir: Path) -> None:
    """Copy the dataset manifest (bucket counts etc.) so the output folder reads like the input one."""
    for name in MANIFEST_NAMES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out_dir / name)
