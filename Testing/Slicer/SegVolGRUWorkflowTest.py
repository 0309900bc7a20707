"""SegmentationWorkflow inside the Slicer application: the application's scene and logics, and a scene
bundle (.mrb) that is saved, reopened and resumed by replay, the workflow's undo of a Clear while the Segment
Editor module's node stays untouched, and a box with the official weights (skipped when they are not downloaded).

Runs only inside Slicer (`ctest -R py_SegVolGRUWorkflowTest`, or
`Slicer --no-main-window --testing --python-script Testing/Slicer/SegVolGRUWorkflowTest.py`); pytest never
collects it. Apart from the official-weights test it uses a tiny synthetic SegVol, so it checks mechanics, not
segmentation quality; skipped with its reason when torch, monai or einops are not installed.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import unittest

import slicer

_LOGIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "SegVolGRU", "Logic")
if os.path.isdir(_LOGIC) and _LOGIC not in sys.path:
    sys.path.insert(0, _LOGIC)


def _tiny_model():
    from segvolgru.config import TINY_CONFIG
    from segvolgru.network import build_model
    from segvolgru.synthetic_weights import synthetic_state_for

    model = build_model(TINY_CONFIG)
    model.load_state_dict(synthetic_state_for(model))
    return model.eval()


class SegVolGRUWorkflowTest(unittest.TestCase):
    def setUp(self) -> None:
        try:
            import torch  # noqa: F401
        except Exception as error:  # ImportError, or OSError from a broken CUDA build
            self.skipTest(f"torch is not available ({error}); install it with the PyTorch Utils module")
        missing = [name for name in ("monai", "einops") if importlib.util.find_spec(name) is None]
        if missing:
            self.skipTest(f"{', '.join(missing)} not installed; tests install nothing: run the SegVolGRU module once "
                          "(it installs them) or slicer.util.pip_install them")
        slicer.mrmlScene.Clear()
        import numpy as np

        k, j, i = np.meshgrid(np.arange(16), np.arange(40), np.arange(48), indexing="ij")
        ball = ((k - 8) / 5.0) ** 2 + ((j - 20) / 10.0) ** 2 + ((i - 24) / 12.0) ** 2 < 1
        self.volume = slicer.util.addVolumeFromArray((100 + 800 * ball).astype(np.int16), name="phantom")
        self.volume.SetSpacing(0.9, 1.3, 2.5)
        self.segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")
        self.segmentation.CreateDefaultDisplayNodes()
        self.model = _tiny_model()

    def _workflow(self, segmentation):
        from segvolgru.slicer_bridge import SegmentationWorkflow

        return SegmentationWorkflow.open(
            slicer.mrmlScene, self.volume, segmentation, self.model, app_logic=slicer.app.applicationLogic(),
            masking_from=lambda: slicer.mrmlScene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode"))

    def _place(self, workflow):
        from segvolgru.slicer_bridge import kji_to_world

        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
        roi.SetCenter(*kji_to_world(self.volume, (8, 20, 24)))
        roi.SetSize(40.0, 30.0, 30.0)
        positive = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "plus")
        positive.AddControlPointWorld(list(kji_to_world(self.volume, (8, 20, 24))))
        workflow.new_segment("tumour")
        workflow.set_box_from_roi(roi)
        workflow.sync_clicks(positive, None)
        return roi, positive

    def test_session_undo_removes_the_last_click_and_its_point_and_redo_restores_them(self) -> None:
        from segvolgru.slicer_bridge import read_segment_mask

        workflow = self._workflow(self.segmentation)
        roi, positive = self._place(workflow)
        after_click = read_segment_mask(self.segmentation, workflow.segment_id, self.volume)
        self.assertTrue((after_click == workflow.mask()).all())
        workflow.undo()
        self.assertEqual(positive.GetNumberOfControlPoints(), 0)
        workflow.redo()
        self.assertTrue((read_segment_mask(self.segmentation, workflow.segment_id, self.volume) == after_click).all())

    def test_undo_restores_a_cleared_segment_and_its_prompts_and_leaves_the_segment_editor_alone(self) -> None:
        import numpy as np
        from segvolgru.slicer_bridge import read_segment_mask

        slicer.util.selectModule("SegmentEditor")  # its node now exists and edits what the user chose there
        editorNode = slicer.mrmlScene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")
        before = (editorNode.GetSegmentationNode(), editorNode.GetSourceVolumeNode()) if editorNode else None
        workflow = self._workflow(self.segmentation)
        _, positive = self._place(workflow)
        content, prompts = read_segment_mask(self.segmentation, workflow.segment_id, self.volume), workflow.prompts()
        workflow.clear_segment()
        self.assertFalse(read_segment_mask(self.segmentation, workflow.segment_id, self.volume).any())
        self.assertEqual(positive.GetNumberOfControlPoints(), 0)
        workflow.undo()
        np.testing.assert_array_equal(read_segment_mask(self.segmentation, workflow.segment_id, self.volume), content)
        self.assertEqual((workflow.prompts(), positive.GetNumberOfControlPoints()), (prompts, 1))
        workflow.redo()
        self.assertFalse(read_segment_mask(self.segmentation, workflow.segment_id, self.volume).any())
        if before is not None:
            self.assertEqual((editorNode.GetSegmentationNode(), editorNode.GetSourceVolumeNode()), before)

    def test_box_with_the_official_weights_gives_a_non_empty_segment(self) -> None:
        from segvolgru import load_model
        from segvolgru.slicer_bridge import read_segment_mask
        from segvolgru.weights import resolve_weights

        path = resolve_weights()
        if path is None:
            self.skipTest("the official SegVol weights are not downloaded (module Settings > Download)")
        self.model = load_model(path)
        workflow = self._workflow(self.segmentation)
        self._place(workflow)
        self.assertTrue(read_segment_mask(self.segmentation, workflow.segment_id, self.volume).any())

    def test_saved_scene_bundle_resumes_the_session_by_replay(self) -> None:
        from segvolgru.slicer_bridge import read_segment_mask

        workflow = self._workflow(self.segmentation)
        self._place(workflow)
        expected_prompts = workflow.prompts()
        expected_mask = read_segment_mask(self.segmentation, workflow.segment_id, self.volume)
        path = os.path.join(slicer.app.temporaryPath, "SegVolGRUWorkflowTest.mrb")
        self.assertTrue(slicer.util.saveScene(path))
        slicer.mrmlScene.Clear()
        slicer.util.loadScene(path)
        self.volume = slicer.util.getNode("phantom")
        segmentation = slicer.util.getNode("result")
        resumed = self._workflow(segmentation)
        resumed.select_segment("tumour")
        self.assertEqual(resumed.prompts(), expected_prompts)
        status = resumed.apply(resumed.replay_step())
        self.assertIsNone(status.changed_extent)
        self.assertTrue((resumed.mask() == expected_mask).all())
