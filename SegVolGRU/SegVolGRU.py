"""SegVolGRU: interactive SegVol segmentation with GRU click correction, as a 3D Slicer scripted module.

Only this file knows Qt and the Slicer application. Prompt mapping, sessions, writes into segments and stored
prompts live in ``segvolgru.slicer_bridge.SegmentationWorkflow`` under ``Logic/`` (driven by pytest on
``slicer-core``); this module adds the panel, first-use installs, a worker thread for torch and settings.
"""
from __future__ import annotations

import collections
import concurrent.futures
import importlib.util
import logging
import os
import re
import sys
import threading
import time
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
_MARKUPS = slicer.vtkMRMLMarkupsNode
_POINT_EVENTS = (_MARKUPS.PointPositionDefinedEvent, _MARKUPS.PointEndInteractionEvent, _MARKUPS.PointRemovedEvent)
# How the panel and the status line name the bundled model, wherever they say which weights are in use.
_DEMO_LABEL = "DEMO model — trained on phantoms, not for clinical use"


class InstallError(RuntimeError):
    """A dependency could not be installed; the message says what to do (restart, install by hand)."""


def _downloadInto(future: concurrent.futures.Future) -> None:
    """Weights download thread: no Qt and no progress bars, as only the main thread may write the console."""
    try:
        from segvolgru.weights import download_official_weights

        future.set_result(download_official_weights(progress=False))
    except Exception as error:
        future.set_exception(error)


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
    """The panel: binds widgets to the parameter node, observes the point lists and calls the Logic.

    Point-list observers and keyboard shortcuts exist only while the panel is shown (enter to exit), so
    clicks placed from other modules never start a prediction.
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._observedPoints = []
        self._shortcuts = []
        self._shown = False

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
        self.ui.segmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                             self.ui.segmentSelectorWidget.setCurrentNode)
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
        self.ui.settingsCollapsibleButton.connect("contentsCollapsed(bool)", lambda _c: self.updateWeightsStatus())
        self.ui.downloadWeightsButton.connect("clicked(bool)", self.onDownloadWeights)
        self.ui.useLocalWeightsButton.connect("clicked(bool)", self.onUseLocalWeights)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode(createPrompts=False)
        self.updateWeightsStatus()

    def cleanup(self) -> None:
        self._stopObservingPoints()
        self.removeObservers()
        if self.logic is not None:
            self.logic.shutdown()

    def enter(self) -> None:
        self._shown = True
        self.initializeParameterNode()
        # Scoped to the panel: with the main window as parent, Ctrl+Z / Ctrl+Y would clash with Edit > Undo/Redo.
        for keys, slot in (("Ctrl+Return", self.onSegmentButton),
                           ("Ctrl+Z", lambda: self.run(lambda: self.logic.undo(self._parameterNode))),
                           ("Ctrl+Y", lambda: self.run(lambda: self.logic.redo(self._parameterNode)))):
            shortcut = qt.QShortcut(qt.QKeySequence(keys), self.parent)
            shortcut.setContext(qt.Qt.WidgetWithChildrenShortcut)
            shortcut.connect("activated()", slot)
            self._shortcuts.append(shortcut)

    def exit(self) -> None:
        self._shown = False
        for shortcut in self._shortcuts:
            shortcut.disconnect("activated()")
            shortcut.setParent(None)
        self._shortcuts = []
        self._stopObservingPoints()
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
            self.ui.segmentSelectorWidget.setCurrentNode(self._parameterNode.segmentation)
        else:
            self._stopObservingPoints()
        self.updateButtons()

    def updateButtons(self, caller=None, event=None) -> None:
        node = self._parameterNode
        ready = bool(node and node.inputVolume and node.roi and node.segmentation)
        self.ui.segmentButton.enabled = ready
        self.ui.segmentButton.toolTip = _("Run SegVol on the box and apply the clicks not applied yet (Ctrl+Enter in "
                                          "the panel).") if ready else _("Select a volume, an ROI and an output first.")
        for button in (self.ui.undoButton, self.ui.redoButton, self.ui.resetPromptsButton, self.ui.clearSegmentButton):
            button.enabled = bool(node and node.inputVolume and node.segmentation)
        self.updateTextPrompt()

    def updateTextPrompt(self) -> None:
        available = self.logic.textPromptAvailable()
        self.ui.textPromptLineEdit.enabled = available
        self.ui.textPromptLineEdit.toolTip = _("Organ name (e.g. liver), used with the box.") if available else _(
            "The DEMO model (or the loaded one) has no text tower: use box and clicks, or the official weights.")

    def _stopObservingPoints(self) -> None:
        for observed in self._observedPoints:
            for event in _POINT_EVENTS:
                self.removeObserver(observed, event, self.onPointsEdited)
        self._observedPoints = []

    def onPointListsChanged(self, node=None) -> None:
        """Observe the lists the selectors show now: a selector's signal comes before the parameter node
        binding has stored the new list, so the parameter node may still name the old one."""
        self._stopObservingPoints()
        pairs = ((self.ui.positivePointsSelector.currentNode(), self.ui.positivePlaceWidget, _POSITIVE_COLOR),
                 (self.ui.negativePointsSelector.currentNode(), self.ui.negativePlaceWidget, _NEGATIVE_COLOR))
        for points, placeWidget, color in pairs:
            placeWidget.setCurrentNode(points)
            if points is None or not self._shown:
                continue
            SegVolGRULogic.colorPoints(points, color)
            for event in _POINT_EVENTS:
                self.addObserver(points, event, self.onPointsEdited)
            self._observedPoints.append(points)

    def onPointsEdited(self, caller, event) -> None:
        if self._parameterNode and self._parameterNode.autoUpdate and not self.logic.applying:
            self.run(lambda: self.logic.syncClicks(self._parameterNode))

    def onSegmentChanged(self, segmentId) -> None:
        if segmentId and self._parameterNode and self._parameterNode.inputVolume:
            self.run(lambda: self.logic.selectSegment(self._parameterNode, segmentId), needsModel=False)

    def onNewSegment(self) -> None:
        def create():
            segmentId = self.logic.newSegment(self._parameterNode)
            self.ui.segmentSelectorWidget.setCurrentSegmentID(segmentId)

        self.run(create, needsModel=False)

    def onSegmentButton(self) -> None:
        self.run(lambda: self.logic.segment(self._parameterNode))

    def onDeviceChanged(self, device) -> None:
        self.run(lambda: self.logic.setDevice(device), needsModel=False)

    def onDownloadWeights(self) -> None:
        self.run(self.logic.downloadOfficialWeights)

    def onUseLocalWeights(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, _("SegVol weights file"), "",
                                              _("Weights (*.bin *.pt *.pth *.safetensors);;All files (*)"))
        if path:
            self.run(lambda: self.logic.useLocalWeights(path))

    def updateWeightsStatus(self) -> None:
        self.ui.weightsStatusLabel.text = self.logic.weightsStatus()
        # Detecting the device imports torch (seconds): only while Settings, which shows it, is open.
        if not self.ui.settingsCollapsibleButton.collapsed:
            self.ui.detectedDeviceLabel.text = self.logic.detectedDevice()

    def showStatus(self, message: str) -> None:
        self.ui.statusLabel.text = message
        slicer.util.showStatusMessage(message, 5000)
        self.updateTextPrompt()

    def run(self, action, needsModel: bool = True) -> None:
        """Run a user action; any error is shown in the panel and a dialog, its traceback in the log. Actions that
        predict first make sure torch and the other packages are installed (asking first)."""
        from segvolgru.errors import SegVolGRUError

        try:
            if needsModel:
                self.logic.setupPythonRequirements()
            action()
        except Exception as error:
            expected = isinstance(error, (SegVolGRUError, InstallError, ValueError, TimeoutError))
            logging.log(logging.WARNING if expected else logging.ERROR, "SegVolGRU: %s", error, exc_info=True)
            message = str(error) if expected else _("Unexpected error: {0}: {1}. The details are in the Python "
                                                    "console; please report them.").format(type(error).__name__, error)
            self.showStatus(message)
            slicer.util.errorDisplay(message, windowTitle="SegVolGRU")
        self.updateButtons()
        self.updateWeightsStatus()


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
        self._download = None
        settings = qt.QSettings()
        self.device = str(settings.value(_SETTINGS_DEVICE, "auto"))
        self.weightsPath = str(settings.value(_SETTINGS_WEIGHTS, "")) or None
        self.lastError = None

    def getParameterNode(self):
        return SegVolGRUParameterNode(super().getParameterNode())

    # ---------------------------------------------------------------- dependencies (first use only)
    def setupPythonRequirements(self, askConfirmation: bool = True) -> None:
        """torch through the PyTorch extension, then the packages of Resources/requirements.txt. In testing mode
        nothing is installed: anything missing raises InstallError naming it."""
        if self._requirementsChecked:
            return
        testing = slicer.app.testingEnabled()
        if importlib.util.find_spec("torch") is None:
            if testing:
                raise InstallError(_("torch is missing and tests install nothing: install it with PyTorch Utils."))
            try:
                import PyTorchUtils
            except ImportError:
                raise InstallError(_("torch is not installed and the PyTorch extension is missing: install 'PyTorch' "
                                     "from the Extensions Manager, restart Slicer and try again.")) from None
            if not PyTorchUtils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=askConfirmation, forceComputationBackend="cpu" if self.device == "cpu" else None,
                    torchVersionRequirement=_TORCH_REQUIREMENT):
                raise InstallError(_("torch was not installed. Install it from the PyTorch Utils module, then retry."))
        requirements = self.resourcePath("requirements.txt")
        with open(requirements, encoding="utf-8") as lines:
            names = [re.split(r"[<>=!~;\[ ]", line.strip())[0] for line in lines if line.strip()[:1] not in ("", "#")]
        # Import names equal the distribution names here; versions are left to pip_ensure.
        missing = [name for name in names if importlib.util.find_spec(name.replace("-", "_")) is None]
        if missing and testing:
            raise InstallError(_("Python packages {0} are missing and tests do not install packages: run "
                                 "slicer.util.pip_install('-r {1}') first.").format(", ".join(missing), requirements))
        try:
            try:
                import slicer.packaging as packaging  # Slicer 5.10 and later
            except ImportError:
                packaging = None
            if packaging is not None and hasattr(packaging, "pip_ensure"):
                packaging.pip_ensure(packaging.load_requirements(requirements), requester="SegVolGRU")
            elif missing:
                if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                        _("SegVolGRU needs these Python packages: {0}. Install them now?").format(", ".join(missing))):
                    raise InstallError(_("The required Python packages were not installed."))
                slicer.util.pip_install(["-r", requirements])
        except InstallError:
            raise
        except Exception as error:
            raise InstallError(_("Installing Python packages failed or was declined ({0}). Check the network, or "
                                 "run slicer.util.pip_install('-r {1}') in the Python console, then restart Slicer.")
                               .format(error, requirements)) from error
        self._requirementsChecked = True

    def resourcePath(self, relativePath: str) -> str:
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", relativePath)

    # ---------------------------------------------------------------- settings and model
    def setDevice(self, device: str) -> None:
        """"auto", "cpu" or "cuda"; stored in the application settings. The model moves on its next use."""
        self.device = device
        qt.QSettings().setValue(_SETTINGS_DEVICE, device)
        self._model = None
        self.forgetWorkflow()

    def sessionSettings(self, parameterNode) -> dict:
        """Session settings from the panel: GRU on/off and the text prompt (dropped for a model without text)."""
        text = parameterNode.textPrompt.strip() if self.textPromptAvailable() else ""
        return {"gru": bool(parameterNode.useGru), "text": text or None}

    def textPromptAvailable(self) -> bool:
        """Whether the loaded model has a text tower; before loading, whether weights other than the DEMO model
        (which has none) are configured."""
        if self._model is not None:
            return bool(getattr(self._model, "has_text", False))
        return self._weightsFile() is not None

    def detectedDevice(self) -> str:
        """What "auto" resolves to. Imports torch: call it when torch is needed or asked for, not in setup."""
        try:
            from segvolgru.device import describe_device, resolve_device

            return describe_device(resolve_device("auto"))
        except Exception as error:  # a broken CUDA build of torch raises OSError or RuntimeError, not ImportError
            logging.warning("SegVolGRU: torch could not be loaded", exc_info=True)
            return _("torch not available: {0}").format(error)

    def weightsStatus(self) -> str:
        path = self._weightsFile()
        if path is not None:
            return _("SegVol weights: {0}").format(path)
        return _("No official weights found: the {0} is used.").format(_DEMO_LABEL)

    def _weightsFile(self):
        try:
            from segvolgru.weights import resolve_weights

            return resolve_weights(self.weightsPath)
        except Exception:  # a configured file that is gone: the DEMO model is used, as the status says
            return None

    def downloadOfficialWeights(self) -> None:
        """Download the official release (SHA-256 checked) on a thread while the main thread shows the elapsed
        time. Cancel stops the wait, not the download: Download again waits for the same one."""
        if self._download is None or (self._download.done() and self._download.exception() is not None):
            self._download = concurrent.futures.Future()
            threading.Thread(target=_downloadInto, args=(self._download,), name="SegVolGRU-download",
                             daemon=True).start()
        future = self._download
        progress = slicer.util.createProgressDialog(maximum=0, windowTitle="SegVolGRU",
                                                    windowModality=qt.Qt.WindowModal)
        started = time.monotonic()
        try:
            while not future.done():
                if progress.wasCanceled:
                    self.statusCallback(_("Stopped waiting; the download goes on: press Download again to use it."))
                    return
                seconds = int(time.monotonic() - started)
                progress.labelText = _("Downloading the SegVol weights (700 MB): {0} s").format(seconds)
                slicer.app.processEvents(qt.QEventLoop.AllEvents, _POLL_MS)
                time.sleep(_POLL_MS / 1000)
        finally:
            progress.close()
        self._download = None
        self.useLocalWeights(str(future.result()))
        self.statusCallback(_("Official SegVol weights downloaded and checked."))

    def useLocalWeights(self, path: str) -> None:
        from segvolgru.weights import verify_weights

        verify_weights(path)
        self.weightsPath = path
        qt.QSettings().setValue(_SETTINGS_WEIGHTS, path)
        self._model = None
        self.forgetWorkflow()

    def loadModel(self):
        """The model for the current weights and device: official weights when found, else the DEMO model.

        Called on the worker thread (torch only); the result is kept for later requests.
        """
        if self._model is not None:
            return self._model
        import segvolgru
        from segvolgru.device import resolve_device

        # Plain strings here: this runs off the main thread, where Qt's translator must not be called.
        device = str(resolve_device(self.device))
        path = self._weightsFile()
        if path is not None:
            self._modelDescription = f"SegVol weights {os.path.basename(str(path))}"
        else:
            path = segvolgru.demo_model_path()  # WeightsError saying what to do when it is missing
            self._modelDescription = _DEMO_LABEL
        self._model = segvolgru.load_model(path, device=device)
        return self._model

    # ---------------------------------------------------------------- workflow
    def forgetWorkflow(self) -> None:
        """Drop the workflow and the waiting requests; a step computing now is dropped when it finishes."""
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
        for name, className, nodeName in (("roi", "vtkMRMLMarkupsROINode", "SegVolGRU box"),
                                          ("positivePoints", "vtkMRMLMarkupsFiducialNode", "SegVolGRU +"),
                                          ("negativePoints", "vtkMRMLMarkupsFiducialNode", "SegVolGRU -")):
            if not getattr(parameterNode, name):
                setattr(parameterNode, name, slicer.mrmlScene.AddNewNodeByClass(className, nodeName))
        self.colorPoints(parameterNode.positivePoints, _POSITIVE_COLOR)
        self.colorPoints(parameterNode.negativePoints, _NEGATIVE_COLOR)

    @staticmethod
    def colorPoints(points, color) -> None:
        points.CreateDefaultDisplayNodes()
        display = points.GetDisplayNode()
        display.SetSelectedColor(*color)
        display.SetColor(*color)

    def segment(self, parameterNode) -> None:
        """The Segment button: the box when it moved (or never ran), then every click not applied yet, so it
        also catches up on clicks placed with auto-update off."""
        self.submit(lambda: self._boxOrPendingStep(parameterNode))
        self.syncClicks(parameterNode)

    def _boxOrPendingStep(self, parameterNode):
        from segvolgru.slicer_bridge import roi_to_box_kji

        workflow = self.workflow(parameterNode)
        boxes = [prompt["box"] for prompt in workflow.prompts() if prompt["type"] == "box"]
        roi = parameterNode.roi
        if roi is None or not boxes or list(roi_to_box_kji(roi, workflow.volume_node)) != list(boxes[-1]):
            return workflow.box_step(roi)
        step = workflow.sync_step(parameterNode.positivePoints, parameterNode.negativePoints)
        if step is None and workflow.mask() is None:
            # Settings changed (GRU, text) or the scene was reopened: rebuild from the stored prompts.
            step = workflow.replay_step()
        if step is None:
            self.statusCallback(_("Nothing new to segment: move the box or place a click."))
        return step

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
        With ``coalesce``, a request of that kind already waiting is not queued twice (one sync covers all)."""
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
            # Every request prepares its step through workflow(), so self._workflow is the one it belongs to.
            self._running = (self._workflow, step, self._executor.submit(step.compute))
            self.statusCallback(_("{0}: predicting...").format(step.action))
            qt.QTimer.singleShot(_POLL_MS, self._poll)

    def _poll(self) -> None:
        workflow, step, future = self._running
        if not future.done():
            qt.QTimer.singleShot(_POLL_MS, self._poll)
            return
        self._running = None
        try:
            if workflow is not self._workflow:
                # Volume, segmentation, device or weights changed meanwhile: its nodes may be gone, so drop it.
                self.statusCallback(_("{0}: result dropped, because the volume, segmentation, device or weights "
                                      "changed while it was computed.").format(step.action))
            else:
                status = self._guarded(lambda: workflow.apply(step))
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
        logging.error("SegVolGRU: %s", error, exc_info=error)
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
    """The panel's Logic on a generated volume with the DEMO model, on CPU and then on CUDA when there is a GPU;
    skipped with its reason when torch, the Python requirements or the DEMO model are absent. The official
    weights are tested by Testing/Slicer/SegVolGRUWorkflowTest.py."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        try:
            import torch
        except Exception as error:
            self.delayDisplay(f"Skipped: torch is not available ({error}); install it with the PyTorch Utils module")
            return
        for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
            self.setUp()
            try:
                self.test_panelWorkflowOnGeneratedVolume(device)
            except unittest.SkipTest as reason:
                self.delayDisplay(f"Skipped: {reason}")

    def _scene(self, device: str):
        """Logic (DEMO model on ``device``), parameter node, volume and IJK-to-RAS matrix of a ball phantom."""
        from segvolgru.errors import WeightsError

        logic = SegVolGRULogic()
        try:
            logic.setupPythonRequirements(askConfirmation=False)  # tests install nothing: InstallError says what
            import segvolgru
            path = segvolgru.demo_model_path()  # WeightsError in a build without the DEMO model
        except (InstallError, WeightsError) as error:
            raise unittest.SkipTest(str(error)) from None
        logic.device = device
        logic._model, logic._modelDescription = segvolgru.load_model(path, device=device), _DEMO_LABEL
        import numpy as np

        k, j, i = np.meshgrid(np.arange(24), np.arange(64), np.arange(64), indexing="ij")
        ball = ((k - 12) / 7.0) ** 2 + ((j - 30) / 14.0) ** 2 + ((i - 34) / 16.0) ** 2 < 1
        values = (50 + 900 * ball + np.random.default_rng(0).normal(0, 30, ball.shape)).astype(np.int16)
        volume = slicer.util.addVolumeFromArray(values, nodeClassName="vtkMRMLScalarVolumeNode", name="phantom")
        volume.SetSpacing(1.2, 1.2, 2.5)
        parameterNode = logic.getParameterNode()
        parameterNode.inputVolume = volume
        logic.ensurePromptNodes(parameterNode)
        ijkToRas = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijkToRas)
        parameterNode.roi.SetCenter(*ijkToRas.MultiplyPoint([34, 30, 12, 1])[:3])
        parameterNode.roi.SetSize(45.0, 40.0, 40.0)
        return logic, parameterNode, volume, ijkToRas

    def test_panelWorkflowOnGeneratedVolume(self, device: str = "cpu") -> None:
        """Box, a click applied by Segment (as with auto-update off), one by a sync, undo/redo, and a result
        dropped because its workflow was forgotten while it computed."""
        import numpy as np
        from segvolgru.slicer_bridge import read_segment_mask

        logic, parameterNode, volume, ijkToRas = self._scene(device)
        logic.segment(parameterNode)
        logic.waitForIdle()
        workflow = logic._workflow
        segmentId = workflow.segment_id
        np.testing.assert_array_equal(read_segment_mask(parameterNode.segmentation, segmentId, volume), workflow.mask())

        parameterNode.positivePoints.AddControlPointWorld(ijkToRas.MultiplyPoint([34, 30, 12, 1])[:3])
        logic.segment(parameterNode)  # same box: only the pending click runs
        logic.waitForIdle()
        parameterNode.negativePoints.AddControlPointWorld(ijkToRas.MultiplyPoint([10, 10, 4, 1])[:3])
        logic.syncClicks(parameterNode)
        logic.syncClicks(parameterNode)  # coalesced with the first while it waits
        logic.waitForIdle()
        self.assertEqual([p["type"] for p in workflow.prompts()], ["box", "click", "click"])
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

        messages = []
        logic.statusCallback = messages.append
        logic.undo(parameterNode)
        logic.forgetWorkflow()  # as a device, volume or scene change does while the undo computes
        logic.waitForIdle()
        self.assertIn("result dropped", messages[-1])
        np.testing.assert_array_equal(read_segment_mask(parameterNode.segmentation, segmentId, volume), afterClicks)
        logic.shutdown()
        self.delayDisplay(f"Panel workflow passed on {device}")
