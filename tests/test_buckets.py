"""Aspect-ratio bucket tables: the paper's (diffusers') tables, rounding to a granularity, nearest-bucket lookup."""

import pytest
from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha as official

from pixart_lightning.data.buckets import (
    PIXART_1024_SIZES,
    bucket_table,
    nearest_bucket,
    ratio_key,
    ratios_between,
)

# diffusers ships the official inference tables: the 40 training buckets less these seven extreme ratios.
NOT_IN_DIFFUSERS = [0.26, 0.27, 2.89, 3.11, 3.62, 3.75, 3.88]
PAPER = [
    (1024, 64, official.ASPECT_RATIO_1024_BIN),
    (512, 32, official.ASPECT_RATIO_512_BIN),
    (256, 16, official.ASPECT_RATIO_256_BIN),
]


@pytest.mark.parametrize(("base", "granularity", "reference"), PAPER)
def test_paper_tables_match_diffusers(base, granularity, reference):
    """At 1024/512/256 px the table has the 40 paper buckets; the 33 diffusers knows are identical to its own."""
    table = bucket_table(base, granularity)
    shared = {key: table[key] for key in sorted(table) if key not in NOT_IN_DIFFUSERS}
    assert len(table) == 40
    assert shared == {float(k): (int(h), int(w)) for k, (h, w) in reference.items()}
    assert list(map(str, shared)) == list(reference)  # the very key strings, in the same order
    assert sorted(set(table) - set(shared)) == NOT_IN_DIFFUSERS
    assert table == {key: (h * base // 1024, w * base // 1024) for key, (h, w) in bucket_table(1024, 64).items()}


def test_paper_extremes_and_square():
    """The anchors quoted in the paper's table, and keys that are exactly ratio_key of their sizes."""
    table = bucket_table(1024, 64)
    assert table[0.25] == (512, 2048) and table[0.5] == (704, 1408) and table[1.0] == (1024, 1024)
    assert table[2.0] == (1408, 704) and table[4.0] == (2048, 512)
    assert list(table.values()) == list(PIXART_1024_SIZES)
    assert all(ratio_key(h, w) == key for key, (h, w) in table.items())
    assert bucket_table(512, 32)[0.26] == (256, 992) and bucket_table(256, 16)[3.88] == (496, 128)


@pytest.mark.parametrize(("base", "granularity"), [(48, 4), (64, 16), (64, 8), (256, 32), (1024, 128), (96, 8)])
def test_sides_are_multiples_of_granularity(base, granularity):
    """Every side is a positive multiple of the granularity; sizes and keys are unique; keys are true ratios."""
    table = bucket_table(base, granularity)
    sizes = list(table.values())
    assert all(side % granularity == 0 and side >= granularity for size in sizes for side in size)
    assert len(set(sizes)) == len(sizes) and table[1.0] == (base, base)
    assert all(ratio_key(h, w) == key for key, (h, w) in table.items())
    assert list(table) == sorted(table)
    # Rounding moves each side by at most granularity / 2 from a paper size scaled to 0.90-1.00 x base² pixels.
    half = granularity / 2
    assert all((h - half) * (w - half) <= base**2 <= (h + half) * (w + half) / 0.9 for h, w in sizes)


DEMO_48_BY_4 = {
    0.25: (24, 96), 0.26: (24, 92), 0.27: (24, 88), 0.33: (28, 84), 0.35: (28, 80), 0.42: (32, 76), 0.44: (32, 72),
    0.47: (32, 68), 0.5: (32, 64), 0.56: (36, 64), 0.6: (36, 60), 0.71: (40, 56), 0.79: (44, 56), 0.85: (44, 52),
    0.92: (44, 48), 1.0: (48, 48), 1.09: (48, 44), 1.18: (52, 44), 1.27: (56, 44), 1.4: (56, 40), 1.67: (60, 36),
    1.78: (64, 36), 2.12: (68, 32), 2.25: (72, 32), 2.38: (76, 32), 2.86: (80, 28), 3.0: (84, 28), 3.67: (88, 24),
    3.83: (92, 24), 4.0: (96, 24),
}  # fmt: skip


def test_demo_table_48_by_4():
    """The demo's 48 px, patch 4 table: square 48 x 48, extremes at 1:4 and 4:1; 10 paper sizes collapse."""
    table = bucket_table(48, 4)
    assert table == DEMO_48_BY_4
    assert table[1.0] == (48, 48)
    assert min(table) == 0.25 and table[0.25] == (24, 96)
    assert max(table) == 4.0 and table[4.0] == (96, 24)


@pytest.mark.parametrize(
    ("height", "width", "key"),
    [
        (1024, 1024, 1.0),
        (1000, 1500, 0.68),
        (1200, 900, 1.29),
        (2000, 1000, 2.0),
        (1080, 1920, 0.57),
        (100, 1000, 0.25),
        (5000, 10, 4.0),
    ],
)
def test_nearest_bucket_picks_by_ratio(height, width, key):
    """The nearest key by |ratio - h / w|, whatever the image's absolute size."""
    table = bucket_table(1024, 64)
    assert nearest_bucket(height, width, table) == (key, table[key])
    assert nearest_bucket(height * 3, width * 3, bucket_table(256, 16))[0] == key


def test_nearest_bucket_tie_takes_first():
    """A ratio exactly halfway between two keys takes the smaller one, as min() over the table does officially."""
    assert nearest_bucket(3, 4, {0.5: (2, 4), 1.0: (4, 4)}) == (0.5, (2, 4))


def test_ratios_between_selects_a_range():
    """A demo may restrict to ratios 0.5 to 2.0 and still find the nearest allowed bucket."""
    subset = ratios_between(bucket_table(48, 4), 0.5, 2.0)
    assert list(subset) == [key for key in DEMO_48_BY_4 if 0.5 <= key <= 2.0] and 1.0 in subset
    assert min(subset) == 0.5 and max(subset) == 1.78  # 2:1 rounds to 68 x 32, ratio 2.12, outside the range
    assert nearest_bucket(10, 100, subset) == (0.5, (32, 64))
    with pytest.raises(ValueError, match="no bucket"):
        ratios_between(subset, 5.0, 6.0)
    with pytest.raises(ValueError, match="lo"):
        ratios_between(subset, 2.0, 0.5)


@pytest.mark.parametrize(
    ("base", "granularity", "message"),
    [(50, 4, "not a multiple"), (48, 0, "granularity"), (0, 4, "base"), (-64, 16, "base"), (48.0, 4, "base")],
)
def test_bad_base_or_granularity(base, granularity, message):
    """A base that is not a positive multiple of a positive granularity is refused with a clear message."""
    with pytest.raises(ValueError, match=message):
        bucket_table(base, granularity)


def test_nearest_bucket_rejects_bad_input():
    """Non-positive sizes and an empty table are errors, not silent picks."""
    with pytest.raises(ValueError, match="positive"):
        nearest_bucket(0, 10, bucket_table(48, 4))
    with pytest.raises(ValueError, match="empty"):
        nearest_bucket(10, 10, {})
