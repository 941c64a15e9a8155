"""FID's image features: clean-fid's resize, then Inception-v3 from a local file or the offline tiny extractor.

Every image, real or generated, is centre-cropped to a square and resized with clean-fid's "clean" resizer
(PIL bicubic on float channels, no quantisation). Inception's weights are never downloaded during a run.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from cleanfid.downloads_helper import inception_url
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import make_resizer
from torch import Tensor, nn

from pixart_lightning.config import FIDSection
from pixart_lightning.evaluation.errors import FIDError
from pixart_lightning.files import sha256

INCEPTION_FILE = "inception-2015-12-05.pt"
DEFAULT_INCEPTION = Path("~/.cache/pixart-lightning") / INCEPTION_FILE
RESIZE_METHOD = "centre crop to a square, then clean-fid's clean resize (PIL bicubic on float32 channels)"


def protocol_resize(images: Tensor, size: int) -> Tensor:
    """uint8 (B, 3, H, W) -> float32 (B, 3, size, size) in 0..255: centre square, then clean-fid's clean resize."""
    resize = make_resizer("PIL", False, "bicubic", (size, size))
    out = []
    for image in images:
        h, w = image.shape[1:]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = image[:, top : top + side, left : left + side]
        out.append(torch.from_numpy(resize(square.permute(1, 2, 0).numpy())).permute(2, 0, 1))
    return torch.stack(out)


class TinyFeatures(nn.Module):
    """A hand-made, weight-free extractor for offline runs (83 features), meaningful on the shapes world.

    Inception needs a 95 MB download, and random conv features barely tell a clean shape from noise. These
    are classic image descriptors computed on the image pooled to 32 x 32 (so any resolution maps alike):

    - colour layout: the mean colour of a 4 x 4 grid (48) — where which colour is;
    - palette histogram: fraction of pixels in each cell of a 3 x 3 x 3 RGB grid (27) — clean flat
      colours versus the muddy mixtures of an undertrained model;
    - edge statistics at two scales: mean colour gradient and the fraction of gradients above 0.05, 0.2
      and 0.5 (8) — sharp shape outlines versus noise or blur.

    Features are scaled by 10 so FIDs read in tens to hundreds like Inception's; they are not comparable.
    """

    identity = "tiny-v1"  # part of the reference cache key: change it when the features change
    dim = 48 + 27 + 8
    scale = 10.0

    def forward(self, x: Tensor) -> Tensor:
        x = F.adaptive_avg_pool2d(x / 255.0, 32).clamp(0, 1)
        layout = F.adaptive_avg_pool2d(x, 4).flatten(1)
        cells = (x * 2).round().long()
        code = cells[:, 0] * 9 + cells[:, 1] * 3 + cells[:, 2]
        palette = F.one_hot(code.flatten(1), 27).float().mean(1)
        edges = []
        for level in (x, F.avg_pool2d(x, 2)):
            grads = torch.cat([(level[..., 1:] - level[..., :-1]).abs().amax(1).flatten(1),
                               (level[..., 1:, :] - level[..., :-1, :]).abs().amax(1).flatten(1)], 1)
            edges += [grads.mean(1)] + [(grads > t).float().mean(1) for t in (0.05, 0.2, 0.5)]
        return torch.cat([layout, palette, torch.stack(edges, 1)], 1) * self.scale


def inception_file(setting: str = "") -> Path:
    """The local Inception weights: the configured file (or its folder), else the default places."""
    if setting:
        path = Path(setting).expanduser()
        candidates = [path / INCEPTION_FILE if path.is_dir() else path]
    else:
        candidates = [DEFAULT_INCEPTION.expanduser(), Path(tempfile.gettempdir()) / INCEPTION_FILE]
    for path in candidates:
        if path.is_file():
            if path.name != INCEPTION_FILE:
                raise FIDError(f"{path}: clean-fid loads the Inception weights by name; rename it to {INCEPTION_FILE}")
            return path
    raise FIDError(
        f"FID's Inception-v3 weights are not at {' or '.join(map(str, candidates))}, and are never downloaded "
        f"during a run. On a machine with internet: curl -L -o {INCEPTION_FILE} {inception_url} (95 MB), copy "
        f"the file to {DEFAULT_INCEPTION} or set fid.inception_weights=/path/to/{INCEPTION_FILE}. "
        "Offline, fid.extractor=tiny uses a hand-made extractor instead (not comparable to published FIDs).")


@dataclass
class FeatureExtractor:
    """The protocol's resize plus a network: uint8 images of any size in, float64 features out."""

    module: nn.Module
    name: str
    identity: str
    """Names the exact features (weights hash included) in cache keys and records."""
    dim: int
    resize: int
    device: torch.device

    def __call__(self, images: Tensor) -> np.ndarray:
        """Features (B, dim) of uint8 images (B, 3, H, W)."""
        return self.resized_features(protocol_resize(images, self.resize))

    @torch.no_grad()
    def resized_features(self, resized: Tensor) -> np.ndarray:
        """Features of images already through :func:`protocol_resize` (float, 0..255)."""
        return self.module(resized.to(self.device)).double().cpu().numpy()


def load_extractor(settings: FIDSection, device: torch.device | str = "cpu") -> FeatureExtractor:
    """The extractor ``fid.extractor`` names, on ``device``, at ``fid.resize``."""
    device = torch.device(device)
    if settings.extractor == "tiny":
        return FeatureExtractor(TinyFeatures().eval(), "tiny", TinyFeatures.identity, TinyFeatures.dim,
                                settings.resize, device)
    path = inception_file(settings.inception_weights)
    module = InceptionV3W(str(path.parent), download=False).to(device).eval()
    return FeatureExtractor(module, "inception", f"inception-2015-12-05:{sha256(path)[:16]}", 2048,
                            settings.resize, device)
