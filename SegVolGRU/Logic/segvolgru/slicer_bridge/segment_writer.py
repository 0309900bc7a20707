"""Masks in a volume's (K, J, I) geometry written to and read from segments of a segmentation node.

Geometry: every labelmap handed to MRML is a ``vtkOrientedImageData`` on the volume's own voxel
lattice, expressed in the segmentation node's local RAS. When the segmentation sits under the same
parent transform as the volume (the recommended set-up) that is simply the volume's IJKToRAS
matrix; otherwise it is (segmentation-to-world)^-1 * (volume-to-world) * IJKToRAS, which needs both
transforms to be linear. An empty segmentation gets that lattice as its reference image geometry,
so segments hold exactly the volume's voxels and read back without resampling error.

Writing goes through ``vtkSlicerSegmentEditorLogic`` (Slicer 5.10+, also in ``slicer-core``), so the
segment editor node's masking (editable area, editable intensity range, overwrite of other
segments) apply; only the changed sub-extent is handed over and touched. Undo is not Slicer's: callers keep the
voxels they replace (``read_segment_mask`` over an extent) and put them back with ``restore_segment_voxels``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import slicer
from vtkmodules.util import numpy_support
from vtkmodules.vtkCommonMath import vtkMatrix4x4

from segvolgru.errors import InputError

from .geometry import ijk_to_world_matrix, node_to_world_matrix, volume_shape_kji

_KEEP = 255  # "keep" value of an inverted modifier merged by minimum, as Slicer's own editor does


def _segment_editor_class():
    """``vtkSlicerSegmentEditorLogic`` where this Slicer has it (5.10 and later), else None."""
    return getattr(slicer, "vtkSlicerSegmentEditorLogic", None)


def create_segment_editor(scene, segmentation_node, volume_node, editor_node=None, app_logic=None):
    """A ``vtkSlicerSegmentEditorLogic`` editing ``segmentation_node`` with ``volume_node`` as source volume.

    Masking settings are read from ``editor_node`` (a ``vtkMRMLSegmentEditorNode``). When it is None a private
    node with Slicer's defaults is added to ``scene``, hidden from node selectors and not saved with the scene:
    the logic writes its segmentation and source volume into its editor node, so handing it the Segment Editor
    module's singleton would retarget the user's Segment Editor. Copy the user's masking into the private node
    with ``copy_masking`` before writing. The logic keeps no undo states: the panel's undo is SegVolGRU's own
    (see ``SegmentationWorkflow.undo_step``), so any state kept here could never be reached.
    Returns None where this Slicer has no such class; ``write_segment_mask`` then writes unmasked.
    """
    editor_class = _segment_editor_class()
    if editor_class is None:
        return None
    if editor_node is None:
        editor_node = slicer.vtkMRMLSegmentEditorNode()
        editor_node.SetName(scene.GenerateUniqueName("SegVolGRU segment editor"))
        editor_node.SetHideFromEditors(True)
        editor_node.SetSaveWithScene(False)
        editor_node = scene.AddNode(editor_node)
    logic = editor_class()
    logic.SetMRMLScene(scene)
    if app_logic is not None:
        logic.SetMRMLApplicationLogic(app_logic)
    logic.SetMaximumNumberOfUndoStates(0)
    logic.SetSegmentEditorNode(editor_node)
    logic.SetSegmentationNode(segmentation_node)
    logic.SetSourceVolumeNode(volume_node)
    return logic


def copy_masking(source_editor_node, target_editor_node) -> None:
    """Copy the masking settings (editable area, editable intensity range, overwrite mode) between editor nodes.

    A single-segment editable area names a segment of the source node's segmentation; unless the target edits that
    same segmentation (and the segment still exists) the area cannot apply there, and the target edits everywhere.
    """
    segmentation_class = slicer.vtkMRMLSegmentationNode
    mode = source_editor_node.GetMaskMode()
    mask_segment = source_editor_node.GetMaskSegmentID() or ""
    if mode == segmentation_class.EditAllowedInsideSingleSegment:
        source, target = source_editor_node.GetSegmentationNode(), target_editor_node.GetSegmentationNode()
        if source is None or target is None or source.GetID() != target.GetID() or \
                target.GetSegmentation().GetSegment(mask_segment) is None:
            mode, mask_segment = segmentation_class.EditAllowedEverywhere, ""
    target_editor_node.SetMaskMode(mode)
    target_editor_node.SetMaskSegmentID(mask_segment)
    target_editor_node.SetSourceVolumeIntensityMask(source_editor_node.GetSourceVolumeIntensityMask())
    target_editor_node.SetSourceVolumeIntensityMaskRange(*source_editor_node.GetSourceVolumeIntensityMaskRange())
    target_editor_node.SetOverwriteMode(source_editor_node.GetOverwriteMode())


def ensure_segment(segmentation_node, name: str) -> str:
    """ID of the segment called ``name``, added empty (binary labelmap) when there is none yet."""
    segmentation = segmentation_node.GetSegmentation()
    segment_id = segmentation.GetSegmentIdBySegmentName(name)
    if segment_id:
        return segment_id
    segment_id = segmentation.AddEmptySegment("", name)
    if not segment_id:
        raise RuntimeError(
            f"Could not add segment '{name}': the segmentation converter rules are not registered. Give a "
            "vtkSlicerSegmentationsModuleLogic the scene first (Slicer and HeadlessSlicer both do)."
        )
    return segment_id


def _check_segment(segmentation_node, segment_id: str) -> None:
    if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        known = list(segmentation_node.GetSegmentation().GetSegmentIDs())
        raise InputError(
            f"Segmentation '{segmentation_node.GetName()}' has no segment '{segment_id}' (it has {known}); "
            "select an existing segment or create one with ensure_segment."
        )


def _labelmap_to_segmentation_matrix(segmentation_node, volume_node) -> vtkMatrix4x4:
    """Matrix from the volume's (i, j, k) index to the segmentation node's local RAS (mm)."""
    segmentation_parent = segmentation_node.GetParentTransformNode()
    volume_parent = volume_node.GetParentTransformNode()
    same_parent = (segmentation_parent is None and volume_parent is None) or (
        segmentation_parent is not None
        and volume_parent is not None
        and segmentation_parent.GetID() == volume_parent.GetID()
    )
    matrix = vtkMatrix4x4()
    if same_parent:
        volume_node.GetIJKToRASMatrix(matrix)
        return matrix
    product = np.linalg.inv(node_to_world_matrix(segmentation_node, "segmentation")) @ ijk_to_world_matrix(volume_node)
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, product[row, column])
    return matrix


def _oriented_image(values_kji: np.ndarray, extent_ijk: Sequence[int], image_to_segmentation: vtkMatrix4x4):
    """uint8 ``vtkOrientedImageData`` covering ``extent_ijk`` (i0, i1, j0, j1, k0, k1) of the volume lattice."""
    image = slicer.vtkOrientedImageData()
    image.SetExtent(*extent_ijk)
    image.GetPointData().SetScalars(
        numpy_support.numpy_to_vtk(np.ascontiguousarray(values_kji, dtype=np.uint8).ravel(), deep=True)
    )
    image.SetImageToWorldMatrix(image_to_segmentation)
    return image


def _ensure_reference_geometry(segmentation_node, image_to_segmentation: vtkMatrix4x4, shape_kji) -> None:
    """Give an empty segmentation the volume's lattice as reference geometry; an existing one is kept."""
    segmentation = segmentation_node.GetSegmentation()
    parameter = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    if segmentation.GetConversionParameter(parameter):
        return
    k, j, i = shape_kji
    geometry = slicer.vtkSegmentationConverter.SerializeImageGeometry(
        image_to_segmentation, [0, i - 1, 0, j - 1, 0, k - 1]
    )
    segmentation.SetConversionParameter(parameter, geometry)


def _checked_extent(changed_extent_kji, shape_kji) -> tuple[int, int, int, int, int, int]:
    if changed_extent_kji is None:
        return 0, 0, 0, shape_kji[0] - 1, shape_kji[1] - 1, shape_kji[2] - 1
    extent = tuple(int(v) for v in changed_extent_kji)
    if len(extent) != 6 or any(
        not 0 <= extent[axis] <= extent[axis + 3] < shape_kji[axis] for axis in range(3)
    ):
        raise InputError(
            f"Changed extent {changed_extent_kji} is not an inclusive (k0, j0, i0, k1, j1, i1) box inside "
            f"the volume of shape {tuple(shape_kji)}; pass the extent the result reported, or None."
        )
    return extent


def write_segment_mask(
    segmentation_node,
    segment_id: str,
    mask_kji: np.ndarray,
    volume_node,
    changed_extent_kji: Sequence[int] | None = None,
    editor_logic=None,
) -> None:
    """Make segment ``segment_id`` equal ``mask_kji`` inside ``changed_extent_kji``; leave it unchanged outside.

    Args:
        mask_kji: array of the volume's shape (K, J, I); non-zero voxels are inside (uint8 0/1 expected).
        changed_extent_kji: inclusive box ``(k0, j0, i0, k1, j1, i1)`` holding every changed voxel; None
            means the whole volume. Only this sub-extent is handed to MRML.
        editor_logic: a ``vtkSlicerSegmentEditorLogic`` on this segmentation (see
            ``create_segment_editor``). With it the write obeys the editor node's masking: voxels outside
            the editable area keep their old state and other segments are overwritten only as the
            overwrite mode says. It is done as Slicer's "add" of the inside voxels followed by "remove" of
            the outside ones, both limited to the extent, because the editor's "set" mode clears the
            segment outside the extent. The segment is selected in the editor node, as any Segment Editor
            effect does. Without it the segment is written directly with
            ``vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment``: no masking, no undo, other
            segments untouched (what an undo needs to restore voxels exactly).
    Raises InputError for an unknown segment, a mask of the wrong shape, an extent outside the volume,
    an editor logic bound to another segmentation, or non-linear transforms between the nodes.
    """
    _check_segment(segmentation_node, segment_id)
    shape = volume_shape_kji(volume_node)
    mask = np.asarray(mask_kji)
    if mask.shape != shape:
        raise InputError(
            f"The mask has shape {mask.shape} but the volume '{volume_node.GetName()}' has shape {shape} (K, J, I); "
            "pass a mask computed on this volume."
        )
    k0, j0, i0, k1, j1, i1 = _checked_extent(changed_extent_kji, shape)
    extent_ijk = (i0, i1, j0, j1, k0, k1)
    inside = mask[k0 : k1 + 1, j0 : j1 + 1, i0 : i1 + 1] != 0
    image_to_segmentation = _labelmap_to_segmentation_matrix(segmentation_node, volume_node)
    _ensure_reference_geometry(segmentation_node, image_to_segmentation, shape)

    was_modifying = segmentation_node.StartModify()
    try:
        if editor_logic is None:
            restore_segment_voxels(segmentation_node, volume_node, [(segment_id, (k0, j0, i0, k1, j1, i1), inside)])
        else:
            _write_with_editor(editor_logic, segmentation_node, segment_id, inside, extent_ijk, image_to_segmentation)
    finally:
        segmentation_node.EndModify(was_modifying)


def _write_with_editor(editor_logic, segmentation_node, segment_id, inside, extent_ijk, image_to_segmentation) -> None:
    edited = editor_logic.GetSegmentationNode()
    if edited is None or edited.GetID() != segmentation_node.GetID():
        raise InputError(
            f"The segment editor logic edits '{edited.GetName() if edited else 'no segmentation'}', not "
            f"'{segmentation_node.GetName()}'; create it with create_segment_editor for this segmentation."
        )
    editor_logic.GetSegmentEditorNode().SetSelectedSegmentID(segment_id)
    editor_class = type(editor_logic)
    for values, mode in (
        (inside, editor_class.ModificationModeAdd),
        (~inside, editor_class.ModificationModeRemove),
    ):
        modifier = _oriented_image(values, extent_ijk, image_to_segmentation)
        editor_logic.ModifySegmentByLabelmap(segmentation_node, segment_id, modifier, mode, extent_ijk, True, False)


def read_segment_mask(segmentation_node, segment_id: str, volume_node, extent_kji: Sequence[int] | None = None
                      ) -> np.ndarray:
    """Segment ``segment_id`` as a uint8 0/1 array on the volume's voxel lattice (nearest neighbour).

    Returns the whole volume (K, J, I), or with ``extent_kji`` (inclusive ``(k0, j0, i0, k1, j1, i1)``) just that
    box, of shape (k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1).
    """
    _check_segment(segmentation_node, segment_id)
    shape = volume_shape_kji(volume_node)
    k0, j0, i0, k1, j1, i1 = _checked_extent(extent_kji, shape)
    box = (k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1)
    labelmap = slicer.vtkOrientedImageData()
    if not segmentation_node.GetBinaryLabelmapRepresentation(segment_id, labelmap):
        raise InputError(
            f"Segment '{segment_id}' of '{segmentation_node.GetName()}' has no binary labelmap; "
            "convert the segmentation to a binary labelmap source representation first."
        )
    reference = _oriented_image(
        np.zeros(box, dtype=np.uint8),
        (i0, i1, j0, j1, k0, k1),
        _labelmap_to_segmentation_matrix(segmentation_node, volume_node),
    )
    low_i, high_i, low_j, high_j, low_k, high_k = labelmap.GetExtent()
    if low_i > high_i or low_j > high_j or low_k > high_k:
        return np.zeros(box, dtype=np.uint8)
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        labelmap, reference, resampled, False
    )
    values = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(box)
    return (values != 0).astype(np.uint8)


def restore_segment_voxels(segmentation_node, volume_node, patches: Sequence[tuple[str, Sequence[int], np.ndarray]]
                           ) -> None:
    """Put back voxels read with ``read_segment_mask``: each patch is (segment ID, extent, values of that box).

    Written directly, with no masking (an undo restores exactly what was there). Every removal is done before
    any addition, so segments that share one labelmap layer get back voxels another segment held meanwhile.
    """
    shape = volume_shape_kji(volume_node)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    image_to_segmentation = _labelmap_to_segmentation_matrix(segmentation_node, volume_node)
    checked = []
    for segment_id, extent, values in patches:
        _check_segment(segmentation_node, segment_id)
        k0, j0, i0, k1, j1, i1 = _checked_extent(extent, shape)
        checked.append((segment_id, (i0, i1, j0, j1, k0, k1), np.asarray(values) != 0))
    was_modifying = segmentation_node.StartModify()
    try:
        for values_of, merge_mode in ((lambda inside: inside.astype(np.uint8) * _KEEP, logic.MODE_MERGE_MIN),
                                      (lambda inside: inside.astype(np.uint8), logic.MODE_MERGE_MASK)):
            for segment_id, extent_ijk, inside in checked:
                modifier = _oriented_image(values_of(inside), extent_ijk, image_to_segmentation)
                if not logic.SetBinaryLabelmapToSegment(modifier, segmentation_node, segment_id, merge_mode,
                                                        extent_ijk):
                    raise RuntimeError(f"Slicer refused to write the labelmap of segment '{segment_id}'.")
    finally:
        segmentation_node.EndModify(was_modifying)


def save_seg_nrrd(segmentation_node, path: str | os.PathLike) -> None:
    """Write the segmentation to a ``.seg.nrrd`` file; the node's own storage node is left as it was."""
    path = os.fspath(path)
    if not path.endswith(".seg.nrrd"):
        raise InputError(f"'{path}' does not end in .seg.nrrd; name the segmentation file <name>.seg.nrrd.")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"Folder '{folder}' does not exist; create it before saving '{os.path.basename(path)}'.")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(path)
    if not storage.WriteData(segmentation_node):
        raise InputError(f"Could not write '{path}'; check that the folder is writable and the disk not full.")


def load_seg_nrrd(scene, path: str | os.PathLike, name: str | None = None):
    """Read a ``.seg.nrrd`` file into a new segmentation node of ``scene`` (named ``name`` or after the file)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"Segmentation file '{path}' does not exist; check the path.")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or os.path.basename(path).split(".")[0])
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(path)
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise InputError(f"Could not read '{path}' as a segmentation; use a .seg.nrrd file written by Slicer.")
    node.CreateDefaultDisplayNodes()
    return node
