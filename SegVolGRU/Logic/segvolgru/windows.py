"""Sliding-window geometry of the zoom-in stage: padding of small crops, window starts, stitching.

All shapes and indices are (K, J, I) = (D, H, W) voxels of the ROI crop. Windows follow MONAI's
``dense_patch_slices`` order (axis 0 slowest), with the scan interval of the official SegVol copy of MONAI's
``sliding_window_inference``: int((1 − overlap)·window), or the whole window on an axis whose padded size equals it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.data.utils import dense_patch_slices
from torch.nn import functional as F

Shape3 = tuple[int, int, int]


@dataclass(frozen=True)
class WindowGrid:
    """Where the windows of one ROI crop lie.

    ``pad_before``/``pad_after``: symmetric zero padding that brings a crop smaller than the window up to it
    (diff // 2 before, the rest after). ``starts``: window origins in the padded crop.
    """

    crop_shape: Shape3
    window: Shape3
    pad_before: Shape3
    pad_after: Shape3
    starts: tuple[Shape3, ...]

    @property
    def padded_shape(self) -> Shape3:
        return tuple(c + b + a for c, b, a in zip(self.crop_shape, self.pad_before, self.pad_after))  # type: ignore

    def window_slices(self, index: int) -> tuple[slice, slice, slice]:
        return tuple(slice(s, s + w) for s, w in zip(self.starts[index], self.window))  # type: ignore

    def pad(self, array: torch.Tensor) -> torch.Tensor:
        """Zero-pad a (..., K, J, I) tensor of the crop's shape to the padded shape."""
        pads: list[int] = []
        for before, after in zip(reversed(self.pad_before), reversed(self.pad_after)):
            pads += [before, after]
        return F.pad(array, pads) if any(pads) else array

    def unpad(self, array: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`pad` on the last three axes."""
        return array[(..., *(slice(b, b + c) for b, c in zip(self.pad_before, self.crop_shape)))]

    def windows_containing(self, voxel_kji: Shape3) -> list[int]:
        """Indices of the windows that contain a crop voxel (unpadded coordinates)."""
        padded = [v + b for v, b in zip(voxel_kji, self.pad_before)]
        return [n for n, start in enumerate(self.starts)
                if all(s <= p < s + w for s, p, w in zip(start, padded, self.window))]


def window_grid(crop_shape: Shape3, window: Shape3, overlap: float = 0.5) -> WindowGrid:
    """Windows covering a crop with the given fractional overlap in [0, 1)."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    crop_shape = tuple(int(c) for c in crop_shape)  # type: ignore[assignment]
    diff = [max(w - c, 0) for c, w in zip(crop_shape, window)]
    before = tuple(d // 2 for d in diff)
    after = tuple(d - d // 2 for d in diff)
    padded = [c + d for c, d in zip(crop_shape, diff)]
    interval = [w if p == w else max(int(w * (1 - overlap)), 1) for p, w in zip(padded, window)]
    slices = dense_patch_slices(padded, window, interval)
    starts = tuple(tuple(int(s.start) for s in sl) for sl in slices)
    return WindowGrid(crop_shape, tuple(window), before, after, starts)  # type: ignore[arg-type]


class Stitcher:
    """Constant-weight average of overlapping window logits over the padded crop (the official "constant" blend)."""

    def __init__(self, grid: WindowGrid, device: torch.device | str = "cpu") -> None:
        self.grid = grid
        self.total = torch.zeros(grid.padded_shape, dtype=torch.float32, device=device)
        self.count = torch.zeros(grid.padded_shape, dtype=torch.float32, device=device)

    def add(self, index: int, logits: torch.Tensor) -> None:
        """Add one window's logits (window shape) at window ``index``."""
        sl = self.grid.window_slices(index)
        self.total[sl] += logits.to(self.total.device, torch.float32)
        self.count[sl] += 1.0

    def result(self) -> torch.Tensor:
        """Averaged logits of the crop (padding removed)."""
        return self.grid.unpad(self.total / self.count)


def bounding_box(mask: np.ndarray | torch.Tensor) -> tuple[int, int, int, int, int, int] | None:
    """Inclusive (k0, j0, i0, k1, j1, i1) of the non-zero voxels, or None when there are none."""
    m = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(m.any(axis=other))
        if hits.size == 0:
            return None
        lo.append(int(hits[0]))
        hi.append(int(hits[-1]))
    return (*lo, *hi)  # type: ignore[return-value]
