"""SegVol network modules (one part per file; attribute names are the checkpoint format)."""
from __future__ import annotations

from ..config import OFFICIAL_CONFIG, SegVolConfig
from .segvol import SegVol


def build_model(config: SegVolConfig = OFFICIAL_CONFIG) -> SegVol:
    """A freshly initialised SegVol of the given configuration, in eval mode."""
    return SegVol(config).eval()


__all__ = ["SegVol", "build_model"]
