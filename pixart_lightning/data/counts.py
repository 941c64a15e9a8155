"""What the data tools leave out, counted one way, and the per-shard statistics that add up across reruns.

``data ingest``, ``caption``, ``stats`` and ``extract`` all count through :class:`Counts` (a reason, how many,
and the first names of each) and read tars through :func:`.sources.complete_samples`, so one event (a truncated
tar, an undecodable image) is counted once and under the same reason by every command. ``caption`` and ``extract``
write each finished shard's statistics beside it (:func:`write_shard_stats`); their manifests add up every
finished shard (:func:`add_up`), so a rerun that finds everything done reports the same totals as the run that
did the work.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pixart_lightning.files import write_json_atomic

log = logging.getLogger(__name__)

NAMES_KEPT = 100
"""Names kept per reason in manifests (the counts themselves are exact)."""
NAMES_SHOWN = 5
"""Names printed per reason in a summary line."""
TAR_UNREADABLE = "unreadable tar data"
STATS_SUFFIX = ".stats.json"


@dataclass
class Counts:
    """Items left out, by reason, with the first ``NAMES_KEPT`` names of each reason."""

    counts: dict[str, int] = field(default_factory=dict)
    names: dict[str, list[str]] = field(default_factory=dict)

    def add(self, reason: str, name: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        kept = self.names.setdefault(reason, [])
        if len(kept) < NAMES_KEPT:
            kept.append(name)
        log.warning("%s: %s", name, reason)

    def tar_error(self, url: str, err: Exception) -> None:
        """A tar that is cut short or cannot be read: one count per tar (the reader stops there)."""
        self.add(f"{TAR_UNREADABLE} ({type(err).__name__})", url)

    @property
    def tar_errors(self) -> int:
        return sum(n for reason, n in self.counts.items() if reason.startswith(TAR_UNREADABLE))

    def fields(self, prefix: str = "skipped") -> dict[str, Any]:
        """The counts as manifest fields: ``{prefix: {reason: n}, prefix_names: {reason: [names]}}``."""
        return {prefix: dict(sorted(self.counts.items())),
                f"{prefix}_names": {reason: self.names[reason] for reason in sorted(self.names)}}

    @classmethod
    def from_fields(cls, record: Mapping[str, Any], prefix: str = "skipped") -> Counts:
        return cls(dict(record.get(prefix, {})), {k: list(v) for k, v in record.get(f"{prefix}_names", {}).items()})

    def summary(self) -> str:
        """One line: ``reason: n (first names, …); …``, or ``none``."""
        if not self.counts:
            return "none"
        parts = []
        for reason, n in sorted(self.counts.items()):
            names = self.names.get(reason, [])[:NAMES_SHOWN]
            more = ", …" if n > len(names) else ""
            parts.append(f"{reason}: {n} ({', '.join(names)}{more})")
        return "; ".join(parts)


def add_up(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The records added into one: numbers summed, dicts added key by key, lists joined (the first ``NAMES_KEPT``),
    anything else (a name, a setting) taken from the last record."""
    total: dict[str, Any] = {}
    for record in records:
        _add_into(total, record)
    return total


def _add_into(total: dict[str, Any], record: Mapping[str, Any]) -> None:
    for key, value in record.items():
        if isinstance(value, Mapping):
            _add_into(total.setdefault(key, {}), value)
        elif isinstance(value, list):
            total[key] = (total.get(key, []) + value)[:NAMES_KEPT]
        elif isinstance(value, int | float) and not isinstance(value, bool):
            total[key] = total.get(key, 0) + value
        else:
            total[key] = value


def stats_path(shard: Path) -> Path:
    """Where an output shard's statistics are written once the shard is complete."""
    return shard.with_suffix(STATS_SUFFIX)


def shard_finished(shard: Path) -> bool:
    """An output shard counts as done once both it and its statistics are there (a rerun skips it)."""
    return shard.is_file() and stats_path(shard).is_file()


def write_shard_stats(shard: Path, stats: Mapping[str, Any]) -> None:
    write_json_atomic(stats_path(shard), stats)


def finished_stats(shards: Iterable[Path]) -> list[dict[str, Any]]:
    """The statistics of the finished ones among ``shards``."""
    return [json.loads(stats_path(s).read_text()) for s in shards if shard_finished(s)]
