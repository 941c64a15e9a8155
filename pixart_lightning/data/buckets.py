"""Aspect-ratio buckets of PixArt-α's multi-scale training: ratio (h / w) -> (height, width) in pixels."""

from __future__ import annotations

from collections.abc import Mapping

BucketTable = dict[float, tuple[int, int]]

# The 40 training buckets of PixArt-α at 1024 px (official ASPECT_RATIO_1024, about 1 MPix, multiples of 64),
# as (height, width) in ascending h / w; the 512 and 256 tables are these halved and quartered. diffusers'
# ASPECT_RATIO_*_BIN are the official *_TEST tables: the same buckets less seven extreme ones (see the tests).
PIXART_1024_SIZES: tuple[tuple[int, int], ...] = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640),
    (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)  # fmt: skip
PIXART_BASE = 1024


def ratio_key(height: int, width: int) -> float:
    """The bucket key of a size: h / w rounded to 2 decimals (reproduces every key of the official tables)."""
    return round(height / width, 2)


def _round_side(side: float, granularity: int) -> int:
    """Nearest multiple of ``granularity`` (halves up), at least ``granularity``."""
    return max(granularity, int(side / granularity + 0.5) * granularity)


def bucket_table(base: int, granularity: int) -> BucketTable:
    """PixArt-α's buckets scaled to about ``base`` x ``base`` pixels, each side a multiple of ``granularity``.

    ``granularity`` is the pixel step a model accepts (patch size x VAE downsampling, e.g. 2 x 8 = 16). For base
    1024, 512 and 256 with a granularity dividing 64, 32 and 16 the scaling is exact: the official tables. Otherwise
    sides are rounded, sizes that collapse onto one are kept once, and every key is its size's own ``ratio_key``
    (so ``nearest_bucket`` compares true ratios); should two sizes share a key, the one nearer base² in area stays.
    """
    if isinstance(base, bool) or not isinstance(base, int) or base <= 0:
        raise ValueError(f"base must be a positive int, got {base!r}")
    if isinstance(granularity, bool) or not isinstance(granularity, int) or granularity <= 0:
        raise ValueError(f"granularity must be a positive int, got {granularity!r}")
    if base % granularity:
        raise ValueError(f"base {base} is not a multiple of granularity {granularity}")
    scale = base / PIXART_BASE
    sizes = dict.fromkeys(
        (_round_side(h * scale, granularity), _round_side(w * scale, granularity)) for h, w in PIXART_1024_SIZES
    )  # ordered and without duplicates
    table: BucketTable = {}
    for h, w in sizes:
        key = ratio_key(h, w)
        kept = table.get(key)
        if kept is None or abs(h * w - base**2) < abs(kept[0] * kept[1] - base**2):
            table[key] = (h, w)
    return dict(sorted(table.items()))


def nearest_bucket(height: int, width: int, table: Mapping[float, tuple[int, int]]) -> tuple[float, tuple[int, int]]:
    """The bucket whose key is nearest ``height / width`` (first of a tie, as in the official code)."""
    if height <= 0 or width <= 0:
        raise ValueError(f"height and width must be positive, got {height} x {width}")
    if not table:
        raise ValueError("empty bucket table")
    key = min(table, key=lambda ratio: abs(ratio - height / width))
    return key, table[key]


def ratios_between(table: Mapping[float, tuple[int, int]], lo: float, hi: float) -> BucketTable:
    """The buckets with ``lo <= key <= hi`` (e.g. 0.5 to 2.0 for a demo that avoids extreme shapes)."""
    if lo > hi:
        raise ValueError(f"empty ratio range: lo {lo} > hi {hi}")
    subset = {key: size for key, size in table.items() if lo <= key <= hi}
    if not subset:
        raise ValueError(f"no bucket has a ratio between {lo} and {hi}")
    return subset
