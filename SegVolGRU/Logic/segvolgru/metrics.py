"""The CVPR 2025 SegFM challenge's scores: Dice, normalised surface Dice, and their click-AUC per case.

Masks and label maps are numpy arrays in (K, J, I) = (D, H, W) order; spacing is in millimetres per array
axis, in the same order.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from segvolgru.errors import InputError
from segvolgru.validation import validate_spacing

CHALLENGE_CLICKS = 5
NSD_MIN_DSC = 0.2


def as_mask_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Check that a prediction and its ground truth are 3-D (K, J, I) arrays of one shape (shared with clicks)."""
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.ndim != 3 or pred.shape != gt.shape:
        raise InputError(
            f"prediction {pred.shape} and ground truth {gt.shape} must be 3-D (K, J, I) arrays of one shape: "
            "pass a prediction and the ground truth of the same volume")
    return pred, gt


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice 2|A∩B| / (|A| + |B|) of two binary (K, J, I) masks (non-zero is foreground), in [0, 1].

    Two empty masks agree perfectly and score 1.0 (the formula alone would be 0/0).
    """
    pred, gt = as_mask_pair(pred, gt)
    pred = pred != 0
    gt = gt != 0
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, gt).sum()) / total


def _surface(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Exposed face area (mm²) of each voxel of ``mask``: 0 inside and outside, > 0 on its 6-connected border.

    A face is exposed when its neighbour across it is background or beyond the array, so a mask touching
    the volume's edge has surface there, as in the challenge's zero-padded surface computation.
    """
    padded = np.pad(mask, 1)
    inner = (slice(1, -1),) * 3
    area = np.zeros(mask.shape, dtype=np.float64)
    face_area = (spacing[1] * spacing[2], spacing[0] * spacing[2], spacing[0] * spacing[1])
    for axis in range(3):
        for neighbour in (slice(0, -2), slice(2, None)):
            index = list(inner)
            index[axis] = neighbour
            area += (mask & ~padded[tuple(index)]) * face_area[axis]
    return area


def surface_dice(pred: np.ndarray, gt: np.ndarray, spacing_mm: Sequence[float],
                 tolerance_mm: float = 2.0) -> float:
    """Normalised surface Dice (NSD) of two binary (K, J, I) masks at ``tolerance_mm``, in [0, 1].

    The fraction of the two surfaces' total area that lies within ``tolerance_mm`` (inclusive) of the
    other surface, with ``spacing_mm`` the voxel size (mm) per axis (K, J, I). Both empty score 1.0, one
    empty 0.0.

    The challenge uses DeepMind's surface-distance code, whose surface elements sit on the voxel-corner
    grid with marching-cubes areas. This approximation uses voxels instead: a surface element is a border
    voxel (one with a background 6-neighbour), weighted by the area of its exposed faces, and distances are
    between border voxel centres (an EDT with ``sampling=spacing``). Axis-aligned flat surfaces get the same
    area as DeepMind's; oblique ones get the staircase area (up to sqrt(3) times more), and distances can
    differ by up to half a voxel per axis because the two codes place surface elements differently.
    """
    pred, gt = as_mask_pair(pred, gt)
    spacing = validate_spacing(spacing_mm)
    pred = pred != 0
    gt = gt != 0
    if not pred.any() and not gt.any():
        return 1.0
    if not pred.any() or not gt.any():
        return 0.0
    # Both surfaces lie inside the union's bounding box, so nearest-surface distances need nothing beyond it.
    region = ndimage.find_objects((pred | gt).astype(np.uint8))[0]
    pred_area = _surface(pred[region], spacing)
    gt_area = _surface(gt[region], spacing)
    to_gt = ndimage.distance_transform_edt(gt_area == 0, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(pred_area == 0, sampling=spacing)
    close = pred_area[to_gt <= tolerance_mm].sum() + gt_area[to_pred <= tolerance_mm].sum()
    return float(close / (pred_area.sum() + gt_area.sum()))


def challenge_auc(values: Sequence[float]) -> float:
    """The challenge's area under a per-step score curve, in [0, 4] for scores in [0, 1].

    The trapezoid rule over the LAST five values only (clicks 1..5 at x = 0..4):
    0.5*m1 + m2 + m3 + m4 + 0.5*m5. The box step, when present, comes before them and is left out.
    """
    if len(values) < CHALLENGE_CLICKS:
        raise InputError(
            f"the click AUC needs the scores of {CHALLENGE_CLICKS} click steps, got {len(values)} values: "
            f"run all {CHALLENGE_CLICKS} clicks before scoring")
    m = [float(v) for v in values[-CHALLENGE_CLICKS:]]
    return 0.5 * m[0] + m[1] + m[2] + m[3] + 0.5 * m[4]


def _case_classes(gt: np.ndarray, classes: Sequence[int] | None) -> list[int]:
    present = [int(c) for c in np.unique(gt) if c != 0]
    if classes is None:
        chosen = present
    else:
        chosen = [int(c) for c in classes]
        absent = sorted(set(chosen) - set(present))
        if absent:
            raise InputError(
                f"classes {absent} do not occur in the ground truth: the challenge scores only classes "
                f"present there ({present}); drop them or pass classes=None")
    if not chosen:
        raise InputError("the ground truth has no foreground class to score: check the label map")
    return chosen


def _step_scores(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, float, float],
                 classes: list[int]) -> tuple[float, float]:
    pred, gt = as_mask_pair(pred, gt)
    dsc = float(np.mean([dice(pred == c, gt == c) for c in classes]))
    if dsc <= NSD_MIN_DSC:
        return dsc, 0.0
    return dsc, float(np.mean([surface_dice(pred == c, gt == c, spacing) for c in classes]))


def case_scores(preds_per_step: Sequence[np.ndarray], gt: np.ndarray, spacing: Sequence[float],
                classes: Sequence[int] | None = None, has_box: bool = True) -> dict[str, Any]:
    """The challenge's scores of one multi-class case over its interaction steps.

    ``preds_per_step`` holds (K, J, I) label maps of class ids, one per model run: the box step first when
    ``has_box``, then at least five click steps. ``gt`` is the (K, J, I) label map, ``spacing`` the voxel
    size (mm) per axis (K, J, I), ``classes`` the labels to score (None: every non-zero label of ``gt``;
    each given label must occur there).

    Per step, DSC is the mean Dice over ``classes``; NSD is the mean surface Dice at 2 mm, computed only
    when that step's DSC exceeds 0.2 and 0.0 otherwise. A case without a box scores 0.0 at the box step.

    Returns a dict: ``dsc_per_step`` and ``nsd_per_step``, lists of floats of length 1 + number of clicks
    (index 0 the box step, index t click t); ``dsc_auc`` and ``nsd_auc``, ``challenge_auc`` of those lists
    (the last five clicks, in [0, 4]); ``dsc_final`` and ``nsd_final``, the values after the last click.
    """
    gt = np.asarray(gt)
    spacing_mm = validate_spacing(spacing)
    labels = _case_classes(gt, classes)
    n_clicks = len(preds_per_step) - (1 if has_box else 0)
    if n_clicks < CHALLENGE_CLICKS:
        raise InputError(
            f"got {len(preds_per_step)} predictions ({'box step and ' if has_box else ''}{n_clicks} click "
            f"steps): the challenge scores {CHALLENGE_CLICKS} clicks; pass a prediction for each")
    steps = [_step_scores(pred, gt, spacing_mm, labels) for pred in preds_per_step]
    if not has_box:
        steps.insert(0, (0.0, 0.0))
    dsc = [s[0] for s in steps]
    nsd = [s[1] for s in steps]
    return {
        "dsc_per_step": dsc,
        "nsd_per_step": nsd,
        "dsc_auc": challenge_auc(dsc),
        "nsd_auc": challenge_auc(nsd),
        "dsc_final": dsc[-1],
        "nsd_final": nsd[-1],
    }
