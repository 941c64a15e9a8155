"""What a stage's checkpoint must match to be resumed: the number of processes that wrote it."""

from __future__ import annotations

from typing import Any


class ResumeError(ValueError):
    """A checkpoint that this run cannot continue from as it is configured."""


def record_world_size(checkpoint: dict[str, Any], world_size: int) -> None:
    checkpoint["world_size"] = world_size


def check_world_size(checkpoint: dict[str, Any], world_size: int) -> None:
    """The data position and the per-rank data split depend on the number of processes: refuse another."""
    saved = checkpoint.get("world_size", 1)
    if saved != world_size:
        raise ResumeError(
            f"this stage's checkpoint was written by {saved} processes and this run has {world_size}; "
            f"resume with train.devices x train.num_nodes = {saved}, or delete the stage folder's checkpoints/ "
            "to restart the stage (its parent's weights are not affected)"
        )
