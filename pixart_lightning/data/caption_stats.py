"""Concept density of caption sets, as in PixArt-α's comparison of LAION, LAION-LLaVA and SAM-LLaVA captions.

For each caption column (e.g. the original alt-texts and the dense VLM re-captions of the same images) it counts
nouns with the offline tagger of :mod:`pixart_lightning.data.nouns`: total nouns, distinct nouns (lemmas), valid
distinct nouns (a distinct noun is valid when it occurs more than ``valid_min_count`` times, 10 in the paper, so
typos and one-off names do not inflate the vocabulary), their ratio VN/DN, and nouns per caption.
"""

from __future__ import annotations

import os
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pixart_lightning.data.counts import Counts
from pixart_lightning.data.nouns import nouns
from pixart_lightning.data.samples import caption_text
from pixart_lightning.data.shards import tar_shards
from pixart_lightning.data.sources import complete_samples
from pixart_lightning.files import write_json_atomic

TOP_NOUNS = 20


def caption_statistics(captions: Mapping[str, Iterable[str | None]], valid_min_count: int = 10) -> dict[str, Any]:
    """Per column of ``captions`` (name -> captions): counts, caption lengths and noun statistics.

    A ``None`` or blank caption counts as missing for its column. Lengths are in whitespace-separated words.
    Means and ratios over no captions are ``None``.
    """
    return {name: _column_statistics(texts, valid_min_count) for name, texts in captions.items()}


def _column_statistics(texts: Iterable[str | None], valid_min_count: int) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    lengths: list[int] = []
    missing = 0
    for text in texts:
        if text is None or not text.strip():
            missing += 1
            continue
        lengths.append(len(text.split()))
        counts.update(nouns(text))
    total, distinct = sum(counts.values()), len(counts)
    valid = sum(1 for c in counts.values() if c > valid_min_count)
    top = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:TOP_NOUNS]
    return {
        "captions": len(lengths),
        "missing": missing,
        "words_mean": statistics.fmean(lengths) if lengths else None,
        "words_median": statistics.median(lengths) if lengths else None,
        "total_nouns": total,
        "distinct_nouns": distinct,
        "valid_distinct_nouns": valid,
        "valid_min_count": valid_min_count,
        "valid_ratio": valid / distinct if distinct else None,
        "nouns_per_caption": total / len(lengths) if lengths else None,
        "top_nouns": [[noun, count] for noun, count in top],
    }


def read_captions(
    source: str, keys: Sequence[str] = ("txt", "dense.txt"), skipped: Counts | None = None
) -> dict[str, list[str | None]]:
    """Captions of every sample in webdataset shards, per key: ``{key: [caption or None, ...]}``, samples aligned.

    A sample is the group of tar members ``<name>.<key>`` sharing a name (webdataset splits at the first dot, so
    ``0001.dense.txt`` is key ``dense.txt`` of sample ``0001``). A caption that is absent, empty or not UTF-8 is
    ``None``, which :func:`caption_statistics` counts as missing. A tar cut short gives the samples before the cut
    and is counted in ``skipped``. ``source``: a folder of ``*.tar`` or a brace pattern; raises DataError when it
    names no shard, ValueError when ``keys`` is empty.
    """
    if not keys:
        raise ValueError("read_captions needs at least one caption key, e.g. 'txt'")
    skipped = Counts() if skipped is None else skipped
    captions: dict[str, list[str | None]] = {key: [] for key in keys}
    for shard in tar_shards(source):
        for sample in complete_samples(str(shard), lambda err, shard=shard: skipped.tar_error(str(shard), err)):
            for key in keys:
                captions[key].append(caption_text(sample, key, {}) if key in sample else None)
    return captions


TABLE_COLUMNS = (
    "captions",
    "words/caption",
    "total nouns",
    "distinct nouns",
    "valid distinct (VN/DN)",
    "nouns/caption",
)


def _table_row(s: Mapping[str, Any]) -> list[str]:
    ratio = "-" if s["valid_ratio"] is None else f"{100 * s['valid_ratio']:.1f}%"
    return [
        f"{s['captions']:,}",
        _number(s["words_mean"]),
        f"{s['total_nouns']:,}",
        f"{s['distinct_nouns']:,}",
        f"{s['valid_distinct_nouns']:,} ({ratio})",
        _number(s["nouns_per_caption"]),
    ]


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def format_table(stats: Mapping[str, Mapping[str, Any]], skipped: Counts | None = None) -> str:
    """The statistics as a plain-text table like the paper's: one row per caption column, numbers right-aligned;
    with ``skipped``, a last line saying what could not be read."""
    rows = [["", *TABLE_COLUMNS]] + [[name, *_table_row(s)] for name, s in stats.items()]
    widths = [max(len(cell) for cell in column) for column in zip(*rows)]
    lines = ["  ".join([row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]) for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    thresholds = "/".join(str(t) for t in sorted({s["valid_min_count"] for s in stats.values()}))
    if thresholds:
        lines.append(f"valid: a distinct noun occurring more than {thresholds} times")
    if skipped is not None:
        lines.append(f"skipped: {skipped.summary()}")
    return "\n".join(lines)


def write_statistics(stats: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Write ``stats`` as JSON, atomically: a reader sees the old file or the whole new one, never half of one."""
    write_json_atomic(path, stats)
