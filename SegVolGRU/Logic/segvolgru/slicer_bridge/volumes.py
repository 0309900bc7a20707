"""Scalar volume nodes as numpy arrays in (K, J, I) order, and volume nodes made from arrays or files.

The array of a volume is never permuted: axis 0 is MRML's K (slice) axis, axis 2 its I axis, as in
``slicer.util.arrayFromVolume``. Spacing, origin and directions stay on the node; ``geometry`` holds
the index <-> world conversions.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import slicer
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonDataModel import vtkImageData
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from segvolgru.errors import InputError
from segvolgru.validation import validate_spacing


def _scalar_image(volume_node) -> vtkImageData:
    """The node's image data, after checking that it holds one scalar per voxel."""
    name = volume_node.GetName()
    if isinstance(volume_node, slicer.vtkMRMLVectorVolumeNode):
        raise InputError(
            f"The volume '{name}' is a vector (multi-component) volume; SegVolGRU needs a scalar volume. "
            "Extract one component first (Vector to Scalar Volume module)."
        )
    image = volume_node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"The volume '{name}' has no voxels; load the image or select another volume.")
    components = image.GetNumberOfScalarComponents()
    if components != 1:
        raise InputError(
            f"The volume '{name}' has {components} values per voxel (4-D or vector data); SegVolGRU needs "
            "one. Select a single frame or component as a scalar volume first."
        )
    return image


def volume_array_kji(volume_node) -> np.ndarray:
    """Read-only view (K, J, I) of the voxel values in the volume's own dtype, sharing the node's memory.

    Copy it before handing it to another thread or keeping it past a change of the node's image.
    Raises InputError for vector/4-D volumes and volumes without voxels.
    """
    image = _scalar_image(volume_node)
    i, j, k = image.GetDimensions()
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k, j, i)
    array.flags.writeable = False
    return array


def volume_spacing_kji(volume_node) -> tuple[float, float, float]:
    """Voxel spacing in mm along array axes (K, J, I); parent-transform scaling is not included.

    Raises InputError unless the spacing is three finite positive values.
    """
    _scalar_image(volume_node)
    i, j, k = volume_node.GetSpacing()
    return validate_spacing((k, j, i), f"the spacing (K, J, I) of the volume '{volume_node.GetName()}'")


def new_volume_node(
    scene,
    array_kji: np.ndarray,
    spacing_ijk: Sequence[float],
    origin_ras: Sequence[float],
    directions_ras_3x3: Sequence[Sequence[float]] | np.ndarray,
    name: str,
):
    """Add a ``vtkMRMLScalarVolumeNode`` holding a copy of ``array_kji`` (shape (K, J, I)) to ``scene``.

    Args:
        spacing_ijk: voxel size in mm along I, J, K (MRML order), each > 0.
        origin_ras: RAS position (mm) of the centre of voxel (i, j, k) = (0, 0, 0), i.e. ``array_kji[0, 0, 0]``.
        directions_ras_3x3: orthonormal matrix whose columns are the RAS unit directions of the I, J and
            K axes (MRML's IJKToRASDirections; negative entries flip an axis).
        name: the node's name.
    Raises InputError for a non-3-D array, non-positive spacing or non-orthonormal directions.
    """
    array = np.asarray(array_kji)
    if array.ndim != 3 or 0 in array.shape:
        raise InputError(f"A volume array must be 3-D (K, J, I) and non-empty, got shape {array.shape}.")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    spacing = [float(s) for s in spacing_ijk]
    if len(spacing) != 3 or not np.all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise InputError(f"Spacing must be three positive millimetre values (I, J, K), got {spacing_ijk}.")
    directions = np.asarray(directions_ras_3x3, dtype=float)
    if directions.shape != (3, 3) or not np.allclose(directions.T @ directions, np.eye(3), atol=1e-6):
        raise InputError(
            "Directions must be an orthonormal 3x3 matrix whose columns are the RAS directions of I, J, K; "
            f"got {directions.tolist()}."
        )
    image = vtkImageData()
    image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    image.GetPointData().SetScalars(
        numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True)
    )
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetSpacing(*spacing)
    node.SetOrigin(*[float(o) for o in origin_ras])
    matrix = vtkMatrix4x4()
    for row in range(3):
        for column in range(3):
            matrix.SetElement(row, column, directions[row, column])
    node.SetIJKToRASDirectionMatrix(matrix)
    node.SetAndObserveImageData(image)
    node.CreateDefaultDisplayNodes()
    return node


def load_volume(scene, path: str | os.PathLike, name: str | None = None):
    """Read a volume file (NRRD, NIfTI, MHA, ...) into a new scalar volume node of ``scene``.

    Uses a ``vtkMRMLVolumeArchetypeStorageNode``, which converts the file's LPS header to Slicer's RAS.
    The node is named ``name`` or after the file. Raises InputError when the file is missing or unreadable.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"Volume file '{path}' does not exist; check the path.")
    base = os.path.basename(path)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or base.split(".")[0])
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(path)
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node) or node.GetImageData() is None:
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise InputError(
            f"Could not read '{path}' as a volume; use a NRRD, NIfTI or MetaImage file that Slicer can open."
        )
    node.CreateDefaultDisplayNodes()
    return node
