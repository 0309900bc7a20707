"""The CVPR 2025 SegFM challenge's prompt rules: its simulated corrective click and its box, for one class.

Training and evaluation share these functions so that the clicks a model learns from are the clicks it is
scored with. Volumes are numpy arrays in (K, J, I) = (D, H, W) order; every coordinate is a voxel index
(k, j, i) of that array, and boxes are inclusive on both corners.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from segvolgru.errors import InputError
from segvolgru.metrics import as_mask_pair

# The challenge block-max downsamples the EDT crop above this many voxels (its padded crop, see below) to
# bound memory; below it the EDT is exact.
EDT_DOWNSAMPLE_VOXELS = 6e7

_BOX_KEYS = ("z_min", "z_max", "z_mid", "z_mid_x_min", "z_mid_x_max", "z_mid_y_min", "z_mid_y_max")


@dataclass(frozen=True)
class Click:
    """One click at voxel (k, j, i) of a (K, J, I) volume; ``positive`` marks a foreground click."""

    k: int
    j: int
    i: int
    positive: bool


def _as_mask(mask: np.ndarray, what: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise InputError(f"{what} has shape {mask.shape}, not 3-D (K, J, I): pass one class's binary mask")
    return mask != 0


def _largest_component(error: np.ndarray) -> tuple[np.ndarray, tuple[slice, slice, slice]]:
    """The largest 26-connected component of ``error``, as a boolean crop and its slices in the volume.

    Equal sizes go to the component whose first voxel comes first in C (raster) order: scipy numbers
    components in that order, as cc3d does for the challenge, and argmax keeps the first maximum.
    """
    labels, _ = ndimage.label(error, structure=np.ones((3, 3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    label = int(np.argmax(sizes))
    region = ndimage.find_objects(labels)[label - 1]
    return labels[region] == label, region


def _component_distance(component: np.ndarray) -> np.ndarray:
    """Euclidean distance (voxel units) from each voxel of ``component`` to the nearest voxel outside it.

    ``component`` is the tight crop of the component; voxels outside the crop, including those beyond the
    volume, count as outside, as in the challenge's zero-padded crop. The challenge pads by
    max(int(0.25 * size), 1) per axis; with a mask made of the component alone, any padding of at least one
    voxel gives the same distances, so one voxel is used and the 25 % only decides when to downsample.
    The result has the crop's shape and is 0 outside the component.
    """
    shape = np.array(component.shape)
    padded_size = float(np.prod(shape + 2 * np.maximum((shape * 0.25).astype(int), 1)))
    if padded_size <= EDT_DOWNSAMPLE_VOXELS:
        return ndimage.distance_transform_edt(np.pad(component, 1))[1:-1, 1:-1, 1:-1]
    # 2x block max keeps every component voxel inside a foreground block, so the coarse distances stay
    # >= 1 there; doubling them returns fine-voxel units.
    even = np.pad(component, [(0, s % 2) for s in component.shape])
    coarse = even.reshape(even.shape[0] // 2, 2, even.shape[1] // 2, 2, even.shape[2] // 2, 2).max(axis=(1, 3, 5))
    distance = 2.0 * ndimage.distance_transform_edt(np.pad(coarse, 1))[1:-1, 1:-1, 1:-1]
    for axis in range(3):
        distance = np.repeat(distance, 2, axis=axis)
    k, j, i = component.shape
    return distance[:k, :j, :i] * component


def simulate_click(pred: np.ndarray, gt: np.ndarray, seed: int = 42) -> Click | None:
    """The challenge's next corrective click for one class, or None when ``pred`` equals ``gt``.

    ``pred`` and ``gt`` are binary (K, J, I) masks of one class (non-zero is foreground). The caller
    thresholds probabilities at p > 0.5; the published GRU training code thresholds the raw logit at 0.5
    (p > 0.62), a bug not reproduced here.

    Rule: the error is ``pred != gt``; its largest 26-connected component (ties: first in raster order) is
    distance-transformed, and the click lands on a voxel of maximal distance from the component's border,
    its "centre". Ties between maxima are broken as the challenge does, ``np.random.seed(seed)`` then a
    uniform choice over the maxima listed in C order, here with a private ``np.random.RandomState(seed)``
    so that global numpy state is left alone. The challenge's "use the component when every distance is 0"
    fallback cannot trigger: every component voxel is at distance >= 1.

    Returns a ``Click`` whose (k, j, i) lies in the component, positive (foreground) when ``gt`` is set
    there (under-segmentation), negative otherwise (over-segmentation).
    """
    pred_mask, gt_mask = (m != 0 for m in as_mask_pair(pred, gt))
    error = pred_mask != gt_mask
    if not error.any():
        return None
    component, region = _largest_component(error)
    distance = _component_distance(component)
    maxima = np.argwhere(distance == distance.max())
    chosen = maxima[np.random.RandomState(seed).choice(len(maxima))]
    k, j, i = (int(c + s.start) for c, s in zip(chosen, region))
    return Click(k, j, i, bool(gt_mask[k, j, i]))


def _shift_draw(rng: Any) -> int:
    """The box enlargement s in {0, ..., 5}, drawn with ``rng.integers(0, 6)``.

    An int or None seeds a fresh ``np.random.default_rng``; anything else is used as the generator.
    """
    if rng is None or isinstance(rng, (int, np.integer)):
        rng = np.random.default_rng(rng)
    return int(rng.integers(0, 6))


def challenge_box(gt: np.ndarray, rng: np.random.Generator | int | None = None) -> dict[str, int] | None:
    """The challenge's box dict for one class's binary (K, J, I) mask ``gt``, or None when it is empty.

    Keys (voxel indices, inclusive): ``z_min``/``z_max``, the extent on axis 0; ``z_mid``, the middle entry
    of the sorted unique foreground slice indices (entry len // 2); ``z_mid_y_min``/``z_mid_y_max`` (axis 1,
    J) and ``z_mid_x_min``/``z_mid_x_max`` (axis 2, I), the 2-D bounding box on slice ``z_mid`` enlarged by
    int(s * J / 256) and int(s * I / 256) voxels, s drawn uniformly from {0..5} with ``rng`` (a Generator,
    a seed, or None for fresh entropy), then clipped to the image.

    The challenge's published get_boxes.py takes ``z_mid`` as the middle of all foreground voxels' slice
    indices (weighted by voxel count) rather than of the unique slices; this follows the project's spec.
    """
    mask = _as_mask(gt, "ground truth")
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    if slices.size == 0:
        return None
    z_mid = int(slices[slices.size // 2])
    rows = np.flatnonzero(mask[z_mid].any(axis=1))
    cols = np.flatnonzero(mask[z_mid].any(axis=0))
    _, height, width = mask.shape
    shift = _shift_draw(rng)
    shift_y = int(shift * height / 256)
    shift_x = int(shift * width / 256)
    return {
        "z_min": int(slices[0]),
        "z_max": int(slices[-1]),
        "z_mid": z_mid,
        "z_mid_x_min": max(0, int(cols[0]) - shift_x),
        "z_mid_y_min": max(0, int(rows[0]) - shift_y),
        "z_mid_x_max": min(width - 1, int(cols[-1]) + shift_x),
        "z_mid_y_max": min(height - 1, int(rows[-1]) + shift_y),
    }


def box_dict_to_kji(box: dict[str, Any]) -> tuple[int, int, int, int, int, int]:
    """The inclusive voxel box (k0, j0, i0, k1, j1, i1) that the engine takes, from a challenge box dict.

    (k0, j0, i0, k1, j1, i1) = (z_min, z_mid_y_min, z_mid_x_min, z_max, z_mid_y_max, z_mid_x_max): the
    challenge's z, y, x are array axes 0, 1, 2 = K, J, I.
    """
    missing = [key for key in _BOX_KEYS if key not in box]
    if missing:
        raise InputError(
            f"box dict lacks {', '.join(missing)}: pass one entry of the challenge's 'boxes' list "
            f"(keys {', '.join(_BOX_KEYS)})")
    values = [box[key] for key in ("z_min", "z_mid_y_min", "z_mid_x_min", "z_max", "z_mid_y_max", "z_mid_x_max")]
    if not all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
               and math.isfinite(float(v)) for v in values):
        raise InputError(f"box dict {box} holds values that are not finite numbers: check the case's 'boxes' entry")
    corners = tuple(int(v) for v in values)
    if any(low > high for low, high in zip(corners[:3], corners[3:])) or min(corners) < 0:
        raise InputError(
            f"box {corners} (k0, j0, i0, k1, j1, i1) has a negative index or a minimum above its maximum: "
            "check the box dict against its volume")
    return corners  # type: ignore[return-value]


def mask_to_box_kji(mask: np.ndarray) -> tuple[int, int, int, int, int, int] | None:
    """The tight inclusive bounding box (k0, j0, i0, k1, j1, i1) of a (K, J, I) mask; None when empty."""
    region = ndimage.find_objects(_as_mask(mask, "mask").astype(np.uint8))
    if not region:
        return None
    k, j, i = region[0]
    return k.start, j.start, i.start, k.stop - 1, j.stop - 1, i.stop - 1
