"""Errors raised while reading or converting checkpoints."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint whose keys or shapes do not match what latentdiff expects."""
