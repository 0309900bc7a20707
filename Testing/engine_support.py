"""Small models and volumes shared by the engine tests."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from segvolgru.config import TINY_CONFIG
from segvolgru.network import build_model
from segvolgru.synthetic_weights import synthetic_state_for


def tiny_model(correction: dict | None = None, head_std: float = 0.5):
    """A tiny SegVol with the synthetic weights rule (and, optionally, a correction module with a live head)."""
    config = dataclasses.replace(TINY_CONFIG, correction=correction or {})
    model = build_model(config)
    model.load_state_dict(synthetic_state_for(model))
    if model.correction is not None:
        torch.nn.init.normal_(model.correction.head[-1].weight, std=head_std, generator=torch.Generator().manual_seed(1))
    return model


def ct_like(shape=(40, 100, 90), seed: int = 0) -> np.ndarray:
    """int16 HU-like volume: air border, noisy soft tissue and a brighter block."""
    rng = np.random.default_rng(seed)
    volume = rng.normal(0, 20, shape).astype(np.int16)
    volume[:, :5] = -1000
    volume[10:30, 30:70, 20:60] += 300
    return volume
