"""What training has read: samples, the ones the loader skipped (by reason), and where each batch came from."""

from __future__ import annotations

from typing import Any

from pixart_lightning.data.shards import FILTER_REASONS


class TrainingStopped(ValueError):
    """Training cannot go on (too much bad data, non-finite steps in a row); the message is the report."""


class SampleAccount:
    """Adds up, batch by batch, the samples trained on and those skipped; stops with a report when bad ones (skips
    that are not a filter's choice) exceed ``max_bad_fraction`` of all read."""

    def __init__(self, max_bad_fraction: float):
        self.max_bad_fraction = max_bad_fraction
        self.skipped: dict[str, int] = {}
        self.samples_read = 0

    def add(self, batch: dict[str, Any], datamodule: Any = None) -> None:
        """Count the batch; report its data position to ``datamodule``, which saves those of the batches trained
        on in checkpoints."""
        if "position" in batch and datamodule is not None:
            datamodule.record_position(batch["position"])
        for reason, n in batch.get("skipped", {}).items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
        self.samples_read += len(batch["key"])
        bad = sum(n for reason, n in self.skipped.items() if reason not in FILTER_REASONS)
        seen = bad + self.samples_read
        if seen >= 20 * len(batch["key"]) and bad > self.max_bad_fraction * seen:
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items(), key=lambda kv: -kv[1]))
            raise TrainingStopped(
                f"{bad} of {seen} samples read were bad ({bad / seen:.1%} > data.max_bad_fraction="
                f"{self.max_bad_fraction}): {reasons}. The log names each skipped sample's key; fix the "
                "data or raise data.max_bad_fraction, then run the same command to resume")
