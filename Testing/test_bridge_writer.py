"""Writing engine masks into segments on real MRML: content, extent, masking, undo and .seg.nrrd files."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mrml_support import require_slicer_core

slicer = require_slicer_core()

from vtkmodules.vtkCommonMath import vtkMatrix4x4  # noqa: E402

from segvolgru.errors import InputError  # noqa: E402
from segvolgru.slicer_bridge import (  # noqa: E402
    create_segment_editor,
    ensure_segment,
    kji_to_world,
    load_seg_nrrd,
    new_volume_node,
    points_to_voxels_kji,
    read_segment_mask,
    restore_segment_voxels,
    save_seg_nrrd,
    volume_array_kji,
    write_segment_mask,
)

SHAPE = (8, 10, 12)  # (K, J, I)


def oblique_directions() -> np.ndarray:
    a, b = math.radians(20), math.radians(-35)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return rz @ rx @ np.diag([-1.0, 1.0, -1.0])


def transform_node(scene, translation, degrees_about_s, name):
    c, s = math.cos(math.radians(degrees_about_s)), math.sin(math.radians(degrees_about_s))
    m = vtkMatrix4x4()
    for r, row in enumerate([[c, -s, 0, translation[0]], [s, c, 0, translation[1]], [0, 0, 1, translation[2]]]):
        for col, v in enumerate(row):
            m.SetElement(r, col, v)
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(m)
    return node


def box(k0, j0, i0, k1, j1, i1) -> np.ndarray:
    mask = np.zeros(SHAPE, np.uint8)
    mask[k0:k1, j0:j1, i0:i1] = 1
    return mask


@pytest.fixture
def setup(mrml):
    """Oblique, flipped, anisotropic volume under a linear transform, with a segmentation beside it."""
    values = np.random.default_rng(11).integers(-500, 1500, SHAPE).astype(np.int16)
    volume = new_volume_node(mrml.scene, values, (0.8, 1.5, 2.5), (12.0, -30.0, 7.0), oblique_directions(), "CT")
    parent = transform_node(mrml.scene, (4.0, -2.0, 9.0), 30.0, "registration")
    volume.SetAndObserveTransformNodeID(parent.GetID())
    segmentation = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetAndObserveTransformNodeID(parent.GetID())
    target = ensure_segment(segmentation, "tumour")
    other = ensure_segment(segmentation, "liver")
    editor = create_segment_editor(mrml.scene, segmentation, volume, app_logic=mrml.app_logic)
    return mrml, volume, segmentation, target, other, editor


def test_ensure_segment_returns_the_existing_segment_by_name(setup):
    _, _, segmentation, target, other, _ = setup
    assert ensure_segment(segmentation, "tumour") == target
    assert ensure_segment(segmentation, "liver") == other
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 2


def test_written_segment_equals_the_mask(setup):
    _, volume, segmentation, target, _, editor = setup
    mask = box(2, 3, 1, 6, 8, 9)
    mask[4, 5, 5] = 0
    write_segment_mask(segmentation, target, mask, volume, editor_logic=editor)
    np.testing.assert_array_equal(read_segment_mask(segmentation, target, volume), mask)


def test_only_the_changed_extent_is_touched(setup):
    _, volume, segmentation, target, _, editor = setup
    before = box(1, 1, 1, 7, 9, 11)
    write_segment_mask(segmentation, target, before, volume, editor_logic=editor)
    after = np.zeros(SHAPE, np.uint8)  # everything cleared, but only the extent may change
    after[3, 4, 5] = 1
    write_segment_mask(segmentation, target, after, volume, (2, 3, 4, 4, 6, 8), editor_logic=editor)
    expected = before.copy()
    expected[2:5, 3:7, 4:9] = after[2:5, 3:7, 4:9]
    np.testing.assert_array_equal(read_segment_mask(segmentation, target, volume), expected)


def test_other_segment_and_source_volume_are_bit_identical_after_a_write(setup):
    _, volume, segmentation, target, other, editor = setup
    write_segment_mask(segmentation, other, box(0, 0, 0, 3, 4, 5), volume, editor_logic=editor)
    other_before = read_segment_mask(segmentation, other, volume)
    voxels_before = volume_array_kji(volume).copy()
    write_segment_mask(segmentation, target, box(4, 5, 6, 8, 10, 12), volume, editor_logic=editor)
    np.testing.assert_array_equal(read_segment_mask(segmentation, other, volume), other_before)
    assert volume_array_kji(volume).tobytes() == voxels_before.tobytes()


def test_overwrite_mode_decides_whether_other_segments_are_cut(setup):
    _, volume, segmentation, target, other, editor = setup
    liver = box(0, 0, 0, 6, 6, 6)
    tumour = box(3, 3, 3, 8, 8, 8)
    write_segment_mask(segmentation, other, liver, volume, editor_logic=editor)
    editor_node = editor.GetSegmentEditorNode()
    editor_node.SetOverwriteMode(editor_node.OverwriteNone)
    write_segment_mask(segmentation, target, tumour, volume, editor_logic=editor)
    np.testing.assert_array_equal(read_segment_mask(segmentation, other, volume), liver)
    np.testing.assert_array_equal(read_segment_mask(segmentation, target, volume), tumour)

    editor_node.SetOverwriteMode(editor_node.OverwriteAllSegments)
    write_segment_mask(segmentation, target, tumour, volume, editor_logic=editor)
    np.testing.assert_array_equal(read_segment_mask(segmentation, other, volume), liver & (1 - tumour))


def test_editable_area_limits_the_write(setup):
    _, volume, segmentation, target, other, editor = setup
    liver = box(0, 0, 0, 6, 6, 6)
    write_segment_mask(segmentation, other, liver, volume, editor_logic=editor)
    editor_node = editor.GetSegmentEditorNode()
    editor_node.SetOverwriteMode(editor_node.OverwriteNone)
    editor_node.SetMaskMode(segmentation.EditAllowedInsideSingleSegment)
    editor_node.SetMaskSegmentID(other)
    write_segment_mask(segmentation, target, box(3, 3, 3, 8, 8, 8), volume, editor_logic=editor)
    np.testing.assert_array_equal(read_segment_mask(segmentation, target, volume), box(3, 3, 3, 6, 6, 6))

    editor_node.SetMaskMode(segmentation.EditAllowedOutsideAllSegments)
    write_segment_mask(segmentation, target, np.ones(SHAPE, np.uint8), volume, editor_logic=editor)
    # The segment being edited is never "another segment": its own voxels inside the liver stay editable.
    np.testing.assert_array_equal(read_segment_mask(segmentation, target, volume), (1 - liver) | box(3, 3, 3, 6, 6, 6))


def test_voxels_read_over_an_extent_are_restored_exactly_whatever_was_written_since(setup):
    _, volume, segmentation, target, other, editor = setup
    write_segment_mask(segmentation, target, box(1, 2, 3, 5, 7, 9), volume, editor_logic=editor)
    write_segment_mask(segmentation, other, box(0, 0, 0, 2, 2, 2), volume, editor_logic=editor)
    full = {s: read_segment_mask(segmentation, s, volume) for s in (target, other)}
    extent = (0, 0, 0, 7, 9, 11)
    kept = [(s, extent, read_segment_mask(segmentation, s, volume, extent)) for s in (target, other)]
    np.testing.assert_array_equal(kept[0][2], full[target][:8, :10, :12])
    write_segment_mask(segmentation, target, box(0, 0, 0, 8, 10, 12), volume, extent, editor_logic=editor)
    assert not read_segment_mask(segmentation, other, volume).any()  # overwritten by the default overwrite mode
    restore_segment_voxels(segmentation, volume, kept)
    for segment_id, expected in full.items():
        np.testing.assert_array_equal(read_segment_mask(segmentation, segment_id, volume), expected)


def test_click_voxel_lands_on_the_segment_voxel_at_the_same_world_position(setup):
    mrml, volume, segmentation, target, _, editor = setup
    voxel = (5, 2, 9)
    points = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "click")
    points.AddControlPoint(*kji_to_world(volume, voxel), "P-1")
    (clicked,) = points_to_voxels_kji(points, volume)
    mask = np.zeros(SHAPE, np.uint8)
    mask[clicked] = 1
    write_segment_mask(segmentation, target, mask, volume, editor_logic=editor)

    labelmap = slicer.vtkOrientedImageData()
    segmentation.GetBinaryLabelmapRepresentation(target, labelmap)
    image_to_local = vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(image_to_local)
    local_to_world = vtkMatrix4x4()
    segmentation.GetParentTransformNode().GetMatrixTransformToWorld(local_to_world)
    to_world = np.array([[local_to_world.GetElement(r, c) for c in range(4)] for r in range(4)]) @ np.array(
        [[image_to_local.GetElement(r, c) for c in range(4)] for r in range(4)]
    )
    world = np.append(points.GetNthControlPointPositionWorld(0), 1.0)
    i, j, k = np.rint((np.linalg.inv(to_world) @ world)[:3]).astype(int)
    assert labelmap.GetScalarComponentAsDouble(i, j, k, 0) == 1
    assert np.count_nonzero(read_segment_mask(segmentation, target, volume)) == 1


def test_segmentation_under_another_transform_still_holds_the_volume_voxels(mrml):
    volume = new_volume_node(mrml.scene, np.zeros(SHAPE, np.int16), (1.0, 2.0, 3.0), (5, 6, 7), np.eye(3), "CT")
    volume.SetAndObserveTransformNodeID(transform_node(mrml.scene, (10, 0, 0), 90.0, "volume T").GetID())
    segmentation = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetAndObserveTransformNodeID(transform_node(mrml.scene, (0, -5, 2), -45.0, "seg T").GetID())
    segment = ensure_segment(segmentation, "s")
    mask = box(1, 2, 3, 4, 6, 9)
    editor = create_segment_editor(mrml.scene, segmentation, volume)
    write_segment_mask(segmentation, segment, mask, volume, editor_logic=editor)
    np.testing.assert_array_equal(read_segment_mask(segmentation, segment, volume), mask)


def test_without_editor_logic_the_direct_write_respects_the_extent_and_other_segments(setup):
    _, volume, segmentation, target, other, _ = setup
    liver = box(0, 0, 0, 4, 4, 4)
    write_segment_mask(segmentation, other, liver, volume)
    before = box(1, 1, 1, 7, 9, 11)
    write_segment_mask(segmentation, target, before, volume)
    after = box(5, 5, 5, 8, 10, 12)
    write_segment_mask(segmentation, target, after, volume, (4, 4, 4, 7, 9, 11))
    expected = before.copy()
    expected[4:, 4:, 4:] = after[4:, 4:, 4:]
    np.testing.assert_array_equal(read_segment_mask(segmentation, target, volume), expected)
    np.testing.assert_array_equal(read_segment_mask(segmentation, other, volume), liver)


def test_saved_seg_nrrd_reopens_with_the_same_voxels(setup, tmp_path):
    mrml, volume, segmentation, target, other, editor = setup
    tumour = box(2, 2, 2, 7, 5, 10)
    liver = box(0, 6, 0, 3, 10, 12)
    write_segment_mask(segmentation, target, tumour, volume, editor_logic=editor)
    write_segment_mask(segmentation, other, liver, volume, editor_logic=editor)
    save_seg_nrrd(segmentation, tmp_path / "result.seg.nrrd")
    reopened = load_seg_nrrd(mrml.scene, tmp_path / "result.seg.nrrd")
    reopened.SetAndObserveTransformNodeID(segmentation.GetTransformNodeID())
    names = {reopened.GetSegmentation().GetNthSegment(n).GetName(): reopened.GetSegmentation().GetNthSegmentID(n)
             for n in range(reopened.GetSegmentation().GetNumberOfSegments())}
    assert set(names) == {"tumour", "liver"}
    np.testing.assert_array_equal(read_segment_mask(reopened, names["tumour"], volume), tumour)
    np.testing.assert_array_equal(read_segment_mask(reopened, names["liver"], volume), liver)
    assert segmentation.GetStorageNode() is None


def test_bad_inputs_are_rejected_with_messages(setup, tmp_path):
    mrml, volume, segmentation, target, _, editor = setup
    with pytest.raises(InputError, match=r"shape \(8, 10\).*\(8, 10, 12\)"):
        write_segment_mask(segmentation, target, np.zeros((8, 10), np.uint8), volume, editor_logic=editor)
    with pytest.raises(InputError, match="no segment 'nope'"):
        write_segment_mask(segmentation, "nope", np.zeros(SHAPE, np.uint8), volume, editor_logic=editor)
    empty = np.zeros(SHAPE, np.uint8)
    with pytest.raises(InputError, match="Changed extent"):
        write_segment_mask(segmentation, target, empty, volume, (0, 0, 0, 8, 9, 11), editor_logic=editor)
    elsewhere = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Other")
    with pytest.raises(InputError, match="edits 'Segmentation', not 'Other'"):
        write_segment_mask(elsewhere, ensure_segment(elsewhere, "x"), empty, volume, editor_logic=editor)
    with pytest.raises(InputError, match=r"\.seg\.nrrd"):
        save_seg_nrrd(segmentation, tmp_path / "result.nii.gz")
