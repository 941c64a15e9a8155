"""The PixArt-α diffusion transformer: one trunk, two conditioning modes.

``mode="class"`` is DiT (Peebles & Xie, 2023): a label embedding added to the timestep embedding
drives a per-block adaLN-Zero MLP. ``mode="text"`` is PixArt-α (Chen et al., 2023): one global
``t_block`` (adaLN-single) plus a learned per-block ``scale_shift_table``, and cross-attention over
projected caption features. Parameter names follow the official checkpoints of both projects, so
their state dicts load by key.

The embedders are in :mod:`pixart_lightning.models.layers`, attention in :mod:`pixart_lightning.models.attention`;
this module assembles them into blocks and the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pixart_lightning.models.attention import CrossAttention, SelfAttention
from pixart_lightning.models.config import PixArtConfig
from pixart_lightning.models.layers import (
    CaptionEmbedder,
    LabelEmbedder,
    Mlp,
    PatchEmbed,
    SizeEmbedder,
    TimestepEmbedder,
)
from pixart_lightning.models.routing import TokenRoute

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
        # One of attention.ATTENTION_BACKENDS. A setting of the machine that runs the model, not of its weights: kept
        # out of cfg (saved with them, inherited across stage handoffs); the training stage sets it from its config.
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
        route: TokenRoute | None = None,
    ) -> Tensor:
        """Predict ε (and variance values) for a noisy latent.

        x: (B, C, H, W) latent; t: (B,) timesteps; y: (B,) class labels (class mode; None leaves
        the label out) or (B, L, caption_channels) caption features (text mode); mask: (B, L) 1 for
        real caption tokens; resolution (B, 2) as (h, w) and aspect_ratio (B, 1) when
        ``micro_conditions`` is on; force_drop_ids: (B,) 1 = use the null condition; route: in training
        mode only, the tokens that skip a span of blocks (:mod:`pixart_lightning.models.routing`).
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
        x = self.run_blocks(x, block_cond, y, mask, route if self.training else None)  # inference never routes
        x = self.final_layer(x, c)  # (B, T, p*p*C_out)
        return unpatchify(x, grid_h, grid_w, cfg.patch_size, cfg.out_channels)

    def run_blocks(self, x: Tensor, cond: Tensor, y: Tensor | None, mask: Tensor | None, route: TokenRoute | None) -> Tensor:
        """The transformer blocks over (B, T, D) tokens; the tokens a ``route`` leaves out skip its span unchanged."""
        outside = None  # all T tokens as they entered the routed span
        for i, block in enumerate(self.blocks):
            if route is not None and i == route.start:
                outside, x = x, route.gather(x)
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cond, y, mask, self.attention_backend, use_reentrant=False)
            else:
                x = block(x, cond, y, mask, self.attention_backend)
            if outside is not None and i == route.end - 1:
                x, outside = route.scatter(outside, x), None
        return x


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
        y = F.pad(y, (0, 0, 0, keep - width))
        mask = F.pad(mask, (0, keep - width))
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
