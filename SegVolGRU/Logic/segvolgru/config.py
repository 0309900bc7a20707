"""Model configuration: one dataclass, the official instance and small ones for tests and the demo model.

Sizes are in (D, H, W) = (K, J, I) voxel order, the array order of every volume the engine sees.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SegVolConfig:
    """Hyper-parameters of a SegVol network (and, later, of its correction module).

    ``spatial_size`` is the model input (D, H, W); ``patch_size`` the ViT patch; the image embedding grid is
    their quotient. The decoder upsamples that grid 4x, and its spatial LayerNorm is sized from it, so a
    network only accepts inputs of exactly ``spatial_size``.
    """

    spatial_size: tuple[int, int, int] = (32, 256, 256)
    patch_size: tuple[int, int, int] = (4, 16, 16)
    hidden_size: int = 768
    mlp_dim: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16
    text_tower: bool = True
    clip_vocab_size: int = 49408
    clip_width: int = 512
    clip_layers: int = 12
    clip_heads: int = 8
    clip_mlp_dim: int = 2048
    clip_max_positions: int = 77
    correction: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("spatial_size", "patch_size"):
            value = tuple(int(v) for v in getattr(self, name))
            if len(value) != 3 or min(value) < 1:
                raise ValueError(f"{name} must be three positive integers (D, H, W), got {value}")
            object.__setattr__(self, name, value)
        bad = [a for a, (s, p) in zip("DHW", zip(self.spatial_size, self.patch_size)) if s % p]
        if bad:
            raise ValueError(
                f"spatial_size {self.spatial_size} is not a multiple of patch_size {self.patch_size} "
                f"on axis {', '.join(bad)}: choose sizes whose quotient is an integer")
        if self.hidden_size % self.num_heads or self.hidden_size % self.decoder_heads:
            raise ValueError("hidden_size must be divisible by num_heads and decoder_heads")
        if self.hidden_size % 16:
            raise ValueError("hidden_size must be a multiple of 16 (the decoder uses hidden_size/2, /4 and /8)")

    @property
    def embedding_grid(self) -> tuple[int, int, int]:
        """Image-embedding grid (D/pd, H/ph, W/pw), e.g. (8, 16, 16) officially."""
        return tuple(s // p for s, p in zip(self.spatial_size, self.patch_size))  # type: ignore[return-value]

    @property
    def low_res_size(self) -> tuple[int, int, int]:
        """Decoder output grid: the embedding grid upsampled 4x, e.g. (32, 64, 64) officially."""
        return tuple(4 * g for g in self.embedding_grid)  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["spatial_size"] = list(self.spatial_size)
        data["patch_size"] = list(self.patch_size)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SegVolConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SegVolConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)


OFFICIAL_CONFIG = SegVolConfig()

# Tiny configurations for fast tests: other input and patch sizes, few layers, with and without text.
TINY_CONFIG = SegVolConfig(
    spatial_size=(16, 64, 64), patch_size=(4, 16, 16), hidden_size=64, mlp_dim=128, num_layers=2,
    num_heads=4, decoder_depth=2, decoder_heads=4, decoder_mlp_dim=128, iou_head_hidden_dim=32,
    text_tower=False)
TINY_TEXT_CONFIG = dataclasses.replace(
    TINY_CONFIG, text_tower=True, clip_width=64, clip_layers=1, clip_heads=2, clip_mlp_dim=128)
