"""The PixArt-α diffusion transformer: one trunk, two conditioning modes.

``mode="class"`` is DiT (Peebles & Xie, 2023): a label embedding added to the timestep embedding
drives a per-block adaLN-Zero MLP. ``mode="text"`` is PixArt-α (Chen et al., 2023): one global
``t_block`` (adaLN-single) plus a learned per-block ``scale_shift_table``, and cross-attention over
projected caption features. Parameter names follow the official checkpoints of both projects, so
their state dicts load by key.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from pixart_lightning.models.config import PixArtConfig

#################################################################################
#                               Embedding layers                                #
#################################################################################


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0, freq_shift: float = 0.0) -> Tensor:
    """Sinusoidal features of scalar ``t`` (B,) -> (B, dim), cosines first."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    args = t.float()[:, None] * torch.exp(-math.log(max_period) * exponent)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    """Scalar -> sinusoid -> MLP, for timesteps and (as ``SizeEmbedder``) micro-conditions."""

    def __init__(self, hidden_size: int, freq_dim: int = 256, freq_shift: float = 0.0):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.freq_dim = freq_dim
        self.freq_shift = freq_shift

    def forward(self, t: Tensor) -> Tensor:
        t_freq = timestep_embedding(t, self.freq_dim, freq_shift=self.freq_shift)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class SizeEmbedder(TimestepEmbedder):
    """Embeds each of k scalars (image h and w, or the aspect ratio) and concatenates them."""

    def forward(self, s: Tensor) -> Tensor:  # (B, k) -> (B, k * hidden)
        return super().forward(s.reshape(-1)).reshape(s.shape[0], -1)


def _drop_mask(batch: int, prob: float, training: bool, force_drop_ids: Tensor | None, device) -> Tensor | None:
    """Which samples get the null condition: forced ids win, else random drops while training."""
    if force_drop_ids is not None:
        return force_drop_ids.to(device=device).bool()
    if training and prob > 0:
        return torch.rand(batch, device=device) < prob
    return None


class LabelEmbedder(nn.Module):
    """Class labels -> vectors; row ``num_classes`` is the null class used for guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        drop = _drop_mask(labels.shape[0], self.dropout_prob, self.training, force_drop_ids, labels.device)
        if drop is not None:
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class Mlp(nn.Module):
    """Linear -> tanh-GELU -> Linear, keyed ``fc1``/``fc2`` as in timm and the official code."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class CaptionEmbedder(nn.Module):
    """Projects caption features to the model width; the null caption is ``y_embedding``.

    The official code keeps ``y_embedding`` as a fixed random buffer (never trained); with
    ``learned=True`` it is a parameter instead. Captions may be shorter than ``num_tokens``
    (features trimmed per batch): a dropped caption takes the first L null tokens and keeps its
    own mask, which is what the official trainer sees for a padded caption.
    """

    def __init__(self, in_channels: int, hidden_size: int, dropout_prob: float, num_tokens: int, learned: bool):
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden_size, hidden_size)
        null = torch.randn(num_tokens, in_channels) / in_channels**0.5
        if learned:
            self.y_embedding = nn.Parameter(null)
        else:
            self.register_buffer("y_embedding", null)
        self.dropout_prob = dropout_prob

    def forward(self, caption: Tensor, force_drop_ids: Tensor | None = None) -> Tensor:
        batch, length, _ = caption.shape
        if length > self.y_embedding.shape[0]:
            raise ValueError(f"caption has {length} tokens; this model takes at most {self.y_embedding.shape[0]}")
        drop = _drop_mask(batch, self.dropout_prob, self.training, force_drop_ids, caption.device)
        if drop is not None:
            null = self.y_embedding[None, :length].to(caption.dtype)
            caption = torch.where(drop[:, None, None], null, caption)
        return self.y_proj(caption)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches of any H x W latent -> tokens, row-major."""

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, H*W/p^2, D)
        return self.proj(x).flatten(2).transpose(1, 2)


#################################################################################
#                                  Attention                                    #
#################################################################################


CPU_MATMUL_ATTENTION = 256 * 256
"""On CPU, attention over at most this many (query, key) pairs per head takes two batched matmuls instead of
torch's fused kernel, which is built for long sequences: 1.5x faster at the demo's 36 tokens, about even at 256,
slower from about 576 on (docs/performance.md)."""

ATTENTION_BACKENDS = ("auto", "flash", "efficient", "cudnn", "math")
"""``auto``: matmuls on CPU for short sequences, else PyTorch's own choice among its fused kernels, except cuDNN
when there is a mask; the others force that one SDPA kernel (an error where it has none for the inputs)."""

_FORCED_SDPA = {
    "flash": [SDPBackend.FLASH_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "math": [SDPBackend.MATH],
}
# cuDNN attention with a padding mask has open bugs (NaN in grad_q at some sequence lengths, pytorch issue
# 196678), and it builds a new graph for every new key length, which masked (caption) attention varies per batch.
# Without a mask auto leaves PyTorch's choice alone, cuDNN included.
_MASKED_AUTO_SDPA = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _sdpa_kernels(backend: str, masked: bool) -> AbstractContextManager:
    """The context that restricts SDPA to the kernels ``backend`` allows."""
    if backend == "auto":
        return sdpa_kernel(_MASKED_AUTO_SDPA) if masked else nullcontext()
    if backend not in _FORCED_SDPA:
        raise ValueError(f"attention backend {backend!r}: valid choices are {', '.join(ATTENTION_BACKENDS)}")
    return sdpa_kernel(_FORCED_SDPA[backend])


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, backend: str = "auto") -> Tensor:
    """softmax(q kᵀ / √d) v for (B, tokens, heads, head_dim) inputs -> (B, N, heads * head_dim).

    ``mask`` (B, M) is 1 where a key may be attended to. ``backend`` is one of ``ATTENTION_BACKENDS``. GPUs take
    PyTorch's fused kernels (flash, memory-efficient, cuDNN), which read this layout as strided views without copies.
    """
    B, N, H, d = q.shape
    M = k.shape[1]
    if backend == "auto" and q.device.type == "cpu" and N * M <= CPU_MATMUL_ATTENTION:
        return _matmul_attention(q, k, v, mask)
    attn_mask = None if mask is None else mask.bool()[:, None, None, :]  # (B, 1, 1, M); True = attend
    with _sdpa_kernels(backend, masked=mask is not None):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask)
    return out.transpose(1, 2).reshape(B, N, H * d)


def _matmul_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """:func:`attention` as two batched matmuls (CPU, short sequences)."""
    B, N, H, d = q.shape
    q, k, v = (t.transpose(1, 2).reshape(B * H, -1, d) for t in (q, k, v))  # heads into the batch
    if mask is None:
        scores = torch.bmm(q, k.transpose(1, 2)).mul_(d**-0.5)
    else:  # the padding's additive bias, broadcast over the queries by baddbmm
        bias = (mask.bool().logical_not() * torch.finfo(q.dtype).min).to(q.dtype).repeat_interleave(H, dim=0)
        scores = torch.baddbmm(bias[:, None], q, k.transpose(1, 2), alpha=d**-0.5)
    out = torch.bmm(scores.softmax(dim=-1), v)  # (B * H, N, d)
    return out.view(B, H, N, d).transpose(1, 2).reshape(B, N, H * d)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused ``qkv`` projection (rows ordered q, k, v)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, backend: str = "auto") -> Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).unbind(2)
        return self.proj(attention(q, k, v, backend=backend))


class CrossAttention(nn.Module):
    """Image tokens attend to caption tokens; ``kv_linear`` rows are ordered k, v."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, y: Tensor, mask: Tensor | None, backend: str = "auto") -> Tensor:
        B, N, D = x.shape
        head_dim = D // self.num_heads
        q = self.q_linear(x).view(B, N, self.num_heads, head_dim)
        k, v = self.kv_linear(y).view(B, y.shape[1], 2, self.num_heads, head_dim).unbind(2)
        return self.proj(attention(q, k, v, mask, backend))


#################################################################################
#                                 Core blocks                                   #
#################################################################################


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x * (1 + scale) + shift, as one pass over x."""
    return torch.addcmul(shift, x, 1 + scale)


class PixArtBlock(nn.Module):
    """Self-attention and MLP under adaptive LayerNorm; text mode adds ungated cross-attention."""

    def __init__(self, cfg: PixArtConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(D, cfg.num_heads)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=cfg.mlp_norm_eps)
        self.mlp = Mlp(D, int(D * cfg.mlp_ratio), D)
        self.text = cfg.mode == "text"
        if self.text:
            self.scale_shift_table = nn.Parameter(torch.empty(6, D))
            self.cross_attn = CrossAttention(D, cfg.num_heads)
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(
        self, x: Tensor, cond: Tensor, y: Tensor | None = None, mask: Tensor | None = None, attention_backend: str = "auto"
    ) -> Tensor:
        """``cond`` is the (B, D) class-mode embedding c, or the (B, 6D) adaLN-single output."""
        B, _, D = x.shape
        if self.text:
            mods = (self.scale_shift_table[None] + cond.view(B, 6, D)).chunk(6, dim=1)  # 6 x (B, 1, D)
        else:
            mods = self.adaLN_modulation(cond)[:, None].chunk(6, dim=2)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        # gated residuals as one pass each: x + gate * f(x)
        x = torch.addcmul(x, gate_msa, self.attn(modulate(self.norm1(x), shift_msa, scale_msa), attention_backend))
        if self.text:
            x = x + self.cross_attn(x, y, mask, attention_backend)
        return torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    """Adaptive LayerNorm then a linear map from tokens to p x p x out_channels patches."""

    def __init__(self, cfg: PixArtConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm_final = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(D, cfg.patch_size**2 * cfg.out_channels)
        self.text = cfg.mode == "text"
        if self.text:
            self.scale_shift_table = nn.Parameter(torch.empty(2, D))
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 2 * D))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        if self.text:
            shift, scale = (self.scale_shift_table[None] + c[:, None]).chunk(2, dim=1)  # (B, 1, D) each
        else:
            shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=2)
        return self.linear(modulate(self.norm_final(x), shift, scale))


#################################################################################
#                                 The backbone                                  #
#################################################################################


class PixArt(nn.Module):
    """PixArt-α / DiT backbone: noisy latent, timestep and condition -> ε and variance values."""

    def __init__(self, cfg: PixArtConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.in_channels, D, cfg.patch_size)
        self.t_embedder = TimestepEmbedder(D, freq_shift=cfg.freq_shift)
        if cfg.mode == "class":
            self.y_embedder = LabelEmbedder(cfg.num_classes, D, cfg.class_dropout_prob)
        else:
            self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
            self.y_embedder = CaptionEmbedder(
                cfg.caption_channels, D, cfg.class_dropout_prob, cfg.max_caption_tokens, cfg.learned_null_caption
            )
            if cfg.micro_conditions:
                self.csize_embedder = SizeEmbedder(D // 3)
                self.ar_embedder = SizeEmbedder(D // 3)
        self.blocks = nn.ModuleList(PixArtBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        self.gradient_checkpointing = False
        # One of ATTENTION_BACKENDS. A setting of the machine that runs the model, not of its weights: kept out of
        # cfg (saved with them, inherited across stage handoffs); the training stage sets it from its config.
        self.attention_backend = "auto"
        self._pos_cache: dict[tuple, Tensor] = {}
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official initialisation of DiT and PixArt-α, zeroing last."""
        cfg, D = self.cfg, self.cfg.hidden_size

        # Linear layers: xavier-uniform weights, zero biases.
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        # The patch projection is initialised like a Linear over the flattened patch.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        # Embedding MLPs: N(0, 0.02).
        embedding_mlps = [self.t_embedder.mlp]
        if cfg.mode == "class":
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        else:
            embedding_mlps += [self.t_block, self.y_embedder.y_proj]
            if cfg.micro_conditions:
                embedding_mlps += [self.csize_embedder.mlp, self.ar_embedder.mlp]
        for mlp in embedding_mlps:
            for layer in mlp.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, std=0.02)
        if cfg.mode == "text":
            # adaLN-single tables start at randn / sqrt(D), as in the official code.
            for table in [b.scale_shift_table for b in self.blocks] + [self.final_layer.scale_shift_table]:
                nn.init.normal_(table, std=D**-0.5)
            nn.init.normal_(self.y_embedder.y_embedding, std=cfg.caption_channels**-0.5)
        # Zero-out: DiT's adaLN-Zero modulation, PixArt's cross-attention output, and the output
        # layer, so a fresh model predicts zeros and each block starts as the identity.
        for block in self.blocks:
            zero = block.cross_attn.proj if cfg.mode == "text" else block.adaLN_modulation[-1]
            nn.init.zeros_(zero.weight)
            nn.init.zeros_(zero.bias)
        if cfg.mode == "class":
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def position_embedding(self, grid_h: int, grid_w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Fixed 2-D sin-cos embedding for a grid_h x grid_w token grid, cached per shape."""
        key = (grid_h, grid_w, device, dtype)
        if key not in self._pos_cache:
            base = self.cfg.sample_size // self.cfg.patch_size
            table = sincos_2d(self.cfg.hidden_size, grid_h, grid_w, base, self.cfg.interpolation_scale)
            self._pos_cache[key] = table.to(device=device, dtype=dtype)[None]
        return self._pos_cache[key]

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        y: Tensor | None = None,
        mask: Tensor | None = None,
        *,
        resolution: Tensor | None = None,
        aspect_ratio: Tensor | None = None,
        force_drop_ids: Tensor | None = None,
    ) -> Tensor:
        """Predict ε (and variance values) for a noisy latent.

        x: (B, C, H, W) latent; t: (B,) timesteps; y: (B,) class labels (class mode; None leaves
        the label out) or (B, L, caption_channels) caption features (text mode); mask: (B, L) 1 for
        real caption tokens; resolution (B, 2) as (h, w) and aspect_ratio (B, 1) when
        ``micro_conditions`` is on; force_drop_ids: (B,) 1 = use the null condition.
        """
        cfg = self.cfg
        B, _, H, W = x.shape
        grid_h, grid_w = H // cfg.patch_size, W // cfg.patch_size
        t = t.expand(B) if t.ndim == 0 else t
        x = self.x_embedder(x) + self.position_embedding(grid_h, grid_w, x.device, x.dtype)  # (B, T, D)
        c = self.t_embedder(t)  # (B, D)
        if cfg.mode == "text":
            if y is None:
                raise ValueError("text mode needs caption features y of shape (B, L, caption_channels)")
            if cfg.micro_conditions:
                if resolution is None or aspect_ratio is None:
                    raise ValueError("this model has micro-conditions: pass resolution (B, 2) and aspect_ratio (B, 1)")
                c = c + torch.cat([self.csize_embedder(resolution), self.ar_embedder(aspect_ratio)], dim=1)
            block_cond = self.t_block(c)  # (B, 6D)
            y = self.y_embedder(y, force_drop_ids)  # (B, L, D)
        else:
            if y is not None:
                c = c + self.y_embedder(y, force_drop_ids)
            block_cond = c
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, block_cond, y, mask, self.attention_backend, use_reentrant=False)
            else:
                x = block(x, block_cond, y, mask, self.attention_backend)
        x = self.final_layer(x, c)  # (B, T, p*p*C_out)
        return unpatchify(x, grid_h, grid_w, cfg.patch_size, cfg.out_channels)


CAPTION_LENGTH_MULTIPLE = 16
"""Trimmed captions keep a multiple of this many columns, so that the few distinct key lengths compile and plan
attention kernels once each rather than once per batch."""


def trim_caption_padding(y: Tensor, mask: Tensor | None, limit: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Cut or pad the caption columns to the batch's longest caption rounded up to a multiple of
    ``CAPTION_LENGTH_MULTIPLE``, at most ``limit`` (default: the present width); no mask at all if no padding is
    left. The loader pads each batch to its own longest caption, so without the padding up every length from 1
    to 120 would reach the attention kernels.

    Masked tokens contribute nothing to cross-attention, so this changes no output, but it spares the K/V
    projections and attention the padding, and a missing mask lets attention take its fastest kernel. It reads
    the mask's values, so call it where the mask is on the host (a device mask would stall the GPU here).
    """
    if mask is None:
        return y, None
    used = mask.bool().any(dim=0).nonzero()
    longest = int(used.max()) + 1 if len(used) else 1
    width = mask.shape[1]
    keep = min(math.ceil(longest / CAPTION_LENGTH_MULTIPLE) * CAPTION_LENGTH_MULTIPLE, limit or width)
    if keep > width:  # masked zero columns: they change no output
        y = torch.nn.functional.pad(y, (0, 0, 0, keep - width))
        mask = torch.nn.functional.pad(mask, (0, keep - width))
    y, mask = y[:, :keep], mask[:, :keep]
    return (y, None) if bool(mask.bool().all()) else (y, mask)


def unpatchify(x: Tensor, grid_h: int, grid_w: int, p: int, channels: int) -> Tensor:
    """(B, grid_h*grid_w, p*p*C) -> (B, C, grid_h*p, grid_w*p)."""
    x = x.reshape(x.shape[0], grid_h, grid_w, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], channels, grid_h * p, grid_w * p)


#################################################################################
#                          Sine/cosine position embedding                       #
#################################################################################


def sincos_2d(dim: int, grid_h: int, grid_w: int, base_size: int, interpolation_scale: float) -> Tensor:
    """(grid_h*grid_w, dim) table: first half encodes the column, second half the row.

    Coordinates are stretched so that any grid spans the extent of the ``base_size`` grid, then
    divided by ``interpolation_scale`` (PixArt's "lewei scale").
    """
    rows = torch.arange(grid_h, dtype=torch.float64) / (grid_h / base_size) / interpolation_scale
    cols = torch.arange(grid_w, dtype=torch.float64) / (grid_w / base_size) / interpolation_scale
    row, col = torch.meshgrid(rows, cols, indexing="ij")
    return torch.cat([sincos_1d(dim // 2, col.reshape(-1)), sincos_1d(dim // 2, row.reshape(-1))], dim=1).float()


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """(M,) positions -> (M, dim): sines then cosines at frequencies 1e4^(-k/(dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = pos[:, None] * omega[None]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
