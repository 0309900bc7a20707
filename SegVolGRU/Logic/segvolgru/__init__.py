"""SegVolGRU engine: the SegVol network, its inference pipeline and the GRU click correction.

Qt-free and application-free: the Slicer module, the tests and the command line all import it the same way.
Public entry points are imported lazily so that light users (the bridge's geometry helpers, the command
line's ``--help``) do not pay for torch at import.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "SegVolConfig": "segvolgru.config",
    "OFFICIAL_CONFIG": "segvolgru.config",
    "build_model": "segvolgru.network",
    "load_model": "segvolgru.checkpoint",
    "CheckpointError": "segvolgru.checkpoint",
    "save_checkpoint": "segvolgru.checkpoint",
    "preprocess": "segvolgru.preprocessing",
    "Preprocessed": "segvolgru.preprocessing",
    "segment": "segvolgru.inference",
    "SegmentResult": "segvolgru.inference",
    "InteractiveSession": "segvolgru.session",
    "SessionResult": "segvolgru.session",
    "EmbeddingCache": "segvolgru.cache",
    "CorrectionConfig": "segvolgru.correction",
    "InputError": "segvolgru.errors",
    "WeightsError": "segvolgru.errors",
    "resolve_weights": "segvolgru.weights",
    "download_official_weights": "segvolgru.weights",
    "demo_model_path": "segvolgru.demo_model",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'segvolgru' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
