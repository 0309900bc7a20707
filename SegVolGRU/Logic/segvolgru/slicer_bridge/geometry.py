"""The one place where world (RAS, mm) positions and voxel indices of a volume are converted.

Conventions:
- World coordinates are Slicer's RAS in millimetres, after every parent transform.
- A volume's continuous index is (k, j, i): the voxel centre of array element ``a[k, j, i]`` of the
  (K, J, I) numpy view sits exactly at integer (k, j, i); MRML's own IJK order is the reverse.
- Boxes are ``(k0, j0, i0, k1, j1, i1)`` with both corners inclusive; clicks are ``(k, j, i)``.

Only linear parent transforms are accepted on the volume, the ROI and the points: a non-linear one
would bend a world-space box into a curved region of the array, so it is refused with advice to
harden it first.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from segvolgru.errors import InputError

# The (K, J, I) index is MRML's (I, J, K) reversed; as a homogeneous permutation it is its own inverse.
_IJK_TO_KJI = np.array(
    [[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float
)
# Corners that lie on a voxel boundary up to rounding error are not allowed to gain or lose a voxel.
_BOX_TOLERANCE = 1e-4
_AXIS_NAMES = ("K (array axis 0)", "J (array axis 1)", "I (array axis 2)")


def _numpy_matrix(matrix: vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _node_label(node) -> str:
    return f"'{node.GetName()}'" if node.GetName() else node.GetClassName()


def node_to_world_matrix(node, role: str) -> np.ndarray:
    """4x4 matrix from ``node``'s local RAS (mm) to world RAS (mm): the product of its parent transforms.

    ``role`` names the node in error messages ("volume", "ROI", "points", "segmentation").
    Raises InputError when a parent transform is non-linear.
    """
    transform_node = node.GetParentTransformNode()
    if transform_node is None:
        return np.eye(4)
    if not transform_node.IsTransformToWorldLinear():
        raise InputError(
            f"The {role} {_node_label(node)} is under the non-linear transform "
            f"'{transform_node.GetName()}', which would bend voxel boxes and clicks. "
            "Harden the transform on the node (Transforms module, 'Harden transform') or remove it, then retry."
        )
    matrix = vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(matrix)
    return _numpy_matrix(matrix)


def _dimensions_ijk(volume_node) -> tuple[int, int, int]:
    image = volume_node.GetImageData()
    if image is None:
        raise InputError(
            f"The volume {_node_label(volume_node)} has no image data; load or select a volume with voxels."
        )
    return tuple(int(d) for d in image.GetDimensions())


def ijk_to_world_matrix(volume_node) -> np.ndarray:
    """4x4 matrix from MRML's continuous (i, j, k, 1) voxel index to world RAS (mm, parent transforms included)."""
    ijk_to_ras = vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    return node_to_world_matrix(volume_node, "volume") @ _numpy_matrix(ijk_to_ras)


def kji_to_world_matrix(volume_node) -> np.ndarray:
    """4x4 matrix from the continuous array index (k, j, i, 1) to world RAS (x, y, z, 1) in mm."""
    return ijk_to_world_matrix(volume_node) @ _IJK_TO_KJI


def world_to_kji_matrix(volume_node) -> np.ndarray:
    """4x4 matrix from world RAS (x, y, z, 1) in mm to the continuous array index (k, j, i, 1).

    Raises InputError when the volume's geometry has no inverse (a zero spacing, or a transform that flattens it).
    """
    try:
        return np.linalg.inv(kji_to_world_matrix(volume_node))
    except np.linalg.LinAlgError:
        raise InputError(
            f"The volume {_node_label(volume_node)} has a degenerate geometry (a zero spacing or direction, or a "
            "parent transform that flattens it), so positions cannot be mapped to its voxels; fix its spacing in "
            "the Volumes module (Volume Information) or its transform."
        ) from None


def kji_to_world(volume_node, kji: Sequence[float]) -> tuple[float, float, float]:
    """World RAS position (mm) of the continuous array index ``kji``; integers give voxel centres."""
    x, y, z, _ = kji_to_world_matrix(volume_node) @ np.array([*kji, 1.0], dtype=float)
    return float(x), float(y), float(z)


def _world_to_kji_points(volume_node, points_world: np.ndarray) -> np.ndarray:
    """Continuous (k, j, i) indices of world RAS points given as an (N, 3) array in mm."""
    homogeneous = np.hstack([points_world, np.ones((len(points_world), 1))])
    return (world_to_kji_matrix(volume_node) @ homogeneous.T).T[:, :3]


def volume_shape_kji(volume_node) -> tuple[int, int, int]:
    """Number of voxels (K, J, I) of the volume, the shape of its numpy array."""
    i, j, k = _dimensions_ijk(volume_node)
    return k, j, i


def roi_to_box_kji(roi_node, volume_node) -> tuple[int, int, int, int, int, int]:
    """Voxel box ``(k0, j0, i0, k1, j1, i1)`` (inclusive) of the volume's voxels whose centres the ROI covers.

    The ROI may be rotated and under a linear transform: its 8 corners (object frame, +-size/2, mapped
    to world by ``GetObjectToWorldMatrix``, which includes the ROI's parent transforms) are taken to the
    volume's continuous index; per axis the box spans ceil(min - 1e-4) .. floor(max + 1e-4), clipped to
    0 .. dim - 1. Raises InputError when the ROI is not placed, covers no voxel centre of the volume
    (naming the axis and the distance in voxels), or sits under a non-linear transform.
    """
    if roi_node.GetNumberOfDefinedControlPoints() < 1:
        raise InputError(f"The ROI {_node_label(roi_node)} has not been placed; place it over the structure first.")
    node_to_world_matrix(roi_node, "ROI")
    bounds = [0.0] * 6
    roi_node.GetObjectBounds(bounds)
    corners_object = np.array(
        [[x, y, z, 1.0] for x in bounds[0:2] for y in bounds[2:4] for z in bounds[4:6]]
    )
    corners_world = (_numpy_matrix(roi_node.GetObjectToWorldMatrix()) @ corners_object.T).T[:, :3]
    corners_kji = _world_to_kji_points(volume_node, corners_world)
    shape = volume_shape_kji(volume_node)
    low: list[int] = []
    high: list[int] = []
    for axis, size in enumerate(shape):
        first = math.ceil(corners_kji[:, axis].min() - _BOX_TOLERANCE)
        last = math.floor(corners_kji[:, axis].max() + _BOX_TOLERANCE)
        if first > size - 1 or last < 0 or first > last:
            if last < 0:
                where = f"ends {-last} voxel(s) before the first voxel"
            elif first > size - 1:
                where = f"starts {first - (size - 1)} voxel(s) after the last voxel (index {size - 1})"
            else:
                where = "falls between two voxel centres (it is thinner than one voxel there)"
            raise InputError(
                f"The ROI {_node_label(roi_node)} covers no voxel of the volume {_node_label(volume_node)} "
                f"along axis {_AXIS_NAMES[axis]}: it {where}. Move or resize the ROI onto the volume, "
                "or select the volume it was drawn on."
            )
        low.append(max(first, 0))
        high.append(min(last, size - 1))
    return low[0], low[1], low[2], high[0], high[1], high[2]


def points_to_voxels_kji(points_node, volume_node) -> list[tuple[int, int, int]]:
    """Array indices ``(k, j, i)`` of the voxels holding each control point of ``points_node``, in order.

    Each world position (``GetNthControlPointPositionWorld``, parent transforms included) goes to the
    volume's continuous index c, then floor(c + 0.5) per axis (halves round up, towards higher index).
    Raises InputError naming the point's index and label when it lies outside the volume, and when a
    transform on the points or the volume is non-linear.
    """
    node_to_world_matrix(points_node, "points")
    count = points_node.GetNumberOfControlPoints()
    if count == 0:
        return []
    positions = np.zeros((count, 3))
    for index in range(count):
        position = [0.0, 0.0, 0.0]
        points_node.GetNthControlPointPositionWorld(index, position)
        positions[index] = position
    voxels_kji = np.floor(_world_to_kji_points(volume_node, positions) + 0.5).astype(int)
    shape = np.array(volume_shape_kji(volume_node))
    voxels: list[tuple[int, int, int]] = []
    for index, voxel in enumerate(voxels_kji):
        if np.any(voxel < 0) or np.any(voxel >= shape):
            raise InputError(
                f"Point {index} ('{points_node.GetNthControlPointLabel(index)}') of {_node_label(points_node)} "
                f"lies outside the volume {_node_label(volume_node)}: voxel (k, j, i) = {tuple(int(v) for v in voxel)} "
                f"but the volume has shape {tuple(int(s) for s in shape)}. Move or delete the point."
            )
        voxels.append((int(voxel[0]), int(voxel[1]), int(voxel[2])))
    return voxels
