"""SegmentationWorkflow inside the Slicer application: the application's scene and logics, and a scene
bundle (.mrb) that is saved, reopened and resumed by replay.

Runs only inside Slicer (`ctest -R py_SegVolGRUWorkflowTest`, or
`Slicer --no-main-window --testing --python-script Testing/Slicer/SegVolGRUWorkflowTest.py`); pytest never
collects it. Uses a tiny synthetic SegVol, so it checks mechanics, not segmentation quality; skipped with its
reason when torch is not installed.
"""
from __future__ import annotations

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
        except ImportError:
            self.skipTest("torch is not installed (install it with the PyTorch Utils module)")
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
        from segvolgru.slicer_bridge import SegmentationWorkflow, create_segment_editor

        editor = create_segment_editor(slicer.mrmlScene, segmentation, self.volume,
                                       app_logic=slicer.app.applicationLogic())
        return SegmentationWorkflow(slicer.mrmlScene, self.volume, segmentation, editor, self.model)

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

    def test_segment_editor_undo_reverts_the_last_click(self) -> None:
        from segvolgru.slicer_bridge import read_segment_mask

        workflow = self._workflow(self.segmentation)
        roi, positive = self._place(workflow)
        after_click = read_segment_mask(self.segmentation, workflow.segment_id, self.volume)
        self.assertTrue((after_click == workflow.mask()).all())
        workflow.undo()
        self.assertEqual(positive.GetNumberOfControlPoints(), 0)
        workflow.redo()
        self.assertTrue((read_segment_mask(self.segmentation, workflow.segment_id, self.volume) == after_click).all())

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
