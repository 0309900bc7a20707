"""User prompts: validation, and their mapping onto the zoom-out grid and into zoom-in windows.

Prompts are voxel indices of the (K, J, I) volume: a box (k0, j0, i0, k1, j1, i1) with inclusive corners, points
(N, 3) as (k, j, i) with labels 1 = positive, 0 = negative. The model's own convention (−1 = padding/ignore) never
reaches the user.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.nn import functional as F

from .errors import InputError
from .preprocessing import nearest_exact_indices

Box = tuple[int, int, int, int, int, int]
EMPTY_BOX: Box = (-1, -1, -1, -1, -1, -1)


def _real_array(values, expected: str) -> np.ndarray:
    """``values`` as float64 when it is an array of real numbers (not strings, None or a ragged list)."""
    try:
        array = np.asarray(values)
    except ValueError:  # ragged
        array = None
    if array is None or (array.size and array.dtype.kind not in "iuf"):
        raise InputError(f"{expected}, got {values!r}")
    return array.astype(np.float64)


def validate_box(box: Sequence[float] | None, shape: Sequence[int]) -> Box | None:
    """Check an inclusive voxel box against a volume shape and return it as ints."""
    if box is None:
        return None
    values = _real_array(box, "a box is six finite voxel indices (k0, j0, i0, k1, j1, i1)").reshape(-1)
    if values.size == 0:
        raise InputError("the box is empty: give six voxel indices (k0, j0, i0, k1, j1, i1) or no box at all")
    if values.size != 6 or not np.all(np.isfinite(values)):
        raise InputError(f"a box is six finite voxel indices (k0, j0, i0, k1, j1, i1), got {list(values)}")
    # compared as floats: a huge corner (1e20) is outside the volume, not an integer overflow
    lo, hi = np.floor(values[:3] + 0.5), np.floor(values[3:] + 0.5)
    inverted = [a for a, l, h in zip("KJI", lo, hi) if h < l]
    if inverted:
        raise InputError(f"the box is inverted on axis {', '.join(inverted)} (max corner below min corner): "
                         f"give (k0, j0, i0, k1, j1, i1) with k0 <= k1, j0 <= j1, i0 <= i1")
    outside = [f"{a} [{l:g}, {h:g}] vs [0, {n - 1}]" for a, l, h, n in zip("KJI", lo, hi, shape) if l < 0 or h >= n]
    if outside:
        raise InputError(f"the box reaches outside the volume of shape {tuple(shape)} on {'; '.join(outside)}: "
                         "clip it to the volume")
    return (*map(int, lo), *map(int, hi))  # type: ignore[return-value]


def validate_points(points, labels, shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Check clicks: (N, 3) voxel indices inside the volume and labels in {0, 1}; returns int64 arrays."""
    if points is None:
        if labels is not None and len(labels):
            raise InputError("point_labels were given without points")
        return np.zeros((0, 3), np.int64), np.zeros((0,), np.int64)
    coords = _real_array(points, "points must be an (N, 3) array of finite (k, j, i) voxel indices")
    if coords.size == 0:
        return np.zeros((0, 3), np.int64), np.zeros((0,), np.int64)
    coords = coords.reshape(-1, 3) if coords.ndim == 1 and coords.size == 3 else coords
    if coords.ndim != 2 or coords.shape[1] != 3 or not np.all(np.isfinite(coords)):
        raise InputError(f"points must be an (N, 3) array of finite (k, j, i) voxel indices, got shape {coords.shape}")
    if labels is None:
        raise InputError("point_labels are required with points: 1 for a positive click, 0 for a negative one")
    lab = np.asarray(labels).reshape(-1)
    if lab.size != coords.shape[0]:
        raise InputError(f"{coords.shape[0]} points but {lab.size} point_labels: give one label per point")
    bad = [int(n) for n in np.flatnonzero(~np.isin(lab, (0, 1)))]
    if bad:
        raise InputError(f"point_labels must be 1 (positive) or 0 (negative); point {bad[0]} has {lab[bad[0]]!r}")
    voxels = np.floor(coords + 0.5)  # checked as floats, so that a huge index cannot wrap around
    inside = np.all((voxels >= 0) & (voxels < np.asarray(shape)), axis=1)
    if not inside.all():
        n = int(np.flatnonzero(~inside)[0])
        raise InputError(f"point {n} at (k, j, i) = ({', '.join(f'{v:g}' for v in voxels[n])}) lies outside the "
                         f"volume of shape {tuple(shape)}: clicks must be inside the image")
    return voxels.astype(np.int64), lab.astype(np.int64)


def box_to_zoom_out(box_crop: Box, crop_shape: Sequence[int], out_shape: Sequence[int]) -> Box:
    """A crop-space box -> the zoom-out grid: per axis the first and last output index whose 'nearest-exact'
    source lies in the box (what rasterising, resizing and taking the bounding box gives). A box thinner than
    the sampling step keeps the output index nearest to its centre instead of vanishing."""
    lo, hi = [], []
    for axis in range(3):
        # The same float32 index rule as the image's zoom-out, so box and image stay voxel-aligned.
        src = nearest_exact_indices(int(crop_shape[axis]), int(out_shape[axis]))
        a, b = box_crop[axis], box_crop[axis + 3]
        hits = np.flatnonzero((src >= a) & (src <= b))
        if hits.size == 0:
            centre = (a + b + 1) / 2 * out_shape[axis] / crop_shape[axis]
            hits = np.array([min(max(int(np.floor(centre)), 0), out_shape[axis] - 1)])
        lo.append(int(hits[0]))
        hi.append(int(hits[-1]))
    return (*lo, *hi)  # type: ignore[return-value]


def points_to_zoom_out(points_crop: np.ndarray, crop_shape: Sequence[int], out_shape: Sequence[int]) -> np.ndarray:
    """Crop-space voxels -> zoom-out voxels: floor((p + 0.5)·S_out/S_in), clipped to the grid. Integer arithmetic,
    so exact ties (e.g. p = 24 of 49 onto 32) round as the formula says rather than as float rounding does."""
    p = np.asarray(points_crop, np.int64)
    out = np.asarray(out_shape, np.int64)
    mapped = ((2 * p + 1) * out) // (2 * np.asarray(crop_shape, np.int64))
    return np.clip(mapped, 0, out - 1)


def clip_box(box: Box, shape: Sequence[int]) -> Box | None:
    """Intersect an inclusive box with [0, shape − 1]; None when they do not meet."""
    lo = [max(box[a], 0) for a in range(3)]
    hi = [min(box[a + 3], shape[a] - 1) for a in range(3)]
    if any(h < l for l, h in zip(lo, hi)):
        return None
    return (*lo, *hi)  # type: ignore[return-value]


def upsample_nearest(grid_map: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """(K, J, I) map -> ``shape`` with torch 'nearest' (the official upsampling of zoom-out maps and logits)."""
    return F.interpolate(grid_map[None, None].float(), size=tuple(int(s) for s in shape), mode="nearest")[0, 0]


def nearest_indices(n_in: int, n_out: int) -> torch.Tensor:
    """Source index of each output index of torch's 'nearest' resize of one axis, computed by torch itself so that
    it matches :func:`upsample_nearest` bit for bit."""
    source = torch.arange(n_in, dtype=torch.float32)[None, None]
    return F.interpolate(source, size=int(n_out), mode="nearest")[0, 0].long()


def upsample_nearest_region(grid_map: torch.Tensor, shape: Sequence[int], region: Sequence[slice]) -> torch.Tensor:
    """``upsample_nearest(grid_map, shape)[region]`` without building the whole upsampled volume."""
    index = [nearest_indices(n, m)[sl] for n, m, sl in zip(grid_map.shape, shape, region)]
    return grid_map.float()[index[0][:, None, None], index[1][None, :, None], index[2][None, None, :]]


def box_cube(box: Box, shape: Sequence[int]) -> torch.Tensor:
    cube = torch.zeros(tuple(shape), dtype=torch.float32)
    cube[box[0]:box[3] + 1, box[1]:box[4] + 1, box[2]:box[5] + 1] = 1
    return cube


def point_map(points: np.ndarray, labels: np.ndarray, shape: Sequence[int]) -> torch.Tensor:
    """Binary map of the positive points only (the official zoom-in prompt map)."""
    out = torch.zeros(tuple(shape), dtype=torch.float32)
    pos = points[labels == 1]
    if len(pos):
        idx = torch.as_tensor(pos, dtype=torch.long)
        out[idx[:, 0], idx[:, 1], idx[:, 2]] = 1
    return out


def box_of(mask: torch.Tensor) -> Box:
    """The official ``generate_box``: inclusive bounding box of mask > 0, or [−1]×6 when empty."""
    nz = torch.nonzero(mask > 0)
    if nz.numel() == 0:
        return EMPTY_BOX
    lo, hi = nz.min(dim=0).values.tolist(), nz.max(dim=0).values.tolist()
    return (*lo, *hi)  # type: ignore[return-value]


def sample_window_points(window_map: torch.Tensor, generator: torch.Generator,
                         extra_positive: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """The official ``select_points`` on a window's positive map: one random positive plus up to
    ``extra_positive`` more (drawn with replacement of the first, as the official), padded with ignored points.
    A window without positives gets one ignored point only."""
    positives = torch.nonzero(window_map > 0.9)
    if len(positives) == 0:
        return np.full((1, 3), -1, np.int64), np.full((1,), -1, np.int64)
    first = positives[torch.randint(len(positives), (1,), generator=generator)]
    extra = positives[torch.randperm(len(positives), generator=generator)[:extra_positive]]
    chosen = torch.cat([first, extra]).numpy().astype(np.int64)
    labels = np.ones(len(chosen), np.int64)
    missing = 1 + extra_positive - len(chosen)
    if missing > 0:
        chosen = np.concatenate([chosen, np.full((missing, 3), -1, np.int64)])
        labels = np.concatenate([labels, np.full((missing,), -1, np.int64)])
    return chosen, labels
