"""Errors raised while reading or converting checkpoints."""

from __future__ import annotations

from ..errors import BadModel


class CheckpointError(BadModel):
    """A checkpoint whose keys or shapes do not match what latentdiff expects."""
