"""Generated 3-D phantoms that look like the interactive segmentation task, deterministic from a seed.

Each phantom is a body that fills the field of view, holding lobulated organs (some pairs touching, with
intensities a few percent apart), tubes and thin vessels, and small lesions inside organs, under a smooth bias
field, tissue texture, partial-volume blur and noise, at an anisotropic voxel spacing. Two modalities: CT-like
(int16 Hounsfield units, air around the body at -1000) and MR-like (float32 arbitrary units, dark background).
Shapes are drawn in millimetres, so the slice axis looks flattened in voxels as in real scans.

Arrays are (K, J, I) = (D, H, W); axis 0 is the slice axis; spacing is (sk, sj, si) in mm.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

MODALITIES = ("ct", "mr")
MIN_STRUCTURE_VOXELS = 30
_MAX_LOBE_SCALE = 1.6


@dataclass(frozen=True)
class _Tissue:
    """Intensity rules per modality: background, body, organ range, lesion contrast magnitude, vessel, noise."""

    background: float
    body: float
    organ: tuple[float, float]
    lesion_contrast: tuple[float, float]
    vessel: float
    noise: tuple[float, float]


_TISSUES = {
    "ct": _Tissue(background=-1000.0, body=20.0, organ=(-60.0, 180.0), lesion_contrast=(25.0, 70.0),
                  vessel=260.0, noise=(8.0, 30.0)),
    "mr": _Tissue(background=5.0, body=300.0, organ=(120.0, 800.0), lesion_contrast=(25.0, 250.0),
                  vessel=900.0, noise=(8.0, 30.0)),
}


def _interpolation_matrix(n: int, g: int) -> np.ndarray:
    """(n, g) linear-interpolation weights from a g-point grid spanning the axis onto n voxel centres."""
    position = np.linspace(0, g - 1, n)
    low = np.minimum(np.floor(position).astype(int), g - 2)
    frac = (position - low).astype(np.float32)
    weights = np.zeros((n, g), np.float32)
    weights[np.arange(n), low] = 1 - frac
    weights[np.arange(n), low + 1] = frac
    return weights


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], coarse: int) -> np.ndarray:
    """Zero-mean, unit-range smooth random field (K, J, I) from a coarse grid of ``coarse`` cells per axis."""
    g = max(2, coarse)
    # Separable interpolation: three small matrix products instead of a full-volume spline zoom.
    field = rng.standard_normal((g, g, g)).astype(np.float32)
    for axis, n in enumerate(shape):
        field = np.moveaxis(np.tensordot(_interpolation_matrix(n, g), field, axes=(1, axis)), 0, axis)
    field -= field.mean()
    return field / max(float(np.abs(field).max()), 1e-6)


def _coordinates(shape: tuple[int, int, int], spacing: np.ndarray) -> list[np.ndarray]:
    """Open (broadcastable) millimetre coordinates of voxel centres per axis."""
    return [(np.arange(n, dtype=np.float32) * s).reshape([-1 if a == axis else 1 for a in range(3)])
            for axis, (n, s) in enumerate(zip(shape, spacing))]


def _lobulated(rng: np.random.Generator, coords: list[np.ndarray], centre: np.ndarray,
               radii: np.ndarray) -> np.ndarray:
    """Boolean ellipsoid (mm ``radii`` around mm ``centre``) whose radius is modulated by a few lobes (at most
    ``_MAX_LOBE_SCALE`` times the ellipsoid), computed on its bounding box only."""
    window = []
    for c, m, r in zip(coords, centre, radii):
        axis = c.reshape(-1)
        inside = np.flatnonzero(np.abs(axis - m) <= _MAX_LOBE_SCALE * r)
        window.append(slice(int(inside[0]), int(inside[-1]) + 1) if len(inside) else slice(0, 0))
    mask = np.zeros(tuple(c.size for c in coords), bool)
    rel = [(c.reshape([-1 if a == axis else 1 for a in range(3)])[tuple(window[axis] if a == axis else slice(None)
            for a in range(3))] - m) / r for axis, (c, m, r) in enumerate(zip(coords, centre, radii))]
    dist = np.sqrt(rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2) + 1e-6
    scale = np.ones_like(dist)
    for _ in range(int(rng.integers(2, 5))):
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        cosine = (rel[0] * direction[0] + rel[1] * direction[1] + rel[2] * direction[2]) / dist
        scale = scale + rng.uniform(0.08, 0.2) * np.cos(rng.uniform(2.0, 5.0) * cosine + rng.uniform(0, 2 * np.pi))
    mask[tuple(window)] = dist <= np.minimum(scale, _MAX_LOBE_SCALE)
    return mask


def _tube(rng: np.random.Generator, shape: tuple[int, int, int], spacing: np.ndarray,
          radius_mm: float) -> np.ndarray:
    """Boolean tube of ``radius_mm`` around a smooth random curve crossing the volume."""
    extent = np.asarray(shape, np.float64) * spacing
    start = rng.uniform(0.2, 0.8, 3) * extent
    velocity = rng.standard_normal(3)
    velocity /= np.linalg.norm(velocity)
    step = float(spacing.min()) * 0.7
    centre = np.zeros(shape, bool)
    point = start.copy()
    for _ in range(int(extent.max() / step)):
        velocity = velocity + rng.normal(0, 0.08, 3)
        velocity /= np.linalg.norm(velocity)
        point = point + step * velocity
        voxel = np.floor(point / spacing).astype(int)
        if np.any(voxel < 0) or np.any(voxel >= shape):
            break
        centre[tuple(voxel)] = True
    if not centre.any():
        return centre
    # The distance transform runs on the curve's bounding box grown by the radius, not on the whole volume.
    where = np.argwhere(centre)
    margin = np.ceil(radius_mm / spacing).astype(int) + 1
    lo = np.maximum(where.min(0) - margin, 0)
    hi = np.minimum(where.max(0) + margin + 1, shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    tube = np.zeros(shape, bool)
    tube[box] = ndimage.distance_transform_edt(~centre[box], sampling=spacing) <= radius_mm
    return tube


def make_phantom(seed: int, shape: tuple[int, int, int] = (32, 96, 96), modality: str | None = None
                 ) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """A phantom ``(volume, labels, spacing)`` fully determined by ``seed``.

    ``shape`` (K, J, I) in voxels; ``modality`` "ct", "mr" or None (drawn from the seed). ``volume`` is int16
    Hounsfield units (CT, [-1024, 3071]) or float32 arbitrary units >= 0 (MR); ``labels`` is int16 with 0 as
    background and structures numbered 1..L consecutively (L >= 1, each at least ``MIN_STRUCTURE_VOXELS``
    voxels); ``spacing`` is (sk, sj, si) in mm, slice spacing 1.5-5 mm, in-plane 0.6-1.6 mm.
    """
    shape = tuple(int(n) for n in shape)  # type: ignore[assignment]
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"phantom shape must be three sizes >= 8 (K, J, I), got {shape}")
    rng = np.random.default_rng(seed)
    modality = modality or MODALITIES[int(rng.integers(len(MODALITIES)))]
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES} or None, got {modality!r}")
    tissue = _TISSUES[modality]
    spacing = np.array([rng.uniform(1.5, 5.0), *(rng.uniform(0.6, 1.6),) * 2])
    coords = _coordinates(shape, spacing)
    extent = np.asarray(shape) * spacing

    # The body touches every border, so the preprocessing's foreground crop is the whole volume.
    rel_j = (coords[1] - extent[1] / 2) / (extent[1] * rng.uniform(0.5, 0.56))
    rel_i = (coords[2] - extent[2] / 2) / (extent[2] * rng.uniform(0.5, 0.56))
    body = np.broadcast_to(rel_j ** 2 + rel_i ** 2 <= 1.0, shape)

    labels = np.zeros(shape, np.int16)
    means: list[float] = []
    organs: list[tuple[np.ndarray, np.ndarray]] = []
    for _ in range(int(rng.integers(2, 5))):
        radii = rng.uniform(0.12, 0.28, 3) * extent.min() * np.array([1.4, 1.0, 1.0]) * rng.uniform(0.7, 1.3, 3)
        if organs and rng.random() < 0.6:
            # A neighbour pressed against an earlier organ, of nearly its intensity.
            touched = int(rng.integers(len(organs)))
            other_centre, other_radii = organs[touched]
            direction = rng.standard_normal(3)
            direction /= np.linalg.norm(direction)
            centre = other_centre + direction * (other_radii + radii) * 0.75
            mean = means[touched] * rng.uniform(0.93, 1.07) + rng.uniform(-15, 15)
        else:
            centre = rng.uniform(0.25, 0.75, 3) * extent
            mean = rng.uniform(*tissue.organ)
        shape_mask = _lobulated(rng, coords, centre, radii) & body & (labels == 0)
        organs.append((centre, radii))
        means.append(float(mean))
        labels[shape_mask] = len(means)
    for _ in range(int(rng.integers(1, 3))):
        thin = rng.random() < 0.4
        tube = _tube(rng, shape, spacing, rng.uniform(0.8, 1.6) if thin else rng.uniform(2.0, 5.0)) & body
        means.append(tissue.vessel * rng.uniform(0.8, 1.2))
        labels[tube] = len(means)
    for _ in range(int(rng.integers(0, 3))):
        host = int(rng.integers(1, len(organs) + 1))
        where = np.argwhere(labels == host)
        if len(where) == 0:
            continue
        centre = (where[int(rng.integers(len(where)))] + 0.5) * spacing
        lesion = _lobulated(rng, coords, centre, rng.uniform(3.0, 9.0, 3)) & (labels == host)
        means.append(means[host - 1] + rng.choice([-1, 1]) * rng.uniform(*tissue.lesion_contrast))
        labels[lesion] = len(means)
    labels, original = _renumber(labels)

    texture = _smooth_field(rng, shape, int(rng.integers(6, 14)))
    body_value = tissue.body * (1.0 + 0.1 * texture) + 15.0 * texture
    image = np.where(body, body_value, np.float32(tissue.background)).astype(np.float32)
    structure_mean = np.array([0.0] + [means[int(o) - 1] for o in original[1:]], np.float32)
    image = np.where(labels > 0, structure_mean[labels] * (1.0 + 0.04 * texture), image)
    image = ndimage.gaussian_filter(image, sigma=rng.uniform(0.4, 0.9), truncate=2.0)
    bias = 1.0 + rng.uniform(0.05, 0.25) * _smooth_field(rng, shape, 3)
    noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(rng.uniform(*tissue.noise))
    if modality == "mr":
        image = np.abs(image * bias + noise)
    else:
        image = image + 1000.0 * (1.0 - bias) * body + noise  # a beam-hardening-like drift on tissue only
        image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    return image, labels, tuple(float(s) for s in spacing)


def _renumber(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop structures under ``MIN_STRUCTURE_VOXELS`` (or wholly overwritten) and number the rest 1..L.

    Returns the new labels and the original label of each new one (index 0 is the background).
    """
    counts = np.bincount(labels.reshape(-1).astype(np.int64))
    keep = [v for v in range(1, len(counts)) if counts[v] >= MIN_STRUCTURE_VOXELS]
    lookup = np.zeros(len(counts), np.int16)
    lookup[keep] = np.arange(1, len(keep) + 1)
    return lookup[labels], np.array([0, *keep])
