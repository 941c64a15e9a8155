"""How big each check runs: paper scale on a GPU, tiny on the CPU (every code path, in seconds)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    budget_scale: float
    """Multiplies every check's GPU budget (a loaded 2-core CPU is far slower than its tiny sizes suggest)."""
    compile: bool
    """Run the compiled variants (on a CPU, inductor's C++ build takes minutes: left out)."""
    matmul: int
    """Side of the square bf16 matrix product that measures the practical peak."""
    config: str
    """Config folder of the training-step checks (2, 3, 5)."""
    batch_256: int
    resolution_256: int | None
    caption_channels: int
    """Width of the training checks' caption features: T5-XXL's 4096 on a GPU, the tiny T5's 32 on the CPU."""
    steps: int
    warmup: int
    resolution_512: int | None
    batch_512: int
    fsdp_config: str
    fsdp_model: str | None
    """The runner's model (None: the config's): smaller than XL on a GPU, so its checkpoints (weights, EMA and
    AdamW state, hashed on write and on resume) fit the budget; memory and the batch search use ``search_size``."""
    fsdp_resolution: int
    fsdp_batch: int
    fsdp_images: int
    search_size: str
    search_resolution: int
    search_start: int
    search_limit: int
    numerics_batch: int
    numerics_steps: int
    sample_size: str
    sample_resolution: int
    sample_steps: int
    sample_batch: int
    pipeline_resolution: int
    attention_captions: tuple[int, ...]
    attention_tokens: tuple[int, ...]
    attention_heads: int
    attention_head_dim: int
    chain_steps: tuple[int, int]
    chain_batch: int | None
    chain_images: int
    chain_alignment_prompts: int
    finetune_batch: int
    """Batch of the LoRA-vs-full check, at ``resolution_512`` on ``config``."""
    finetune_steps: int
    distill_resolution: int
    """Side in pixels of check 11's sampling and stage-4 training, on ``sample_size`` and ``config``."""
    distill_sample_batch: int
    distill_batch: int
    distill_steps: int


GPU = Sizes(
    budget_scale=1.0, compile=True, matmul=8192,
    config="configs/pixart-xl2", batch_256=64, resolution_256=256, caption_channels=4096, steps=10, warmup=3,
    resolution_512=512, batch_512=32,
    fsdp_config="configs/pixart-xl2", fsdp_model="PixArt-B/2", fsdp_resolution=256, fsdp_batch=32, fsdp_images=128,
    search_size="PixArt-XL/2", search_resolution=512, search_start=64, search_limit=2048,
    numerics_batch=16, numerics_steps=50,
    sample_size="PixArt-XL/2", sample_resolution=1024, sample_steps=20, sample_batch=4, pipeline_resolution=128,
    attention_captions=(64, 77, 120), attention_tokens=(256, 1024, 4096), attention_heads=16, attention_head_dim=72,
    chain_steps=(100, 200), chain_batch=None, chain_images=2000, chain_alignment_prompts=16,
    finetune_batch=8, finetune_steps=4,
    distill_resolution=512, distill_sample_batch=8, distill_batch=16, distill_steps=5,
)

CPU = Sizes(
    budget_scale=4.0, compile=False, matmul=256,
    config="configs/demo", batch_256=2, resolution_256=None, caption_channels=32, steps=2, warmup=1,
    resolution_512=None, batch_512=2,
    fsdp_config="configs/demo", fsdp_model=None, fsdp_resolution=64, fsdp_batch=2, fsdp_images=8,
    search_size="PixArt-debug/2", search_resolution=64, search_start=1, search_limit=2,
    numerics_batch=2, numerics_steps=3,
    sample_size="PixArt-debug/2", sample_resolution=64, sample_steps=2, sample_batch=2, pipeline_resolution=64,
    attention_captions=(8,), attention_tokens=(16,), attention_heads=2, attention_head_dim=8,
    chain_steps=(2, 2), chain_batch=4, chain_images=64, chain_alignment_prompts=0,
    finetune_batch=2, finetune_steps=2,
    distill_resolution=32, distill_sample_batch=2, distill_batch=2, distill_steps=2,
)
