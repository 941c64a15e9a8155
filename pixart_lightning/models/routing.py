"""Token-efficient training: a share of each sample's image tokens skips a span of blocks.

Two recipes share this machinery. TREAD (Krause et al., 2025) routes a random share of the tokens past the middle
blocks: they are taken out before block ``start`` and put back, unchanged, before block ``end``, so the first and
last blocks and the loss see every token. Patch masking (MDT, Gao et al. 2023; MicroDiT, Sehwag et al. 2024) drops
the share for the whole network (``start`` 0, ``end`` the depth) and takes the loss on the kept patches only.
Positions are added at the embedding, so a token carries its own through the gather and the scatter. Only training
routes: :class:`~pixart_lightning.models.pixart.PixArt` ignores a route in eval mode.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class TokenRoute:
    """One batch's route: ``kept`` (B, K) holds, in grid order, the tokens that go through blocks start..end-1."""

    kept: Tensor
    start: int
    end: int

    def gather(self, x: Tensor) -> Tensor:
        """(B, T, D) tokens -> the (B, K, D) kept ones."""
        return x.gather(1, self.kept[..., None].expand(-1, -1, x.shape[2]))

    def scatter(self, full: Tensor, kept: Tensor) -> Tensor:
        """The (B, T, D) tokens ``full`` taken out before the span, with the kept ones replaced by their outputs."""
        return full.scatter(1, self.kept[..., None].expand(-1, -1, full.shape[2]), kept)

    def patch_mask(self, grid_h: int, grid_w: int, patch_size: int) -> Tensor:
        """(B, 1, grid_h * p, grid_w * p) float mask of the latent pixels whose patch was kept."""
        B = self.kept.shape[0]
        tokens = self.kept.new_zeros(B, grid_h * grid_w, dtype=bool).scatter(1, self.kept, True)
        grid = tokens.view(B, 1, grid_h, grid_w).float()
        return grid.repeat_interleave(patch_size, dim=2).repeat_interleave(patch_size, dim=3)


@dataclass(frozen=True)
class TokenRouting:
    """A route's recipe: the share ``ratio`` of each sample's tokens that skips blocks ``start`` to ``end - 1``;
    ``masked_loss``: the loss counts only the kept tokens' patches (patch masking)."""

    ratio: float
    start: int
    end: int
    masked_loss: bool = False

    def kept_count(self, tokens: int) -> int:
        """Tokens per sample that go through the span: all but ``int(ratio * tokens)`` (at least 1 for ratio < 1)."""
        return tokens - int(self.ratio * tokens)

    def route(self, scores: Tensor) -> TokenRoute | None:
        """Each sample keeps its K lowest-scored tokens, for (B, T) uniform ``scores``; None when all are kept (the
        plain forward, bit for bit)."""
        tokens = scores.shape[1]
        kept = self.kept_count(tokens)
        if kept == tokens:
            return None
        return TokenRoute(scores.argsort(dim=1)[:, :kept].sort(dim=1).values, self.start, self.end)
