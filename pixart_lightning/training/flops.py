"""Model FLOPs of the PixArt backbone and the peak FLOP/s of known GPUs: the two halves of MFU.

MFU (model FLOPs utilisation) divides the FLOPs the *model* needs per second of training by the
device's peak, so it is comparable across implementations: recomputation under gradient
checkpointing, padding and elementwise work do not count. For PixArt-XL/2 the count gives
0.894 / 3.71 / 19.5 TFLOP per image per training step at 256 / 512 / 1024 px (3x forward, 120
caption tokens), and in class mode it reproduces DiT-XL/2's published 118.6 / 524.5 GMAC forward.
"""

from __future__ import annotations

import torch

from pixart_lightning.encoders.vae import SD_VAE_DOWNSAMPLE
from pixart_lightning.models.config import CAPTION_TOKENS, PixArtConfig
from pixart_lightning.models.routing import TokenRouting

FREQ_DIM = 256
"""Width of the sinusoidal timestep / size features fed to the embedding MLPs."""


def forward_flops(
    cfg: PixArtConfig,
    height_px: int,
    width_px: int,
    vae_factor: int = SD_VAE_DOWNSAMPLE,
    caption_tokens: int = CAPTION_TOKENS,
    routing: TokenRouting | None = None,
) -> float:
    """Matrix-multiply FLOPs (2 per multiply-accumulate) of one forward pass for one image.

    With D the width, T = (h/p)(w/p) image tokens of the h x w latent, L caption tokens, N blocks
    and an MLP of width rD, the multiply-accumulates are:

    - per image token: patch embedding (p²·C_in·D), per block self-attention q/k/v/out (4D²) and
      MLP (2rD²), in text mode also cross-attention q/out (2D²); final linear (D·p²·C_out);
    - attention, per block: QKᵀ and the weighted sum of V, T²·D each; in text mode the same over
      the caption, T·L·D each;
    - per caption token (text mode): the caption projection (C_cap·D + D²) and, per block,
      cross-attention k/v (2D²);
    - per image, once: timestep MLP (256·D + D²) and the modulation — adaLN-single's ``t_block``
      (6D²) in text mode, the per-block adaLN-Zero MLPs (N·6D² + 2D²) in class mode — plus the
      micro-condition MLPs when enabled. These are < 0.1% at 256 px; they are counted for
      completeness.

    Under token ``routing`` (or patch masking) the blocks of its span see only the kept tokens: their
    per-token and attention terms count those, the other blocks' all T.

    Not counted: biases, normalisation, softmax, activations, modulation arithmetic (all
    elementwise), the label lookup, and the frozen VAE and text encoder. ``caption_tokens`` is the
    length the cross-attention sees (the batch's padded caption length); 0 in class mode.
    """
    D, p, N = cfg.hidden_size, cfg.patch_size, cfg.depth
    tokens = (height_px // vae_factor // p) * (width_px // vae_factor // p)
    text = cfg.mode == "text"
    mlp = int(D * cfg.mlp_ratio)
    block_per_token = 4 * D * D + 2 * D * mlp + (2 * D * D if text else 0)

    def block(n: int) -> int:  # one block over n image tokens: projections and MLP, then attention
        return n * block_per_token + 2 * n * n * D + (2 * n * caption_tokens * D if text else 0)

    kept, routed = (routing.kept_count(tokens), routing.end - routing.start) if routing else (tokens, 0)
    blocks = (N - routed) * block(tokens) + routed * block(kept)
    embedding = tokens * (p * p * cfg.in_channels * D + D * p * p * cfg.out_channels)
    per_image = FREQ_DIM * D + D * D
    caption = 0
    if text:
        caption = caption_tokens * (cfg.caption_channels * D + D * D + N * 2 * D * D)
        per_image += 6 * D * D
        if cfg.micro_conditions:  # three scalars (h, w, aspect ratio), each through a D/3-wide MLP
            per_image += 3 * (FREQ_DIM * (D // 3) + (D // 3) ** 2)
    else:
        per_image += N * 6 * D * D + 2 * D * D
    return 2.0 * (embedding + blocks + caption + per_image)


def train_flops_per_image(
    cfg: PixArtConfig,
    height_px: int,
    width_px: int,
    vae_factor: int = SD_VAE_DOWNSAMPLE,
    caption_tokens: int = CAPTION_TOKENS,
    routing: TokenRouting | None = None,
) -> float:
    """Model FLOPs of one training step per image: forward + backward = 3 x forward.

    The backward pass costs two forwards (gradients for activations and for weights); the
    recomputed forward of gradient checkpointing is hardware work, not model work, and is left out.
    """
    return 3.0 * forward_flops(cfg, height_px, width_px, vae_factor, caption_tokens, routing)


PEAK_TFLOPS: dict[str, float] = {
    # Dense (no sparsity) bf16 tensor-core peaks from NVIDIA datasheets; fp16 where bf16 is missing.
    "H100": 989.0,  # SXM ("NVIDIA H100 80GB HBM3")
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H200": 989.0,  # SXM; also matches GH200 (same compute)
    "H200 NVL": 835.0,
    "H800": 989.0,
    "H800 PCIe": 756.0,
    "A100": 312.0,  # SXM and PCIe
    "A800": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10": 125.0,  # A10 datasheet; also matches the A10G
    "V100": 125.0,  # fp16, SXM2
    "V100-PCIE": 112.0,  # fp16
    "V100S": 130.0,  # fp16
    "T4": 65.0,  # fp16
}
"""Peak TFLOP/s per device, keyed by a substring of ``torch.cuda.get_device_name()``; the longest
matching key wins ("A100" over "A10", "H100 PCIe" over "H100"). Add entries for other devices, or
pass a peak to the callback. The peak is the 16-bit one whatever the training precision: MFU is
reported against what the hardware could do in bf16."""


def peak_tflops(device_name: str | None = None) -> float | None:
    """Peak TFLOP/s of the named device (default: the current CUDA device); None if unknown or no GPU."""
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    name = device_name.upper()
    matches = [key for key in PEAK_TFLOPS if key.upper() in name]
    return PEAK_TFLOPS[max(matches, key=len)] if matches else None
