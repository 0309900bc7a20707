"""Deterministic synthetic SegVol weights: the rule the golden reference of the official code was made with.

Per state-dict entry (key, dtype, shape), with a CPU generator seeded by crc32(key): int64 buffers are arange;
the prompt encoder's Gaussian matrix is N(0, 1); LayerNorm-like weights (key contains "norm", plus the decoder's
spatial LayerNorm) are 1 + 0.05·N(0, 1); everything else is 0.02·N(0, 1). Used by the fidelity tests and the
benchmark, so that both run the official configuration without the 700 MB official download.
"""
from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable

import torch

_SPATIAL_LAYERNORM = "mask_decoder.output_upscaling.1.weight"


def synthetic_tensor(key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    if dtype == torch.int64:
        return torch.arange(int(torch.Size(shape).numel()), dtype=torch.int64).reshape(shape)
    if dtype != torch.float32:
        raise ValueError(f"{key}: no synthetic rule for dtype {dtype}")
    noise = torch.randn(shape, generator=generator)
    if key.endswith("positional_encoding_gaussian_matrix"):
        return noise
    if key.endswith(".weight") and ("norm" in key or key == _SPATIAL_LAYERNORM):
        return 1 + 0.05 * noise
    return 0.02 * noise


def synthetic_state_dict(entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]]) -> dict[str, torch.Tensor]:
    return {key: synthetic_tensor(key, dtype, shape) for key, dtype, shape in entries}


def synthetic_state_for(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Synthetic values for every entry of ``model.state_dict()`` (the rule does not depend on order)."""
    return synthetic_state_dict((k, v.dtype, tuple(v.shape)) for k, v in model.state_dict().items())


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """One SHA-256 over keys, dtypes, shapes and bytes, in the dict's order (the golden manifest's hash rule)."""
    digest = hashlib.sha256()
    for key, value in state.items():
        digest.update(key.encode())
        digest.update(str(value.dtype).encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.contiguous().numpy().tobytes())
    return digest.hexdigest()
