"""The module file SegVolGRU/SegVolGRU.py itself, executed on real MRML (slicer-core) with the real engine and worker
thread; only what slicer-core lacks is stood in (Testing/slicer_standins.py). Covers the self-test and the Logic
behind every panel action."""
from __future__ import annotations

import ast
import logging
import time

import numpy as np
import pytest

from mrml_support import require_slicer_core
from slicer_standins import MODULE_FILE, SlicerStandIns

slicer = require_slicer_core()
torch = pytest.importorskip("torch")

from segvolgru.errors import InputError, InstallError  # noqa: E402
from segvolgru.slicer_bridge import kji_to_world, read_segment_mask  # noqa: E402


@pytest.fixture
def module(mrml):
    standins = SlicerStandIns(mrml)
    yield standins.module
    standins.remove()


@pytest.fixture
def panel(module, mrml):
    """A Logic on the DEMO model (CPU), a parameter node with a ball phantom, an ROI around it and click lists."""
    logic = module.SegVolGRULogic()
    logic.device = "cpu"
    k, j, i = np.meshgrid(np.arange(20), np.arange(48), np.arange(48), indexing="ij")
    ball = ((k - 10) / 6.0) ** 2 + ((j - 24) / 11.0) ** 2 + ((i - 24) / 12.0) ** 2 < 1
    values = (50 + 900 * ball + np.random.default_rng(0).normal(0, 30, ball.shape)).astype(np.int16)
    volume = slicer.util.addVolumeFromArray(values, nodeClassName="vtkMRMLScalarVolumeNode", name="phantom")
    volume.SetSpacing(1.2, 1.2, 2.5)
    node = logic.getParameterNode()
    node.inputVolume = volume
    logic.ensurePromptNodes(node)
    node.roi.SetCenter(*kji_to_world(volume, (10, 24, 24)))
    node.roi.SetSize(40.0, 40.0, 40.0)
    yield logic, node, volume
    logic.shutdown()


def segment_of(node, logic, volume):
    return read_segment_mask(node.segmentation, logic._workflow.segment_id, volume)


def test_module_never_binds_the_translation_function_underscore():
    bound = [node.lineno for node in ast.walk(ast.parse(MODULE_FILE.read_text(encoding="utf-8")))
             if isinstance(node, ast.Name) and node.id == "_" and isinstance(node.ctx, ast.Store)]
    assert bound == [], f"'_' is the translation function; lines {bound} rebind it"


def test_self_test_passes_through_the_module_file(module, caplog):
    caplog.set_level(logging.INFO)
    result = module.SegVolGRUTest("runTest").run()
    assert result.wasSuccessful(), result.errors + result.failures
    assert "Panel workflow passed on cpu" in caplog.text and "Skipped on cpu" not in caplog.text


def test_every_prediction_reaches_the_segment_and_a_failure_does_not_block_the_queue(panel, module):
    logic, node, volume = panel
    logic.segment(node)
    logic.waitForIdle(120)
    np.testing.assert_array_equal(segment_of(node, logic, volume), logic._workflow.mask())
    node.positivePoints.AddControlPointWorld(list(kji_to_world(volume, (10, 24, 24))))
    node.positivePoints.AddControlPointWorld(list(kji_to_world(volume, (10, 24, 24))))  # same voxel twice
    logic.syncClicks(node)
    logic.waitForIdle(120)
    node.negativePoints.AddControlPointWorld(list(kji_to_world(volume, (2, 3, 3))))
    logic.syncClicks(node)
    logic.waitForIdle(120)  # the queue still runs after whatever the previous request did
    assert [p["positive"] for p in logic._workflow.prompts() if p["type"] == "click"][-1] is False


def test_panel_status_line_reports_prediction_start_and_result(panel):
    logic, node, _ = panel
    messages = []
    logic.statusCallback = messages.append
    logic.segment(node)
    logic.waitForIdle(120)
    assert messages[0] == "Box: predicting..." and "segment updated" in messages[-1]


def test_undo_redo_cover_box_click_clear_and_reset_with_prompts(panel):
    logic, node, volume = panel
    logic.segment(node)
    logic.waitForIdle(120)
    after_box = segment_of(node, logic, volume)
    node.positivePoints.AddControlPointWorld(list(kji_to_world(volume, (10, 20, 30))))
    logic.syncClicks(node)
    logic.waitForIdle(120)
    after_click, prompts = segment_of(node, logic, volume), logic._workflow.prompts()
    logic.resetPrompts(node)
    assert logic._workflow.prompts() == [] and node.positivePoints.GetNumberOfControlPoints() == 0
    logic.clearSegment(node)
    assert not segment_of(node, logic, volume).any()
    logic.undo(node)  # clear
    logic.undo(node)  # reset
    logic.waitForIdle(120)
    np.testing.assert_array_equal(segment_of(node, logic, volume), after_click)
    assert logic._workflow.prompts() == prompts and node.positivePoints.GetNumberOfControlPoints() == 1
    logic.undo(node)
    logic.waitForIdle(120)
    np.testing.assert_array_equal(segment_of(node, logic, volume), after_box)
    logic.redo(node)
    logic.waitForIdle(120)
    np.testing.assert_array_equal(segment_of(node, logic, volume), after_click)


def test_segment_editor_singleton_keeps_its_segmentation_and_its_masking_applies(panel, mrml):
    logic, node, volume = panel
    other_segmentation = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "user's")
    singleton = slicer.vtkMRMLSegmentEditorNode()
    singleton.SetSingletonTag("SegmentEditor")
    singleton = mrml.scene.AddNode(singleton)
    singleton.SetAndObserveSegmentationNode(other_segmentation)
    singleton.SetSourceVolumeIntensityMask(True)
    singleton.SetSourceVolumeIntensityMaskRange(-1000.0, 500.0)  # the ball (about 950) is not editable
    logic.segment(node)
    logic.waitForIdle(120)
    assert singleton.GetSegmentationNode() is other_segmentation and singleton.GetSourceVolumeNode() is None
    values = slicer.util.arrayFromVolume(volume)
    written = segment_of(node, logic, volume)
    assert logic._workflow.mask()[values > 500].any() and not written[values > 500].any()


def test_new_and_selected_segments_get_their_own_prompts(panel):
    logic, node, _ = panel
    logic.segment(node)
    logic.waitForIdle(120)
    first = logic._workflow.segment_id
    second = logic.newSegment(node)
    assert second != first and logic._workflow.prompts() == []
    logic.selectSegment(node, first)
    assert len(logic._workflow.prompts()) == 1
    with pytest.raises(InputError, match="no segment"):
        logic.selectSegment(node, "liver")


def test_device_or_weights_change_mid_compute_drops_the_result_and_keeps_the_history(panel):
    logic, node, volume = panel
    logic.segment(node)
    logic.waitForIdle(120)
    before = segment_of(node, logic, volume)
    messages = []
    logic.statusCallback = messages.append
    node.positivePoints.AddControlPointWorld(list(kji_to_world(volume, (10, 20, 30))))
    logic.syncClicks(node)
    logic.setDevice("cpu")
    logic.waitForIdle(120)
    assert "result dropped" in messages[-1]
    np.testing.assert_array_equal(segment_of(node, logic, volume), before)
    logic.undo(node)  # the box is still undoable with the new model
    logic.waitForIdle(120)
    assert not segment_of(node, logic, volume).any()


def test_errors_surface_on_the_main_thread_and_later_requests_still_run(panel):
    logic, node, volume = panel
    node.roi.SetCenter(1000.0, 1000.0, 1000.0)  # outside the volume
    logic.segment(node)
    with pytest.raises(InputError):
        logic.waitForIdle(120)
    node.roi.SetCenter(*kji_to_world(volume, (10, 24, 24)))
    logic.segment(node)
    logic.waitForIdle(120)
    assert segment_of(node, logic, volume).any()


def test_shutdown_does_not_wait_for_a_running_prediction_and_a_late_poll_touches_nothing(panel, module):
    logic, node, _ = panel
    messages = []
    logic.statusCallback = messages.append
    logic.segment(node)
    started = time.monotonic()
    logic.shutdown()
    assert time.monotonic() - started < 1.0
    slicer.app.processEvents()  # timers that fire after a module reload
    assert messages == ["Box: predicting..."]


def test_closed_scene_stays_empty_and_the_parameter_node_is_not_created_by_looking(module, mrml):
    logic = module.SegVolGRULogic()
    count = mrml.scene.GetNumberOfNodes()
    assert logic.existingParameterNode() is None
    assert mrml.scene.GetNumberOfNodes() == count


def test_requirements_check_refuses_old_slicer_with_what_to_upgrade(module):
    slicer.app.minorVersion = 8
    try:
        with pytest.raises(InstallError, match="Slicer 5.10 or later"):
            module.SegVolGRULogic().setupPythonRequirements(askConfirmation=False)
    finally:
        slicer.app.minorVersion = 10


def test_worker_waits_let_the_worker_run_while_the_main_loop_holds_the_gil(panel, caplog):
    """Slicer's main thread holds the GIL between events; polling waits on the future, so a step still runs."""
    import ctypes

    hold = ctypes.PyDLL(None).usleep  # a C call made with the GIL held, as Qt's idle loop does
    hold.argtypes = [ctypes.c_uint]
    logic, node, _ = panel
    logging.getLogger().setLevel(logging.INFO)
    logic.segment(node)
    deadline = time.monotonic() + 120
    while logic._steps.busy:
        assert time.monotonic() < deadline
        hold(5000)
        slicer.app.processEvents()
    assert logic._workflow.mask() is not None


# ---------------------------------------------------------------- the panel (widget stand-ins built from the .ui)
@pytest.fixture
def widget(module, mrml):
    panel = module.SegVolGRUWidget()
    panel.setup()
    yield panel
    panel.cleanup()


def press(keys: str) -> None:
    import qt

    (shortcut,) = [s for s in qt.shortcuts if s.keys == keys]
    shortcut.slot()


def ball_volume(mrml):
    k, j, i = np.meshgrid(np.arange(20), np.arange(48), np.arange(48), indexing="ij")
    ball = ((k - 10) / 6.0) ** 2 + ((j - 24) / 11.0) ** 2 + ((i - 24) / 12.0) ** 2 < 1
    return slicer.util.addVolumeFromArray((50 + 900 * ball).astype(np.int16), name="ball")


def test_entering_adds_nothing_to_the_scene_and_hides_the_second_segmentation_selector(widget, mrml):
    ball_volume(mrml)
    count = mrml.scene.GetNumberOfNodes()
    widget.enter()
    assert mrml.scene.GetNumberOfNodes() == count and widget.logic.existingParameterNode() is None
    assert widget.ui.segmentSelectorWidget.segmentationNodeSelectorVisible is False
    widget.exit()
    assert mrml.scene.GetNumberOfNodes() == count


def test_shortcuts_exist_from_enter_to_exit_and_both_redo_keys_redo(widget, mrml):
    import qt

    widget.enter()
    assert {s.keys for s in qt.shortcuts} == {"Ctrl+Return", "Ctrl+Z", "Ctrl+Y", "Ctrl+Shift+Z"}
    widget.ui.inputVolumeSelector.setCurrentNode(ball_volume(mrml))
    said = []
    for keys in ("Ctrl+Z", "Ctrl+Y", "Ctrl+Shift+Z"):
        press(keys)
        slicer.app.processEvents()
        said.append(widget.ui.statusLabel.text.split(":")[0])
    assert said == ["Nothing to undo", "Nothing to redo", "Nothing to redo"]
    widget.exit()
    assert qt.shortcuts == []


def test_first_selection_creates_the_parameter_node_and_exit_stops_observing_it(widget, mrml):
    widget.enter()
    volume = ball_volume(mrml)
    widget.ui.inputVolumeSelector.setCurrentNode(volume)
    node, bound = widget.logic.existingParameterNode(), widget._parameterNode
    assert node is not None and node.inputVolume is volume and node.roi is None  # no prompt nodes yet
    assert any(obs[0] is bound for obs in widget.Observations)
    widget.exit()
    assert not any(obs[0] is bound for obs in widget.Observations)


def test_a_closed_scene_stays_empty(widget, mrml):
    widget.enter()
    widget.ui.inputVolumeSelector.setCurrentNode(ball_volume(mrml))
    widget.ui.newSegmentButton.click()
    mrml.scene.Clear()
    empty = mrml.scene.GetNumberOfNodes()
    slicer.app.processEvents()
    assert mrml.scene.GetNumberOfNodes() == empty  # nothing is added back after the close
    # the parameter node is a singleton, which a close resets rather than removes (as for every module)
    assert widget.logic.existingParameterNode().inputVolume is None and widget.logic._workflow is None
    widget.exit()
    widget.enter()
    assert mrml.scene.GetNumberOfNodes() == empty


def test_markups_callbacks_and_a_local_weights_file_never_ask_to_install(widget, mrml, monkeypatch, tmp_path):
    import qt

    def no_install(*args, **kwargs):
        raise AssertionError("an install dialog would open")

    monkeypatch.setattr(widget.logic, "setupPythonRequirements", no_install)
    widget.enter()
    widget.ui.inputVolumeSelector.setCurrentNode(ball_volume(mrml))
    points = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "P")
    widget.ui.positivePointsSelector.setCurrentNode(points)
    points.AddControlPointWorld([1.0, 2.0, 3.0])
    assert "Press Segment once first" in widget.ui.statusLabel.text
    weights = tmp_path / "not-weights.pt"
    weights.write_bytes(b"junk")
    qt.QFileDialog.answer = str(weights)
    widget.ui.useLocalWeightsButton.click()  # the file is refused (not weights), without an install dialog
    assert "junk" not in widget.ui.statusLabel.text and widget.ui.statusLabel.text


def test_picking_another_segmentation_selects_its_segment_and_creates_nothing(widget, mrml, monkeypatch):
    widget.enter()
    volume = ball_volume(mrml)
    widget.ui.inputVolumeSelector.setCurrentNode(volume)
    other = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "other")
    other.GetSegmentation().AddEmptySegment("kidney", "kidney")
    count = mrml.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    errors = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kwargs: errors.append(text))
    widget.ui.segmentationSelector.setCurrentNode(other)
    slicer.app.processEvents()
    assert errors == [] and mrml.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == count
    assert widget._parameterNode.segmentation is other
    assert widget.logic.workflow(widget._parameterNode).segment_id == "kidney"


def test_moved_points_update_after_a_pause_and_never_while_dragged(widget, mrml, monkeypatch):
    updates = []
    monkeypatch.setattr(widget.logic, "update", lambda node: updates.append(node))
    widget.logic.requirementsChecked = True
    widget.enter()
    widget.ui.inputVolumeSelector.setCurrentNode(ball_volume(mrml))
    points = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "P")
    points.AddControlPointWorld([1.0, 2.0, 3.0])
    widget.ui.positivePointsSelector.setCurrentNode(points)
    monkeypatch.setattr(widget.logic, "syncClicks", lambda node: None)
    points.InvokeEvent(points.PointStartInteractionEvent)
    points.SetNthControlPointPositionWorld(0, 4.0, 5.0, 6.0)
    time.sleep(0.4)
    slicer.app.processEvents()
    assert updates == []  # still being dragged
    points.InvokeEvent(points.PointEndInteractionEvent)
    points.SetNthControlPointPositionWorld(0, 7.0, 8.0, 9.0)  # as from the Markups table
    points.SetNthControlPointPositionWorld(0, 7.5, 8.0, 9.0)
    time.sleep(0.4)
    slicer.app.processEvents()
    assert len(updates) == 1  # one update for the stream of moves


def test_cleanup_after_a_reload_leaves_no_shortcut_and_runs_nothing_more(widget, mrml):
    import qt

    widget.enter()
    widget.ui.inputVolumeSelector.setCurrentNode(ball_volume(mrml))
    widget.cleanup()
    assert qt.shortcuts == [] and widget._parameterNode is None
    widget.logic.submit(lambda: pytest.fail("a request ran after cleanup"))
    slicer.app.processEvents()


def test_module_class_says_what_to_upgrade_on_an_old_slicer(module, caplog):
    import types

    slicer.app.minorVersion = 8
    try:
        parent = types.SimpleNamespace()
        module.SegVolGRU(parent)
    finally:
        slicer.app.minorVersion = 10
    assert parent.helpText.startswith("SegVolGRU needs Slicer 5.10 or later (this is 5.8)")
