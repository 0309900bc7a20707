"""SegVolGRU: interactive SegVol segmentation with GRU click correction, as a 3D Slicer scripted module.

Only this file knows Qt and the Slicer application. Everything else (prompt mapping, sessions, writes into
segments, stored prompts) lives in ``segvolgru.slicer_bridge.SegmentationWorkflow`` under ``Logic/``, which
pytest drives on ``slicer-core``. This module adds the panel, first-use installs, a worker thread for torch
and per-machine settings.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import sys
import unittest

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# The engine package sits beside this file; putting its folder on the path imports nothing yet.
_LOGIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "Logic")
if _LOGIC_DIR not in sys.path:
    sys.path.insert(0, _LOGIC_DIR)

_SETTINGS_DEVICE = "SegVolGRU/Device"
_SETTINGS_WEIGHTS = "SegVolGRU/WeightsPath"
_POLL_MS = 30
_TORCH_REQUIREMENT = ">=2.2"
_POSITIVE_COLOR = (0.2, 0.85, 0.3)
_NEGATIVE_COLOR = (0.95, 0.25, 0.2)


class InstallError(RuntimeError):
    """A dependency could not be installed; the message says what to do (restart, install by hand)."""


#
# SegVolGRU
#


class SegVolGRU(ScriptedLoadableModule):
    """Module metadata; nothing is imported or installed here."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SegVolGRU")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["Segmentations", "Markups"]
        self.parent.contributors = ["SegVolGRU developers"]
        self.parent.helpText = _(
            "Interactive 3D segmentation with the SegVol foundation model: draw a box (ROI), then refine with "
            "positive and negative clicks; a GRU correction carries the click history. Results go into the "
            "selected segment through the Segment Editor, so its masking settings and undo apply. "
            "See the README for a tutorial and for running the tests."
        )
        self.parent.acknowledgementText = _(
            "SegVol: Du Y. et al., 'SegVol: Universal and Interactive Volumetric Medical Image Segmentation', "
            "NeurIPS 2024 (BAAI-DCAI/SegVol; check the weights' licence before use). The stateful GRU click "
            "correction follows the SegVol_GRU_Correction work for the CVPR 2025 foundation-model challenge "
            "on interactive 3D segmentation. Not a medical device."
        )


#
# SegVolGRUParameterNode
#


@parameterNodeWrapper
class SegVolGRUParameterNode:
    """Per-scene state of the panel (saved with the scene).

    inputVolume: volume to segment. roi: box prompt. positivePoints / negativePoints: click lists.
    segmentation: output. textPrompt: optional organ name (models with a text tower). autoUpdate: refine on
    every placed or moved click. useGru: the GRU click correction.
    """

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    roi: slicer.vtkMRMLMarkupsROINode
    positivePoints: slicer.vtkMRMLMarkupsFiducialNode
    negativePoints: slicer.vtkMRMLMarkupsFiducialNode
    segmentation: slicer.vtkMRMLSegmentationNode
    textPrompt: str = ""
    autoUpdate: bool = True
    useGru: bool = True


#
# SegVolGRUWidget
#


class SegVolGRUWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: binds widgets to the parameter node, observes the point lists and calls the Logic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._observedPoints = []
        self._shortcuts = []

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SegVolGRU.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SegVolGRULogic()
        self.logic.statusCallback = self.showStatus

        self.ui.roiPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup
        for placeWidget in (self.ui.positivePlaceWidget, self.ui.negativePlaceWidget):
            placeWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        self.ui.roiSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.ui.roiPlaceWidget.setCurrentNode)
        self.ui.positivePointsSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onPointListsChanged)
        self.ui.negativePointsSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onPointListsChanged)
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.segmentSelectorWidget.connect("currentSegmentChanged(QString)", self.onSegmentChanged)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.newSegmentButton.connect("clicked(bool)", self.onNewSegment)
        for button, action in ((self.ui.undoButton, self.logic.undo), (self.ui.redoButton, self.logic.redo),
                               (self.ui.resetPromptsButton, self.logic.resetPrompts),
                               (self.ui.clearSegmentButton, self.logic.clearSegment)):
            button.connect("clicked(bool)", lambda checked=False, action=action: self.run(
                lambda: action(self._parameterNode)))
        self.ui.deviceComboBox.addItems(["auto", "cpu", "cuda"])
        self.ui.deviceComboBox.setCurrentText(self.logic.device)
        self.ui.deviceComboBox.connect("currentTextChanged(QString)", self.onDeviceChanged)
        self.ui.downloadWeightsButton.connect("clicked(bool)", self.onDownloadWeights)
        self.ui.useLocalWeightsButton.connect("clicked(bool)", self.onUseLocalWeights)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode(createPrompts=False)
        self.updateWeightsStatus()

    def cleanup(self) -> None:
        self.removeObservers()
        if self.logic is not None:
            self.logic.shutdown()

    def enter(self) -> None:
        self.initializeParameterNode()
        # Shortcuts live only while the panel is shown, so they never shadow other modules' keys.
        for keys, slot in (("Ctrl+Return", self.onSegmentButton),
                           ("Ctrl+Z", lambda: self.run(lambda: self.logic.undo(self._parameterNode))),
                           ("Ctrl+Y", lambda: self.run(lambda: self.logic.redo(self._parameterNode)))):
            shortcut = qt.QShortcut(qt.QKeySequence(keys), slicer.util.mainWindow() or self.parent)
            shortcut.connect("activated()", slot)
            self._shortcuts.append(shortcut)

    def exit(self) -> None:
        for shortcut in self._shortcuts:
            shortcut.disconnect("activated()")
            shortcut.setParent(None)
        self._shortcuts = []
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.forgetWorkflow()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self, createPrompts: bool = True) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        if createPrompts:
            self.logic.ensurePromptNodes(self._parameterNode)
            self.onPointListsChanged()

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self.onPointListsChanged()
            self.onSegmentationChanged(self._parameterNode.segmentation)
        self.updateButtons()

    def updateButtons(self, caller=None, event=None) -> None:
        node = self._parameterNode
        ready = bool(node and node.inputVolume and node.roi and node.segmentation)
        self.ui.segmentButton.enabled = ready
        self.ui.segmentButton.toolTip = _("Run SegVol on the box.") if ready else _(
            "Select an input volume, an ROI and an output segmentation first.")
        for button in (self.ui.undoButton, self.ui.redoButton, self.ui.resetPromptsButton, self.ui.clearSegmentButton):
            button.enabled = bool(node and node.inputVolume and node.segmentation)

    def onPointListsChanged(self, node=None) -> None:
        for observed in self._observedPoints:
            self.removeObserver(observed, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self.onPointsEdited)
            self.removeObserver(observed, slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, self.onPointsEdited)
            self.removeObserver(observed, slicer.vtkMRMLMarkupsNode.PointRemovedEvent, self.onPointsEdited)
        self._observedPoints = []
        if not self._parameterNode:
            return
        pairs = ((self._parameterNode.positivePoints, self.ui.positivePlaceWidget, _POSITIVE_COLOR),
                 (self._parameterNode.negativePoints, self.ui.negativePlaceWidget, _NEGATIVE_COLOR))
        for points, placeWidget, color in pairs:
            placeWidget.setCurrentNode(points)
            if points is None:
                continue
            SegVolGRULogic.colorPoints(points, color)
            for event in (slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                          slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent,
                          slicer.vtkMRMLMarkupsNode.PointRemovedEvent):
                self.addObserver(points, event, self.onPointsEdited)
            self._observedPoints.append(points)

    def onPointsEdited(self, caller, event) -> None:
        if self._parameterNode and self._parameterNode.autoUpdate and not self.logic.applying:
            self.run(lambda: self.logic.syncClicks(self._parameterNode))

    def onSegmentationChanged(self, node) -> None:
        self.ui.segmentSelectorWidget.setCurrentNode(node)

    def onSegmentChanged(self, segmentId) -> None:
        if segmentId and self._parameterNode and self._parameterNode.inputVolume:
            self.run(lambda: self.logic.selectSegment(self._parameterNode, segmentId), needsModel=False)

    def onNewSegment(self) -> None:
        def create():
            segmentId = self.logic.newSegment(self._parameterNode)
            self.ui.segmentSelectorWidget.setCurrentSegmentID(segmentId)

        self.run(create, needsModel=False)

    def onSegmentButton(self) -> None:
        self.run(lambda: self.logic.segmentBox(self._parameterNode))

    def onDeviceChanged(self, device) -> None:
        self.run(lambda: self.logic.setDevice(device), needsModel=False)
        self.updateWeightsStatus()

    def onDownloadWeights(self) -> None:
        self.run(self.logic.downloadOfficialWeights)
        self.updateWeightsStatus()

    def onUseLocalWeights(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, _("SegVol weights file"), "",
                                              _("Weights (*.bin *.pt *.pth *.safetensors);;All files (*)"))
        if path:
            self.run(lambda: self.logic.useLocalWeights(path))
            self.updateWeightsStatus()

    def updateWeightsStatus(self) -> None:
        self.ui.weightsStatusLabel.text = self.logic.weightsStatus()
        self.ui.detectedDeviceLabel.text = self.logic.detectedDevice()

    def showStatus(self, message: str) -> None:
        self.ui.statusLabel.text = message
        slicer.util.showStatusMessage(message, 5000)

    def run(self, action, needsModel: bool = True) -> None:
        """Run an action with the error shown in the panel and a dialog; nothing is changed on failure.

        Actions that predict first make sure torch and the other packages are installed (asking first).
        """
        from segvolgru.errors import SegVolGRUError

        try:
            if needsModel:
                self.logic.setupPythonRequirements()
            action()
        except (SegVolGRUError, InstallError, ValueError) as error:
            self.showStatus(str(error))
            slicer.util.errorDisplay(str(error), windowTitle="SegVolGRU")
        self.updateButtons()


#
# SegVolGRULogic
#


class SegVolGRULogic(ScriptedLoadableModuleLogic):
    """Installs, the worker thread and settings around ``SegmentationWorkflow``, usable without the panel.

    Requests (box, clicks, undo, ...) are queued; each is prepared on the main thread when its turn comes,
    computed on one worker thread (torch only) and applied on the main thread, so clicks placed while a
    prediction runs are kept and handled in order. ``statusCallback(message)`` reports each result.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.statusCallback = logging.info
        self.applying = False
        self._workflow = None
        self._workflowKey = None
        self._model = None
        self._modelDescription = ""
        self._requirementsChecked = False
        self._executor = None
        self._queue = collections.deque()
        self._running = None
        settings = qt.QSettings()
        self.device = str(settings.value(_SETTINGS_DEVICE, "auto"))
        self.weightsPath = str(settings.value(_SETTINGS_WEIGHTS, "")) or None
        self.lastError = None

    def getParameterNode(self):
        return SegVolGRUParameterNode(super().getParameterNode())

    # ---------------------------------------------------------------- dependencies (first use only)
    def setupPythonRequirements(self, askConfirmation: bool = True) -> None:
        """torch through the PyTorch extension, then the packages of Resources/requirements.txt."""
        if self._requirementsChecked:
            return
        try:
            import PyTorchUtils
        except ImportError:
            raise InstallError(_("The PyTorch extension is missing: install 'PyTorch' from the Extensions Manager, "
                                 "restart Slicer and try again.")) from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            if slicer.app.testingEnabled():
                raise InstallError(_("torch is not installed; tests do not install it. Install it from the PyTorch "
                                     "Utils module first."))
            backend = "cpu" if self.device == "cpu" else None
            if not torchLogic.installTorch(askConfirmation=askConfirmation, forceComputationBackend=backend,
                                           torchVersionRequirement=_TORCH_REQUIREMENT):
                raise InstallError(_("torch was not installed. Install it from the PyTorch Utils module, then retry."))
        requirements = self.resourcePath("requirements.txt")
        try:
            if hasattr(slicer, "packaging") and hasattr(slicer.packaging, "pip_ensure"):
                slicer.packaging.pip_ensure(slicer.packaging.load_requirements(requirements), requester="SegVolGRU")
            else:
                missing = self._missingRequirements(requirements)
                if missing:
                    if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                            _("SegVolGRU needs these Python packages: {0}. Install them now?").format(", ".join(missing))):
                        raise InstallError(_("The required Python packages were not installed."))
                    slicer.util.pip_install(["-r", requirements])
        except InstallError:
            raise
        except Exception as error:
            raise InstallError(_("Installing Python packages failed ({0}). Check the network, or run "
                                 "slicer.util.pip_install('-r {1}') in the Python console, then restart Slicer.")
                               .format(error, requirements)) from error
        self._requirementsChecked = True

    @staticmethod
    def _missingRequirements(path: str) -> list[str]:
        import importlib.metadata
        import re

        missing = []
        with open(path, encoding="utf-8") as lines:
            for line in lines:
                name = re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0]
                if not name or name.startswith("#"):
                    continue
                try:
                    importlib.metadata.version(name)
                except importlib.metadata.PackageNotFoundError:
                    missing.append(name)
        return missing

    def resourcePath(self, relativePath: str) -> str:
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", relativePath)

    # ---------------------------------------------------------------- settings and model
    def setDevice(self, device: str) -> None:
        """"auto", "cpu" or "cuda"; stored in the application settings. The model moves on its next use."""
        self.device = device
        qt.QSettings().setValue(_SETTINGS_DEVICE, device)
        self._model = None
        self.forgetWorkflow()

    @staticmethod
    def sessionSettings(parameterNode) -> dict:
        """Session settings from the panel: GRU on/off and the optional text prompt."""
        return {"gru": bool(parameterNode.useGru), "text": parameterNode.textPrompt.strip() or None}

    def detectedDevice(self) -> str:
        try:
            from segvolgru.device import describe_device, resolve_device

            return describe_device(resolve_device("auto"))
        except ImportError:
            return _("(torch not installed yet)")

    def weightsStatus(self) -> str:
        path = self._weightsFile()
        if path is not None:
            return _("SegVol weights: {0}").format(path)
        return _("No official weights found: the bundled demo model is used (for trying the module only).")

    def _weightsFile(self):
        try:
            from segvolgru.weights import resolve_weights
        except ImportError:
            return None
        try:
            return resolve_weights(self.weightsPath)
        except Exception:
            return None

    def downloadOfficialWeights(self) -> None:
        """Download the official release (SHA-256 checked) with a progress dialog; blocking."""
        from segvolgru.weights import download_official_weights

        with slicer.util.WaitCursor():
            progress = slicer.util.createProgressDialog(labelText=_("Downloading the SegVol weights (about 700 MB)..."),
                                                        maximum=0)
            try:
                slicer.app.processEvents()
                path = download_official_weights()
            finally:
                progress.close()
        self.useLocalWeights(str(path))

    def useLocalWeights(self, path: str) -> None:
        from segvolgru.weights import verify_weights

        verify_weights(path)
        self.weightsPath = path
        qt.QSettings().setValue(_SETTINGS_WEIGHTS, path)
        self._model = None
        self.forgetWorkflow()

    def loadModel(self):
        """The model for the current weights and device: official weights when found, else the demo model.

        Called on the worker thread (torch only); the result is kept for later requests.
        """
        if self._model is not None:
            return self._model
        import segvolgru
        from segvolgru.device import resolve_device
        from segvolgru.errors import WeightsError

        # Plain strings here: this runs off the main thread, where Qt's translator must not be called.
        device = str(resolve_device(self.device))
        path = self._weightsFile()
        if path is not None:
            self._modelDescription = "official SegVol weights"
        else:
            demo = getattr(segvolgru, "demo_model_path", None)
            path = demo() if demo else None
            if path is None or not os.path.exists(path):
                raise WeightsError("No weights: download the official SegVol weights or choose a local file "
                                   "(Settings section); no demo model is bundled in this build.")
            self._modelDescription = "demo model (for trying the module only)"
        self._model = segvolgru.load_model(path, device=device)
        return self._model

    # ---------------------------------------------------------------- workflow
    def forgetWorkflow(self) -> None:
        self._queue.clear()
        self._workflow = None
        self._workflowKey = None

    def workflow(self, parameterNode):
        """The workflow for the panel's volume and segmentation (a new one when either changed)."""
        from segvolgru.errors import InputError
        from segvolgru.slicer_bridge import SegmentationWorkflow, create_segment_editor

        volume, segmentation = parameterNode.inputVolume, parameterNode.segmentation
        if volume is None:
            raise InputError(_("No input volume: select the volume to segment first."))
        if segmentation is None:
            segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume.GetName()} SegVolGRU")
            segmentation.CreateDefaultDisplayNodes()
            segmentation.SetAndObserveTransformNodeID(volume.GetTransformNodeID())
            parameterNode.segmentation = segmentation
        key = (volume.GetID(), segmentation.GetID())
        if self._workflow is None or key != self._workflowKey:
            # Share the Segment Editor module's node, so its masking settings apply to SegVolGRU's writes too.
            editorNode = slicer.mrmlScene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode")
            if editorNode is None:
                editorNode = slicer.vtkMRMLSegmentEditorNode()
                editorNode.SetSingletonTag("SegmentEditor")
                editorNode = slicer.mrmlScene.AddNode(editorNode)
            editor = create_segment_editor(slicer.mrmlScene, segmentation, volume, editorNode,
                                           slicer.app.applicationLogic())
            self._workflow = SegmentationWorkflow(slicer.mrmlScene, volume, segmentation, editor, self.loadModel,
                                                  settings=self.sessionSettings(parameterNode))
            self._workflowKey = key
        elif self._workflow.settings != self.sessionSettings(parameterNode):
            self._workflow.set_settings(self.sessionSettings(parameterNode))
        return self._workflow

    def ensurePromptNodes(self, parameterNode) -> None:
        """Create the ROI and the two click lists when missing (the only markups this module creates)."""
        if not parameterNode.roi:
            parameterNode.roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "SegVolGRU box")
        if not parameterNode.positivePoints:
            parameterNode.positivePoints = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "SegVolGRU +")
        if not parameterNode.negativePoints:
            parameterNode.negativePoints = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "SegVolGRU -")
        self.colorPoints(parameterNode.positivePoints, _POSITIVE_COLOR)
        self.colorPoints(parameterNode.negativePoints, _NEGATIVE_COLOR)

    @staticmethod
    def colorPoints(points, color) -> None:
        points.CreateDefaultDisplayNodes()
        display = points.GetDisplayNode()
        display.SetSelectedColor(*color)
        display.SetColor(*color)

    def segmentBox(self, parameterNode) -> None:
        self.submit(lambda: self.workflow(parameterNode).box_step(parameterNode.roi))

    def syncClicks(self, parameterNode) -> None:
        self.submit(lambda: self.workflow(parameterNode).sync_step(parameterNode.positivePoints,
                                                                 parameterNode.negativePoints), coalesce="sync")

    def undo(self, parameterNode) -> None:
        self.submit(lambda: self.workflow(parameterNode).undo_step())

    def redo(self, parameterNode) -> None:
        self.submit(lambda: self.workflow(parameterNode).redo_step())

    def selectSegment(self, parameterNode, segmentId: str) -> None:
        self.waitForIdle()
        self.workflow(parameterNode).select_segment(segmentId)

    def newSegment(self, parameterNode) -> str:
        self.waitForIdle()
        return self.workflow(parameterNode).new_segment()

    def resetPrompts(self, parameterNode) -> None:
        self.waitForIdle()
        self._guarded(self.workflow(parameterNode).reset_prompts)
        self.statusCallback(_("Prompts cleared; the segment keeps its voxels."))

    def clearSegment(self, parameterNode) -> None:
        self.waitForIdle()
        self.statusCallback(self._guarded(self.workflow(parameterNode).clear_segment).message)

    def _guarded(self, action):
        """Run an action that moves markups without the panel's point observers reacting to it."""
        self.applying = True
        try:
            return action()
        finally:
            self.applying = False

    # ---------------------------------------------------------------- queue and worker thread
    def submit(self, request, coalesce: str | None = None) -> None:
        """Queue ``request`` (main thread; returns a workflow Step or None) and start it when the worker is free.

        With ``coalesce``, a request of the same kind already waiting is not queued twice: one sync covers
        every click placed meanwhile.
        """
        if coalesce is not None and any(kind == coalesce for kind, _ in self._queue):
            return
        self._queue.append((coalesce, request))
        if self._running is None:
            self._startNext()

    def _startNext(self) -> None:
        while self._queue and self._running is None:
            _, request = self._queue.popleft()
            step = request()
            if step is None:
                continue
            if self._executor is None:
                # One long-lived thread keeps CUDA's per-thread caches warm between clicks.
                self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="SegVolGRU")
            self._running = (step, self._executor.submit(step.compute))
            self.statusCallback(_("{0}: predicting...").format(step.action))
            qt.QTimer.singleShot(_POLL_MS, self._poll)

    def _poll(self) -> None:
        step, future = self._running
        if not future.done():
            qt.QTimer.singleShot(_POLL_MS, self._poll)
            return
        self._running = None
        try:
            status = self._guarded(lambda: self._workflow.apply(step))
            self.statusCallback(f"{status.message} [{self._modelDescription}]")
        except Exception as error:
            self._report(error)
        try:
            self._startNext()
        except Exception as error:
            self._report(error)

    def _report(self, error: Exception) -> None:
        """A failed request: later ones were built on it, so drop them; show it; waitForIdle re-raises it."""
        self._queue.clear()
        self.lastError = error
        self.statusCallback(str(error))
        if not slicer.app.testingEnabled():
            slicer.util.errorDisplay(str(error), windowTitle="SegVolGRU")

    def waitForIdle(self, timeoutSeconds: float = 600.0) -> None:
        """Process events until every queued request is applied (scripts, tests and segment switches)."""
        timer = qt.QElapsedTimer()
        timer.start()
        while self._running is not None or self._queue:
            if timer.elapsed() > timeoutSeconds * 1000:
                raise TimeoutError(_("SegVolGRU is still predicting after {0} s.").format(timeoutSeconds))
            if self._running is None:
                self._startNext()
            slicer.app.processEvents(qt.QEventLoop.AllEvents, _POLL_MS)
        error, self.lastError = self.lastError, None
        if error is not None:
            raise error

    def shutdown(self) -> None:
        self._queue.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


#
# SegVolGRUTest
#


class SegVolGRUTest(ScriptedLoadableModuleTest):
    """Panel workflow on a generated volume; the model tests skip with their reason when torch, official
    weights or CUDA are absent."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        for test in (self.test_panelWorkflowOnGeneratedVolume, self.test_officialWeights, self.test_cuda):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as reason:
                self.delayDisplay(f"{test.__name__} skipped: {reason}")

    def _requireTorch(self) -> None:
        try:
            import torch  # noqa: F401
        except ImportError:
            raise unittest.SkipTest("torch is not installed (install it with the PyTorch Utils module)") from None

    def _scene(self):
        import numpy as np

        k, j, i = np.meshgrid(np.arange(24), np.arange(64), np.arange(64), indexing="ij")
        ball = ((k - 12) / 7.0) ** 2 + ((j - 30) / 14.0) ** 2 + ((i - 34) / 16.0) ** 2 < 1
        values = (50 + 900 * ball + np.random.default_rng(0).normal(0, 30, ball.shape)).astype(np.int16)
        volume = slicer.util.addVolumeFromArray(values, nodeClassName="vtkMRMLScalarVolumeNode", name="phantom")
        volume.SetSpacing(1.2, 1.2, 2.5)
        logic = SegVolGRULogic()
        logic.device = "cpu"
        parameterNode = logic.getParameterNode()
        parameterNode.inputVolume = volume
        logic.ensurePromptNodes(parameterNode)
        ijkToRas = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijkToRas)
        parameterNode.roi.SetCenter(*ijkToRas.MultiplyPoint([34, 30, 12, 1])[:3])
        parameterNode.roi.SetSize(45.0, 40.0, 40.0)
        return logic, parameterNode, volume, ijkToRas, np

    def _tinyModel(self):
        import torch
        from segvolgru.config import TINY_CONFIG
        from segvolgru.network import build_model
        from segvolgru.synthetic_weights import synthetic_state_for

        model = build_model(TINY_CONFIG)
        model.load_state_dict(synthetic_state_for(model))
        return model.eval().to(torch.device("cpu"))

    def test_panelWorkflowOnGeneratedVolume(self) -> None:
        """Box, clicks of both polarities, undo/redo, on CPU; the shipped demo model when present, else a tiny
        synthetic SegVol (which checks the mechanics, not the segmentation quality)."""
        self._requireTorch()
        import segvolgru
        from segvolgru.slicer_bridge import read_segment_mask

        logic, parameterNode, volume, ijkToRas, np = self._scene()
        demo = getattr(segvolgru, "demo_model_path", None)
        if demo is None or not os.path.exists(demo()):
            self.delayDisplay("No demo model in this build: using a tiny synthetic SegVol")
            logic._model, logic._modelDescription = self._tinyModel(), "tiny synthetic model"
        logic.segmentBox(parameterNode)
        logic.waitForIdle()
        workflow = logic._workflow
        segmentId = workflow.segment_id
        afterBox = read_segment_mask(parameterNode.segmentation, segmentId, volume)
        np.testing.assert_array_equal(afterBox, workflow.mask())

        parameterNode.positivePoints.AddControlPointWorld(ijkToRas.MultiplyPoint([34, 30, 12, 1])[:3])
        parameterNode.negativePoints.AddControlPointWorld(ijkToRas.MultiplyPoint([10, 10, 4, 1])[:3])
        logic.syncClicks(parameterNode)
        logic.syncClicks(parameterNode)  # coalesced with the first while it waits
        logic.waitForIdle()
        clicks = [(p["voxel"], p["positive"]) for p in workflow.prompts() if p["type"] == "click"]
        self.assertEqual(clicks, [([12, 30, 34], True), ([4, 10, 10], False)])
        afterClicks = read_segment_mask(parameterNode.segmentation, segmentId, volume)
        np.testing.assert_array_equal(afterClicks, workflow.mask())

        logic.undo(parameterNode)
        logic.waitForIdle()
        self.assertEqual(parameterNode.negativePoints.GetNumberOfControlPoints(), 0)
        logic.redo(parameterNode)
        logic.waitForIdle()
        np.testing.assert_array_equal(read_segment_mask(parameterNode.segmentation, segmentId, volume), afterClicks)
        logic.shutdown()
        self.delayDisplay("Panel workflow passed")

    def test_officialWeights(self) -> None:
        """Box on the generated volume with the official weights; skipped when they are not downloaded."""
        self._requireTorch()
        logic, parameterNode, _, _, _ = self._scene()
        if logic._weightsFile() is None:
            raise unittest.SkipTest("official SegVol weights are not downloaded (Settings > Download)")
        logic.segmentBox(parameterNode)
        logic.waitForIdle()
        self.assertTrue(logic._workflow.mask().any())
        logic.shutdown()

    def test_cuda(self) -> None:
        """The same box on the GPU; skipped without CUDA."""
        self._requireTorch()
        import torch

        if not torch.cuda.is_available():
            raise unittest.SkipTest("no CUDA GPU")
        logic, parameterNode, _, _, _ = self._scene()
        logic.device = "cuda"
        if logic._weightsFile() is None:
            logic._model, logic._modelDescription = self._tinyModel().to("cuda"), "tiny synthetic model"
        logic.segmentBox(parameterNode)
        logic.waitForIdle()
        self.assertEqual(logic._workflow.mask().shape, (24, 64, 64))
        logic.shutdown()
