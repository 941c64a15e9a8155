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
``i % world_size``; each output shard is written under a temporary name and renamed when complete, so a rerun
skips the shards already done and an interrupted job resumes shard by shard. Samples whose image cannot be decoded
(or whose dense caption comes out empty) are dropped and counted. Each run writes its summary to ``caption-manifest.json`` (with ``world_size > 1``, one
``caption-manifest-rank{r}.json`` per rank) and rank 0 copies the dataset manifest beside the shards.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm
from transformers import AutoProcessor, BatchFeature, LlavaForConditionalGeneration
from webdataset import TarWriter
from webdataset.tariterators import tarfile_samples

from ..files import write_json_atomic
from ..hub import load_pretrained
from .samples import caption_text, image_member, open_image
from .shards import MANIFEST_NAMES, DataError, batched, tar_shards
from .workers import process_device, process_rank, share

log = logging.getLogger(__name__)

DEFAULT_LLAVA = "llava-hf/llava-1.5-7b-hf"
DENSE_KEY = "dense.txt"
PROMPT = "Describe this image and its style in a very detailed manner."
SEEDED_PROMPT = 'Given the caption of this image "{caption}", describe this image and its style in a very detailed manner.'
IMAGE_ASPECTS = ("pad", "crop")


def caption_prompt(caption: str | None = None) -> str:
    """The instruction for one image: the paper's prompt, or its seeded form when an original caption exists."""
    caption = (caption or "").strip()
    return SEEDED_PROMPT.format(caption=caption) if caption else PROMPT


def pad_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """``image`` centred on a square canvas of colour ``fill``, its longer side the square's side."""
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


class Captioner:
    """A LLaVA model and its processor that turn a batch of images (and optional captions) into dense captions.

    ``image_aspect`` is ``pad`` (square canvas of the processor's mean colour, the whole image seen) or ``crop``
    (the processor's centre crop).
    """

    def __init__(
        self, name_or_path: str, max_new_tokens: int, dtype: str = "auto", device: str | None = None,
        image_aspect: str = "pad",
    ):
        if image_aspect not in IMAGE_ASPECTS:
            raise ValueError(f"image_aspect={image_aspect!r}: choose one of {', '.join(IMAGE_ASPECTS)}")
        self.image_aspect = image_aspect
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = _torch_dtype(dtype, self.device)
        self.max_new_tokens = max_new_tokens
        self.processor = load_pretrained(AutoProcessor.from_pretrained, name_or_path, "LLaVA processor")
        self.processor.tokenizer.padding_side = "left"  # generation appends to the right end of every row
        # The image mean as 8-bit RGB (truncated, as LLaVA does): the padding normalises to about zero.
        self.pad_colour = tuple(int(255 * channel) for channel in self.processor.image_processor.image_mean)
        model = load_pretrained(
            LlavaForConditionalGeneration.from_pretrained, name_or_path, "LLaVA captioner", dtype=self.dtype
        )
        self.model = model.to(self.device).eval()

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
    def __call__(self, images: Sequence[Image.Image], captions: Sequence[str | None]) -> list[str]:
        """Greedy dense captions, one per image, decoded from the new tokens only."""
        inputs = self.inputs(images, captions)
        tokens = self.model.generate(
            **inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
            pad_token_id=self.processor.tokenizer.pad_token_id,
        )
        new_tokens = tokens[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in self.processor.batch_decode(new_tokens, skip_special_tokens=True)]


def recaption(
    source: str,
    out_dir: str | Path,
    *,
    model: str = DEFAULT_LLAVA,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    seed_with_caption: bool = True,
    dtype: str = "auto",
    device: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    image_aspect: str = "pad",
) -> dict[str, Any]:
    """Write a dense-captioned copy of this rank's shards of ``source`` to ``out_dir``; returns the run's summary.

    ``dtype="auto"`` is bfloat16 on CUDA and float32 otherwise; ``device=None`` picks ``cuda:{rank % gpus}``
    when CUDA is available. ``image_aspect``: see :class:`Captioner`. The model is loaded only if some shard of
    this rank is still to do.
    """
    rank, world_size = process_rank(rank, world_size)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = tar_shards(source)
    if any(shard.parent.resolve() == out_dir.resolve() for shard in shards):
        raise ValueError(f"{out_dir}: the output folder must not be the source folder")
    mine = share(shards, rank, world_size)
    todo = [shard for shard in mine if not (out_dir / shard.name).is_file()]
    device = device or process_device(rank)

    skipped: Counter[str] = Counter()
    tar_errors: Counter[str] = Counter()
    captioned = 0
    if todo:
        captioner = Captioner(model, max_new_tokens, dtype, device, image_aspect)
        with tqdm(desc=f"recaption rank {rank}", unit="sample", disable=not progress) as bar:
            for shard in todo:
                n = _recaption_shard(
                    shard, out_dir, captioner, batch_size, seed_with_caption, skipped, tar_errors, bar
                )
                captioned += n
                log.info("%s: %d samples captioned", shard.name, n)

    summary = {
        "shards_done": len(todo),
        "shards_already_done": len(mine) - len(todo),
        "samples_captioned": captioned,
        "samples_skipped": dict(sorted(skipped.items())),
        "tar_errors": dict(sorted(tar_errors.items())),
        "model": model,
        "prompt": PROMPT,
        "seeded_prompt": SEEDED_PROMPT if seed_with_caption else None,
        "image_aspect": image_aspect,
        "rank": rank,
        "world_size": world_size,
        "seconds": round(time.perf_counter() - start, 2),
    }
    name = "caption-manifest.json" if world_size == 1 else f"caption-manifest-rank{rank}.json"
    write_json_atomic(out_dir / name, summary)
    if rank == 0:
        _copy_dataset_manifest(shards[0].parent, out_dir)
    log.info("recaption summary: %s", json.dumps(summary))
    return summary


def _recaption_shard(
    shard: Path, out_dir: Path, captioner: Captioner, batch_size: int, seed_with_caption: bool,
    skipped: Counter[str], tar_errors: Counter[str], bar: tqdm,
) -> int:
    """Caption one shard into ``out_dir/<shard name>`` (renamed into place when complete); returns samples written."""
    partial = out_dir / f".{shard.name}.{os.getpid()}.partial"
    written, errors_before = 0, tar_errors.total()
    with TarWriter(str(partial), encoder=False) as sink:
        for batch in batched(_readable(shard, skipped, tar_errors), batch_size):
            samples, images = zip(*batch, strict=True)
            captions = [caption_text(s, "txt", {}) if seed_with_caption else None for s in samples]
            for sample, dense in zip(samples, captioner(images, captions), strict=True):
                bar.update()
                if not dense:
                    skipped["empty dense caption"] += 1
                    continue
                sink.write({**_members(sample), DENSE_KEY: dense.encode("utf-8")})
                written += 1
    if written == 0 and tar_errors.total() > errors_before:  # unreadable, not empty: leave it to a rerun
        partial.unlink()
        raise DataError(f"{shard}: could not be read; fix it and run the same command again")
    os.replace(partial, out_dir / shard.name)
    return written


def _readable(
    shard: Path, skipped: Counter[str], tar_errors: Counter[str]
) -> Iterator[tuple[dict[str, Any], Image.Image]]:
    """Raw samples of a shard with their decoded RGB image; the others are counted in ``skipped`` by reason.

    A read error (e.g. a truncated tar) ends the shard. The sample being assembled at that moment may be missing
    members, so it is dropped too rather than written incomplete.
    """
    def handler(err: Exception) -> bool:
        log.warning("%s: %s", shard, err)
        tar_errors[type(err).__name__] += 1
        return True

    errors_before = tar_errors.total()
    for sample in tarfile_samples([{"url": str(shard)}], handler=handler):
        if tar_errors.total() > errors_before:
            errors_before = tar_errors.total()
            skipped["incomplete (tar read error)"] += 1
            continue
        ext = image_member(sample)
        if ext is None:
            skipped["no image"] += 1
            continue
        try:
            image = open_image(sample[ext])
        except Exception as err:  # PIL raises several types for bad bytes (UnidentifiedImageError, OSError, ...)
            log.warning("%s: skipped sample %s: %s", shard, sample["__key__"], err)
            skipped["undecodable image"] += 1
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
