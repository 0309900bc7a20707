"""SegmentationWorkflow on real MRML (slicer-core) with a tiny SegVol: prompts, segments, undo, saving, bad input.

The tiny model is untrained, so its masks are arbitrary but deterministic: these tests check mechanics (which
voxel a prompt reaches, what the segment holds, what stays untouched), never segmentation quality.
"""
from __future__ import annotations

import numpy as np
import pytest

from mrml_support import affine, require_slicer_core, rotation, vtk_matrix

slicer = require_slicer_core()
torch = pytest.importorskip("torch")
pytest.importorskip("segvolgru.session", reason="the interactive session is not in this checkout yet")

from segvolgru.cache import EmbeddingCache  # noqa: E402
from segvolgru.config import TINY_CONFIG  # noqa: E402
from segvolgru.errors import InputError  # noqa: E402
from segvolgru.network import build_model  # noqa: E402
from segvolgru.session import InteractiveSession  # noqa: E402
from segvolgru.slicer_bridge import (  # noqa: E402
    PredictionError,
    SegmentationWorkflow,
    create_segment_editor,
    ensure_segment,
    kji_to_world,
    load_seg_nrrd,
    new_volume_node,
    read_segment_mask,
    roi_to_box_kji,
    save_seg_nrrd,
    volume_array_kji,
    write_segment_mask,
)
from segvolgru.slicer_bridge.workflow import PROMPTS_TAG  # noqa: E402
from segvolgru.synthetic_weights import synthetic_state_for  # noqa: E402

SHAPE = (14, 36, 40)  # (K, J, I)
SPACING_IJK = (0.9, 1.3, 2.5)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = build_model(TINY_CONFIG)
    net.load_state_dict(synthetic_state_for(net))
    return net.eval()


def phantom() -> np.ndarray:
    k, j, i = np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij")
    ball = ((k - 7) / 5.0) ** 2 + ((j - 18) / 11.0) ** 2 + ((i - 20) / 12.0) ** 2 < 1
    noise = np.random.default_rng(5).normal(0, 40, SHAPE)
    return (100 + 800 * ball + noise).astype(np.int16)


@pytest.fixture
def scene(mrml, model):
    """Anisotropic, flipped and oblique volume under a rotating parent transform; segments 'target' and 'other'."""
    directions = rotation(2, 25) @ rotation(0, -15) @ np.diag([-1.0, -1.0, 1.0])
    volume = new_volume_node(mrml.scene, phantom(), SPACING_IJK, (20.0, -12.0, 5.0), directions, "CT")
    parent = mrml.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")
    parent.SetMatrixTransformToParent(vtk_matrix(affine(rotation(1, 10), (3.0, -4.0, 6.0))))
    volume.SetAndObserveTransformNodeID(parent.GetID())
    segmentation = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    segmentation.SetAndObserveTransformNodeID(parent.GetID())
    target = ensure_segment(segmentation, "target")
    other = ensure_segment(segmentation, "other")
    other_mask = np.zeros(SHAPE, np.uint8)
    other_mask[1:4, 2:9, 3:12] = 1
    write_segment_mask(segmentation, other, other_mask, volume)
    editor = create_segment_editor(mrml.scene, segmentation, volume, app_logic=mrml.app_logic)
    workflow = SegmentationWorkflow(mrml.scene, volume, segmentation, editor, model, cache=EmbeddingCache())
    workflow.select_segment("target")
    return mrml, volume, segmentation, editor, workflow, target, other


def add_roi(scene_, volume, centre_kji, size_mm, degrees=20.0):
    roi = scene_.AddNewNodeByClass("vtkMRMLMarkupsROINode", "ROI")
    roi.SetSize(*size_mm)
    linear = rotation(0, degrees) @ rotation(2, -degrees / 2)
    roi.SetAndObserveObjectToNodeMatrix(vtk_matrix(affine(linear, kji_to_world(volume, centre_kji))))
    return roi


def point_list(scene_, name, voxels, volume):
    node = scene_.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for n, voxel in enumerate(voxels):
        node.AddControlPointWorld(list(kji_to_world(volume, voxel)), f"{name}-{n}")
    return node


def segment(segmentation, segment_id, volume) -> np.ndarray:
    return read_segment_mask(segmentation, segment_id, volume)


def clicks(workflow) -> list[tuple[list[int], bool]]:
    return [(p["voxel"], p["positive"]) for p in workflow.prompts() if p["type"] == "click"]


def test_rotated_roi_partly_outside_reaches_the_session_as_its_voxel_box(scene):
    mrml, volume, segmentation, _, workflow, target, _ = scene
    roi = add_roi(mrml.scene, volume, (2, 18, 20), (40.0, 30.0, 20.0))
    box = roi_to_box_kji(roi, volume)
    assert box[0] == 0  # the ROI sticks out of the volume below K = 0 and is clipped
    status = workflow.set_box_from_roi(roi)
    assert workflow.prompts() == [{"type": "box", "box": list(box)}]
    assert status.action == "Box" and status.segment_id == target and "target" in status.message
    np.testing.assert_array_equal(segment(segmentation, target, volume), workflow.mask())


def test_clicks_at_the_world_position_of_a_voxel_reach_the_engine_as_that_voxel(scene):
    mrml, volume, segmentation, _, workflow, target, _ = scene
    workflow.set_box_from_roi(add_roi(mrml.scene, volume, (7, 18, 20), (20.0, 30.0, 30.0)))
    positive = point_list(mrml.scene, "P", [(7, 18, 20), (9, 10, 30)], volume)
    negative = point_list(mrml.scene, "N", [(5, 25, 12)], volume)
    status = workflow.sync_clicks(positive, negative)
    assert clicks(workflow) == [([7, 18, 20], True), ([9, 10, 30], True), ([5, 25, 12], False)]
    assert status.prompt_count == 4
    assert workflow.sync_clicks(positive, negative) is None  # nothing new: no prediction
    np.testing.assert_array_equal(segment(segmentation, target, volume), workflow.mask())
    expected = InteractiveSession.replay(workflow.model(), volume_array_kji(volume), workflow.prompts(),
                                         spacing=workflow._spacing)
    np.testing.assert_array_equal(workflow.mask(), expected.mask)


def test_add_click_from_point_uses_that_point_and_its_polarity(scene):
    mrml, volume, segmentation, _, workflow, target, _ = scene
    workflow.set_box_from_roi(add_roi(mrml.scene, volume, (7, 18, 20), (20.0, 30.0, 30.0)))
    points = point_list(mrml.scene, "P", [(3, 4, 5), (8, 20, 22)], volume)
    workflow.add_click_from_point(points, 1, positive=False)
    assert clicks(workflow) == [([8, 20, 22], False)]
    np.testing.assert_array_equal(segment(segmentation, target, volume), workflow.mask())


def test_session_undo_and_redo_restore_segment_and_points_exactly(scene):
    mrml, volume, segmentation, _, workflow, target, _ = scene
    workflow.set_box_from_roi(add_roi(mrml.scene, volume, (7, 18, 20), (20.0, 30.0, 30.0)))
    after_box = segment(segmentation, target, volume)
    positive = point_list(mrml.scene, "P", [(7, 18, 20)], volume)
    negative = point_list(mrml.scene, "N", [], volume)
    workflow.sync_clicks(positive, negative)
    after_click = segment(segmentation, target, volume)

    workflow.undo()
    np.testing.assert_array_equal(segment(segmentation, target, volume), after_box)
    assert positive.GetNumberOfControlPoints() == 0 and clicks(workflow) == []
    assert workflow.sync_clicks(positive, negative) is None  # the removed point is not taken as a deletion

    workflow.redo()
    np.testing.assert_array_equal(segment(segmentation, target, volume), after_click)
    assert positive.GetNumberOfControlPoints() == 1 and clicks(workflow) == [([7, 18, 20], True)]
    assert workflow.sync_clicks(positive, negative) is None


def snapshot(workflow, segmentation, volume, lists, segment_ids):
    """Everything an undo must restore: every segment's voxels, the prompts and the points' world positions."""
    points = [[tuple(round(v, 6) for v in node.GetNthControlPointPositionWorld(i)) for i in
               range(node.GetNumberOfControlPoints())] for node in lists]
    return [segment(segmentation, s, volume) for s in segment_ids], workflow.prompts(), points


def assert_same_state(now, expected):
    for got, want in zip(now[0], expected[0]):
        np.testing.assert_array_equal(got, want)
    assert now[1:] == expected[1:]


def test_undo_and_redo_restore_box_clicks_moves_reset_and_clear_exactly(scene):
    mrml, volume, segmentation, editor, workflow, target, other = scene
    # Overwrite of other segments is on (Slicer's default), and the box covers part of 'other'.
    assert editor.GetSegmentEditorNode().GetOverwriteMode() == editor.GetSegmentEditorNode().OverwriteAllSegments
    positive, negative = point_list(mrml.scene, "P", [], volume), point_list(mrml.scene, "N", [], volume)
    lists, ids = (positive, negative), (target, other)
    states = [snapshot(workflow, segmentation, volume, lists, ids)]

    def record():
        states.append(snapshot(workflow, segmentation, volume, lists, ids))

    workflow.set_box_from_roi(add_roi(mrml.scene, volume, (4, 10, 12), (40.0, 40.0, 40.0), degrees=0.0))
    record()
    positive.AddControlPointWorld(list(kji_to_world(volume, (7, 18, 20))), "P-0")
    negative.AddControlPointWorld(list(kji_to_world(volume, (2, 5, 6))), "N-0")
    workflow.sync_clicks(positive, negative)
    record()
    positive.SetNthControlPointPositionWorld(0, *kji_to_world(volume, (8, 20, 22)))
    workflow.sync_clicks(positive, negative)
    record()
    workflow.reset_prompts()
    record()
    workflow.clear_segment()
    record()
    assert not segment(segmentation, target, volume).any()
    assert not np.array_equal(states[1][0][1], states[0][0][1])  # the box did overwrite part of 'other'

    for expected in reversed(states[:-1]):
        workflow.undo()
        assert_same_state(snapshot(workflow, segmentation, volume, lists, ids), expected)
        assert workflow.sync_clicks(positive, negative) is None  # the lists agree with the restored clicks
    with pytest.raises(InputError, match="Nothing to undo"):
        workflow.undo()
    for expected in states[1:]:
        workflow.redo()
        assert_same_state(snapshot(workflow, segmentation, volume, lists, ids), expected)
    with pytest.raises(InputError, match="Nothing to redo"):
        workflow.redo()

    workflow.undo()  # back before the clear: the session continues from the restored prompts
    workflow.undo()
    workflow.undo()
    assert len(clicks(workflow)) == 2
    workflow.sync_clicks(positive, negative)  # nothing pending
    positive.AddControlPointWorld(list(kji_to_world(volume, (6, 16, 18))), "P-1")
    workflow.sync_clicks(positive, negative)
    assert len(clicks(workflow)) == 3
    np.testing.assert_array_equal(segment(segmentation, target, volume), workflow.mask())


def test_private_editor_node_takes_the_users_masking_and_leaves_the_segment_editor_alone(scene):
    mrml, volume, segmentation, _, _, target, other = scene
    user_volume = new_volume_node(mrml.scene, np.zeros((4, 5, 6), np.int16), (1, 1, 1), (0, 0, 0), np.eye(3), "MR")
    user_segmentation = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "user's")
    singleton = slicer.vtkMRMLSegmentEditorNode()
    singleton.SetSingletonTag("SegmentEditor")
    singleton = mrml.scene.AddNode(singleton)
    singleton.SetAndObserveSegmentationNode(user_segmentation)
    singleton.SetAndObserveSourceVolumeNode(user_volume)
    singleton.SetOverwriteMode(singleton.OverwriteNone)
    singleton.SetMaskMode(segmentation.EditAllowedOutsideAllSegments)
    editor = create_segment_editor(mrml.scene, segmentation, volume, app_logic=mrml.app_logic)
    assert editor.GetSegmentEditorNode() is not singleton and editor.GetSegmentEditorNode().GetHideFromEditors()
    workflow = SegmentationWorkflow(mrml.scene, volume, segmentation, editor, scene[4].model(),
                                    cache=EmbeddingCache(), masking_from=lambda: singleton)
    workflow.select_segment("target")
    other_before = segment(segmentation, other, volume)
    workflow.set_box_from_roi(add_roi(mrml.scene, volume, (3, 6, 8), (30.0, 30.0, 30.0), degrees=0.0))

    assert singleton.GetSegmentationNode() is user_segmentation and singleton.GetSourceVolumeNode() is user_volume
    written, other_voxels = segment(segmentation, target, volume), other_before == 1
    assert workflow.mask()[other_voxels].any() and not written[other_voxels].any()  # the user's masking applied
    np.testing.assert_array_equal(segment(segmentation, other, volume), other_before)
    singleton.SetMaskMode(segmentation.EditAllowedEverywhere)  # changed later: the next write follows it
    workflow.clear_segment()
    workflow.undo()
    np.testing.assert_array_equal(segment(segmentation, target, volume), written)


def test_same_list_as_positive_and_negative_is_refused(scene):
    mrml, volume, _, _, workflow, _, _ = scene
    workflow.set_box_from_roi(add_roi(mrml.scene, volume, (7, 18, 20), (20.0, 30.0, 30.0)))
    both = point_list(mrml.scene, "P", [(7, 18, 20)], volume)
    with pytest.raises(InputError, match="both the positive and the negative"):
        workflow.sync_clicks(both, both)


def test_moved_and_deleted_points_replay_the_session_with_the_current_clicks(scene):
    mrml, volume, segmentation, _, workflow, target, _ = scene
    workflow.set_box_from_roi(add_roi(mrml.scene, volume, (7, 18, 20), (20.0, 30.0, 30.0)))
    positive = point_list(mrml.scene, "P", [(7, 18, 20), (9, 10, 30)], volume)
    workflow.sync_clicks(positive, None)
    positive.SetNthControlPointPositionWorld(0, *kji_to_world(volume, (8, 16, 22)))
    status = workflow.sync_clicks(positive, None)
    assert status.action == "Moved clicks"
    assert clicks(workflow) == [([8, 16, 22], True), ([9, 10, 30], True)]
    positive.RemoveNthControlPoint(1)
    workflow.sync_clicks(positive, None)
    assert clicks(workflow) == [([8, 16, 22], True)]
    fresh = InteractiveSession.replay(workflow.model(), volume_array_kji(volume), workflow.prompts(),
                                      spacing=workflow._spacing)
    np.testing.assert_array_equal(segment(segmentation, target, volume), fresh.mask)


def test_point_being_placed_is_ignored_until_it_is_placed(scene):
    mrml, volume, _, _, workflow, _, _ = scene
    workflow.set_box_from_roi(add_roi(mrml.scene, volume, (7, 18, 20), (20.0, 30.0, 30.0)))
    positive = point_list(mrml.scene, "P", [(7, 18, 20)], volume)
    preview = positive.AddControlPointWorld([0.0, 0.0, 0.0], "preview")
    positive.SetNthControlPointPosition(preview, 900.0, 900.0, 900.0, positive.PositionPreview)
    workflow.sync_clicks(positive, None)
    assert clicks(workflow) == [([7, 18, 20], True)]


def test_other_segment_and_source_volume_stay_bit_identical(scene):
    mrml, volume, segmentation, editor, workflow, target, other = scene
    editor.GetSegmentEditorNode().SetOverwriteMode(editor.GetSegmentEditorNode().OverwriteNone)
    source_before = volume_array_kji(volume).copy()
    other_before = segment(segmentation, other, volume)
    workflow.set_box_from_roi(add_roi(mrml.scene, volume, (4, 10, 12), (40.0, 40.0, 40.0), degrees=0.0))
    workflow.sync_clicks(point_list(mrml.scene, "P", [(2, 5, 6)], volume), point_list(mrml.scene, "N", [(9, 20, 20)], volume))
    workflow.undo()
    workflow.clear_segment()
    np.testing.assert_array_equal(volume_array_kji(volume), source_before)
    np.testing.assert_array_equal(segment(segmentation, other, volume), other_before)


def test_editable_area_outside_all_segments_keeps_prediction_off_the_other_segment(scene):
    mrml, volume, segmentation, editor, workflow, target, other = scene
    editor_node = editor.GetSegmentEditorNode()
    editor_node.SetOverwriteMode(editor_node.OverwriteNone)
    editor_node.SetMaskMode(segmentation.EditAllowedOutsideAllSegments)
    workflow.set_box_from_roi(add_roi(mrml.scene, volume, (3, 6, 8), (30.0, 30.0, 30.0), degrees=0.0))
    written = segment(segmentation, target, volume)
    other_voxels = segment(segmentation, other, volume) == 1
    assert workflow.mask()[other_voxels].any()  # the prediction does cover the other segment ...
    assert not written[other_voxels].any()  # ... but the editable area kept it out
    np.testing.assert_array_equal(written[~other_voxels], workflow.mask()[~other_voxels])


def test_segments_have_separate_sessions(scene):
    mrml, volume, segmentation, editor, workflow, target, _ = scene
    editor.GetSegmentEditorNode().SetOverwriteMode(editor.GetSegmentEditorNode().OverwriteNone)
    workflow.set_box_from_roi(add_roi(mrml.scene, volume, (7, 18, 20), (20.0, 30.0, 30.0)))
    first = segment(segmentation, target, volume)
    second = workflow.new_segment("second")
    assert workflow.segment_id == second and workflow.prompts() == []
    workflow.set_box_from_roi(add_roi(mrml.scene, volume, (9, 10, 12), (10.0, 10.0, 10.0), degrees=0.0))
    np.testing.assert_array_equal(segment(segmentation, target, volume), first)
    np.testing.assert_array_equal(segment(segmentation, second, volume), workflow.mask())
    assert workflow.select_segment("target") == target and len(workflow.prompts()) == 1
    with pytest.raises(InputError, match="already exists"):
        workflow.new_segment("second")
    with pytest.raises(InputError, match="no segment 'liver'"):
        workflow.select_segment("liver")


def test_reset_prompts_keeps_voxels_and_clear_segment_empties_it_undoably(scene):
    mrml, volume, segmentation, editor, workflow, target, _ = scene
    workflow.set_box_from_roi(add_roi(mrml.scene, volume, (7, 18, 20), (20.0, 30.0, 30.0)))
    positive = point_list(mrml.scene, "P", [(7, 18, 20)], volume)
    workflow.sync_clicks(positive, None)
    content = segment(segmentation, target, volume)
    workflow.reset_prompts()
    assert workflow.prompts() == [] and positive.GetNumberOfControlPoints() == 0
    np.testing.assert_array_equal(segment(segmentation, target, volume), content)
    assert not segmentation.GetSegmentation().GetSegment(target).HasTag(PROMPTS_TAG)
    status = workflow.clear_segment()
    assert status.changed_extent is not None and not segment(segmentation, target, volume).any()
    workflow.undo()
    np.testing.assert_array_equal(segment(segmentation, target, volume), content)


def test_saved_seg_nrrd_reopens_with_the_same_voxels_and_a_new_workflow_resumes_by_replay(scene, tmp_path, model):
    mrml, volume, segmentation, _, workflow, target, _ = scene
    workflow.set_box_from_roi(add_roi(mrml.scene, volume, (7, 18, 20), (20.0, 30.0, 30.0)))
    workflow.sync_clicks(point_list(mrml.scene, "P", [(7, 18, 20)], volume), point_list(mrml.scene, "N", [(5, 25, 12)], volume))
    saved_mask, saved_prompts = segment(segmentation, target, volume), workflow.prompts()
    path = tmp_path / "result.seg.nrrd"
    save_seg_nrrd(segmentation, path)
    reopened = load_seg_nrrd(mrml.scene, path, "reopened")
    reopened.SetAndObserveTransformNodeID(segmentation.GetTransformNodeID())
    reopened_id = reopened.GetSegmentation().GetSegmentIdBySegmentName("target")
    np.testing.assert_array_equal(read_segment_mask(reopened, reopened_id, volume), saved_mask)

    loads = []
    resumed = SegmentationWorkflow(mrml.scene, volume, reopened, None, lambda: loads.append(1) or model)
    assert resumed.select_segment("target") == reopened_id and resumed.prompts() == saved_prompts
    assert loads == []  # the model loads on the first prediction, not before
    status = resumed.apply(resumed.replay_step())
    assert status.changed_extent is None and loads == [1]
    np.testing.assert_array_equal(resumed.mask(), saved_mask)
    with pytest.raises(InputError, match="Nothing to undo"):  # undo history is per workflow, as Slicer's
        resumed.undo()
    resumed.sync_clicks(None, point_list(mrml.scene, "N2", [(9, 20, 20)], volume))
    resumed.undo()
    assert resumed.prompts() == saved_prompts


def test_step_phases_can_run_apart_as_on_a_worker_thread(scene):
    mrml, volume, segmentation, _, workflow, target, _ = scene
    step = workflow.box_step(add_roi(mrml.scene, volume, (7, 18, 20), (20.0, 30.0, 30.0)))
    assert not segment(segmentation, target, volume).any()  # preparing writes nothing
    step.compute()
    assert not segment(segmentation, target, volume).any()  # computing touches no MRML
    workflow.apply(step)
    np.testing.assert_array_equal(segment(segmentation, target, volume), workflow.mask())


def test_missing_inputs_are_rejected_with_messages(scene, model):
    mrml, volume, segmentation, editor, workflow, _, _ = scene
    with pytest.raises(InputError, match="No input volume"):
        SegmentationWorkflow(mrml.scene, None, segmentation, editor, model)
    with pytest.raises(InputError, match="No output segmentation"):
        SegmentationWorkflow(mrml.scene, volume, None, editor, model)
    with pytest.raises(InputError, match="No ROI"):
        workflow.set_box_from_roi(None)
    far = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "far")
    far.SetCenter(500.0, 500.0, 500.0)
    far.SetSize(5.0, 5.0, 5.0)
    with pytest.raises(InputError, match="covers no voxel"):
        workflow.set_box_from_roi(far)
    outside = point_list(mrml.scene, "P", [(7, 18, 20), (7, 18, 60)], volume)
    with pytest.raises(InputError, match="Point 1 .*outside the volume"):
        workflow.sync_clicks(outside, None)
    assert workflow.prompts() == []


def test_vector_volume_and_non_linear_transform_are_refused(scene, model):
    mrml, volume, segmentation, editor, _, _, _ = scene
    vector = mrml.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    with pytest.raises(InputError, match="vector"):
        SegmentationWorkflow(mrml.scene, vector, segmentation, editor, model)
    volume.SetAndObserveTransformNodeID(mrml.scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "grid").GetID())
    with pytest.raises(InputError, match="non-linear transform 'grid'.*Harden"):
        SegmentationWorkflow(mrml.scene, volume, segmentation, editor, model)


def test_prediction_failure_leaves_the_segment_as_it_was(scene, model):
    mrml, volume, segmentation, editor, workflow, target, _ = scene
    roi = add_roi(mrml.scene, volume, (7, 18, 20), (20.0, 30.0, 30.0))
    workflow.set_box_from_roi(roi)
    before, prompts = segment(segmentation, target, volume), workflow.prompts()

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert")

    model.decode, original = broken, model.decode
    try:
        with pytest.raises(PredictionError, match="left as it was"):
            workflow.sync_clicks(point_list(mrml.scene, "P", [(4, 8, 30)], volume), None)
    finally:
        model.decode = original
    np.testing.assert_array_equal(segment(segmentation, target, volume), before)
    assert workflow.prompts() == prompts
    workflow.undo()  # the session comes back by replay of the last applied prompts
    assert workflow.prompts() == []


def test_each_segment_shows_its_own_clicks_in_the_shared_point_lists(scene):
    mrml, volume, segmentation, editor, workflow, target, _ = scene
    editor.GetSegmentEditorNode().SetOverwriteMode(editor.GetSegmentEditorNode().OverwriteNone)
    positive = point_list(mrml.scene, "P", [], volume)
    workflow.set_box_from_roi(add_roi(mrml.scene, volume, (7, 18, 20), (20.0, 30.0, 30.0)))
    positive.AddControlPointWorld(list(kji_to_world(volume, (7, 18, 20))), "A-click")
    workflow.sync_clicks(positive, None)
    second = workflow.new_segment("second")
    assert positive.GetNumberOfControlPoints() == 0  # A's click left the list with A
    workflow.set_box_from_roi(add_roi(mrml.scene, volume, (9, 10, 12), (10.0, 10.0, 10.0), degrees=0.0))
    assert workflow.sync_clicks(positive, None) is None and clicks(workflow) == []
    positive.AddControlPointWorld(list(kji_to_world(volume, (9, 10, 12))), "B-click")
    workflow.sync_clicks(positive, None)
    workflow.select_segment("target")
    assert [positive.GetNthControlPointLabel(i) for i in range(positive.GetNumberOfControlPoints())] == ["A-click"]
    assert workflow.sync_clicks(positive, None) is None and clicks(workflow) == [([7, 18, 20], True)]
    workflow.undo()  # B's click: B is selected again, its list shows B's remaining clicks (none)
    assert workflow.segment_id == second and positive.GetNumberOfControlPoints() == 0
    workflow.select_segment("target")
    assert clicks(workflow) == [([7, 18, 20], True)] and positive.GetNumberOfControlPoints() == 1


def test_prompts_stored_by_the_previous_tag_version_still_reopen(scene, model):
    import json

    mrml, volume, segmentation, _, _, target, _ = scene
    old_tag = {"version": 1, "prompts": [{"type": "box", "box": [3, 10, 12, 9, 24, 28]}], "clicks": [],
               "settings": {"gru": True, "text": None, "hidden_size": 256, "row_dim": 64}}
    segmentation.GetSegmentation().GetSegment(target).SetTag(PROMPTS_TAG, json.dumps(old_tag))
    reopened = SegmentationWorkflow(mrml.scene, volume, segmentation, None, model, cache=EmbeddingCache())
    reopened.select_segment("target")
    assert reopened.prompts() == old_tag["prompts"]
    reopened.apply(reopened.replay_step())
    assert reopened.mask() is not None
    from vtkmodules.vtkCommonCore import reference

    value = reference("")
    segmentation.GetSegmentation().GetSegment(target).GetTag(PROMPTS_TAG, value)
    stored = json.loads(str(value))
    assert stored["version"] == 2 and "hidden_size" not in stored["settings"]
