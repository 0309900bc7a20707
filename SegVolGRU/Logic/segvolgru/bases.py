"""Base predictions other than SegVol's, for training and measuring the click corrector on any base.

A corrector that travels must not depend on which network produced the probabilities it corrects. These bases
give it predictions with the kinds of errors real models make, from the ground truth (corruption families) or
from the image alone (an intensity threshold inside the box). Each returns logits (float32, the volume's
(K, J, I) shape) that do not react to clicks: whatever changes after a click is the corrector's and the fusion's.

Families:
- ``boundary``: the boundary shifted by 1–4 voxels (eroded or dilated, or moved along one axis);
- ``structural``: holes, a missing part, a false blob nearby, a leak into a touching neighbour;
- ``threshold``: never used in training: inside the box, the voxels on the box centre's side of Otsu's intensity
  threshold, the connected component holding the centre (what a classical tool gives).
Every family is softened into logits by a signed distance at a random temperature.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

BASE_FAMILIES = ("boundary", "structural", "threshold")
TRAINING_FAMILIES = ("boundary", "structural")
_LOGIT_LIMIT = 8.0


def soften(mask: np.ndarray, temperature: float) -> np.ndarray:
    """Logits of a binary mask: the signed distance to its edge (voxels, positive inside) divided by
    ``temperature`` and clipped to ±8, so voxels near the edge are unsure and far ones confident."""
    mask = np.asarray(mask, bool)
    inside = ndimage.distance_transform_edt(mask) if mask.any() else np.zeros(mask.shape)
    outside = ndimage.distance_transform_edt(~mask) if (~mask).any() else np.zeros(mask.shape)
    signed = np.where(mask, inside - 0.5, 0.5 - outside)
    return np.clip(signed / max(float(temperature), 1e-3), -_LOGIT_LIMIT, _LOGIT_LIMIT).astype(np.float32)


def _ball(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) <= radius ** 2


def _boundary_error(gt: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The boundary moved by 1–4 voxels, never more than half the structure's depth, so thin ones survive."""
    depth = float(ndimage.distance_transform_edt(gt).max()) if gt.any() else 1.0
    amount = int(min(rng.integers(1, 5), max(1, depth // 2)))
    kind = rng.integers(3)
    if kind == 1:
        eroded = ndimage.binary_erosion(gt, _ball(amount))
        if eroded.any():
            return eroded
    if kind != 2:
        return ndimage.binary_dilation(gt, _ball(amount))
    axis = int(rng.integers(3))
    return np.roll(gt, amount * (1 if rng.random() < 0.5 else -1), axis=axis)


def _random_voxel(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    where = np.argwhere(mask)
    return None if len(where) == 0 else where[int(rng.integers(len(where)))]


def _sphere_at(shape, centre, radius: float) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2


def _structural_error(gt: np.ndarray, others: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = max(2.0, float(np.cbrt(gt.sum())) / 3)
    pred = gt.copy()
    kind = int(rng.integers(4))
    if kind == 0:  # holes
        for _ in range(int(rng.integers(1, 4))):
            centre = _random_voxel(gt, rng)
            if centre is not None:
                pred &= ~_sphere_at(gt.shape, centre, size * rng.uniform(0.4, 0.8))
    elif kind == 1:  # a missing part: everything beyond a plane through the structure
        axis, where = int(rng.integers(3)), np.argwhere(gt)
        if len(where):
            cut = int(np.quantile(where[:, axis], rng.uniform(0.55, 0.85)))
            index = [slice(None)] * 3
            index[axis] = slice(cut, None) if rng.random() < 0.5 else slice(None, gt.shape[axis] - cut)
            pred[tuple(index)] = False
    elif kind == 2:  # a false blob next to the structure
        ring = ndimage.binary_dilation(gt, _ball(int(size * 2))) & ~ndimage.binary_dilation(gt, _ball(int(size)))
        centre = _random_voxel(ring, rng)
        if centre is not None:
            pred |= _sphere_at(gt.shape, centre, size * rng.uniform(0.6, 1.2))
    else:  # a leak into a touching neighbour (or, without one, into the background next to it)
        near = ndimage.binary_dilation(gt, _ball(int(size * 2))) & ~gt
        neighbour = near & others if (near & others).any() else near
        centre = _random_voxel(neighbour, rng)
        if centre is not None:
            pred |= _sphere_at(gt.shape, centre, size * rng.uniform(0.8, 1.5)) & (neighbour | gt)
    return pred if pred.any() else gt.copy()


def _threshold_base(image: np.ndarray, box) -> np.ndarray:
    """Inside the box: the voxels on the box centre's side of Otsu's threshold, the component holding the centre
    (or the largest one)."""
    k0, j0, i0, k1, j1, i1 = box
    crop = image[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1].astype(np.float64)
    values = crop.ravel()
    hist, edges = np.histogram(values, bins=64)
    centres = (edges[:-1] + edges[1:]) / 2
    weights = hist.astype(np.float64)
    best, threshold = -1.0, centres[0]
    for t in range(1, len(centres)):
        w0, w1 = weights[:t].sum(), weights[t:].sum()
        if w0 == 0 or w1 == 0:
            continue
        m0, m1 = (weights[:t] * centres[:t]).sum() / w0, (weights[t:] * centres[t:]).sum() / w1
        between = w0 * w1 * (m0 - m1) ** 2
        if between > best:
            best, threshold = between, edges[t]
    centre = tuple(n // 2 for n in crop.shape)
    side = crop >= threshold if crop[centre] >= threshold else crop < threshold
    components, count = ndimage.label(side)
    keep = components[centre]
    if keep == 0 and count:
        keep = int(np.argmax(np.bincount(components.ravel())[1:]) + 1)
    out = np.zeros(image.shape, bool)
    out[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1] = components == keep if keep else False
    return out


def base_logits(family: str, gt: np.ndarray, image: np.ndarray, box, rng: np.random.Generator,
                others: np.ndarray | None = None) -> np.ndarray:
    """Logits (K, J, I) of a base of ``family`` for the structure ``gt`` (bool, the volume's shape).

    Args:
        gt: the structure's ground truth (the corruption families start from it; ``threshold`` ignores it).
        image: the volume, for ``threshold``.
        box: inclusive (k0, j0, i0, k1, j1, i1) voxel box of the structure's prompt, for ``threshold``.
        rng: draws the corruption, its size and the softening temperature (0.5–3 voxels).
        others: the other structures' voxels, where a ``structural`` leak prefers to go.
    """
    gt = np.asarray(gt, bool)
    if family == "boundary":
        mask = _boundary_error(gt, rng)
    elif family == "structural":
        mask = _structural_error(gt, np.zeros_like(gt) if others is None else np.asarray(others, bool), rng)
    elif family == "threshold":
        mask = _threshold_base(np.asarray(image), box)
    else:
        raise ValueError(f"unknown base family {family!r}; use one of {BASE_FAMILIES}")
    return soften(mask, float(rng.uniform(0.5, 3.0)))
