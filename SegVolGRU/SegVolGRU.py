"""SegVolGRU: interactive SegVol segmentation with GRU click correction, as a 3D Slicer scripted module.

Only this file knows Qt and the Slicer application; it wires the panel to ``segvolgru.slicer_bridge`` under
``Logic/`` (the workflow, the request queue, first-use installs), which pytest drives on ``slicer-core``.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import sys
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
# While a step computes the main thread waits on it for _WAIT_S (the GIL released), then lets Qt idle _POLL_GAP_MS.
_WAIT_S = 0.05
_POLL_GAP_MS = 5
_DEBOUNCE_MS = 300
_POSITIVE_COLOR = (0.2, 0.85, 0.3)
_NEGATIVE_COLOR = (0.95, 0.25, 0.2)
_MARKUPS = slicer.vtkMRMLMarkupsNode
# Placing, dropping and deleting a point update at once; other moves (Markups table, scripts) after a pause.
_POINT_EVENTS = (_MARKUPS.PointPositionDefinedEvent, _MARKUPS.PointEndInteractionEvent, _MARKUPS.PointRemovedEvent)
_POINT_MOVED_EVENT = _MARKUPS.PointModifiedEvent  # also while dragging: ignored from drag start to drop
_DRAG_STARTED_EVENT = _MARKUPS.PointStartInteractionEvent
_TRANSFORM_EVENT = slicer.vtkMRMLTransformableNode.TransformModifiedEvent
# How the panel and the status line name the bundled model, wherever they say which weights are in use.
_DEMO_LABEL = "DEMO model — trained on phantoms, not for clinical use"
# Parameter node fields that hold nodes; each has a selector named <field>Selector in the .ui file.
_NODE_PARAMETERS = ("inputVolume", "roi", "positivePoints", "negativePoints", "segmentation")


def versionProblem() -> str | None:
    """What to upgrade when this Slicer or its Python is older than SegVolGRU needs, else None."""
    from segvolgru.slicer_bridge.requirements import version_problem

    app = slicer.app  # an application without version properties (a stand-in) is taken as new enough
    return version_problem(sys.version_info, (getattr(app, "majorVersion", 99), getattr(app, "minorVersion", 0)))


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
            "selected segment with the Segment Editor's masking settings (editable area, intensity range, "
            "overwrite). Undo and Redo in this panel (Ctrl+Z, Ctrl+Y or Ctrl+Shift+Z) undo every SegVolGRU step: "
            "box, clicks, Clear and Reset prompts. See docs/slicer.md for a walkthrough."
        )
        problem = versionProblem()
        if problem:
            logging.error("SegVolGRU: %s", problem)
            self.parent.helpText = problem + "\n\n" + self.parent.helpText
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
    """Per-scene state of the panel (saved with the scene): the volume, the box, the click lists, the output,
    an optional organ name (models with a text tower), refining on every click, and the GRU correction."""

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
    """The panel: binds widgets to the parameter node, observes the prompts and calls the Logic.

    Point-list observers and keyboard shortcuts exist only while the panel is shown (enter to exit), so
    clicks placed from other modules never start a prediction. Nothing is added to the scene until the user acts.
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._observed = []
        self._shortcuts = []
        self._shown = False
        self._dragging = False
        self._updateTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SegVolGRU.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SegVolGRULogic()
        self.logic.statusCallback = self.showStatus
        self.logic.segmentCallback = self.onLogicSelectedSegment

        self.ui.roiPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup
        for placeWidget in (self.ui.positivePlaceWidget, self.ui.negativePlaceWidget):
            placeWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
        # The panel's segmentation selector is the only one: the segment selector's own would be synced one way.
        self.ui.segmentSelectorWidget.segmentationNodeSelectorVisible = False
        for name in _NODE_PARAMETERS:
            getattr(self.ui, f"{name}Selector").connect("currentNodeChanged(vtkMRMLNode*)", self.onSelectorChanged)
        self.ui.segmentSelectorWidget.connect("currentSegmentChanged(QString)", self.onSegmentChanged)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.newSegmentButton.connect("clicked(bool)", self.onNewSegment)
        for button, action in ((self.ui.undoButton, self.logic.undo), (self.ui.redoButton, self.logic.redo),
                               (self.ui.resetPromptsButton, self.logic.resetPrompts),
                               (self.ui.clearSegmentButton, self.logic.clearSegment)):
            button.connect("clicked(bool)", lambda checked=False, action=action: self.run(
                lambda: action(self._parameterNode), needsModel=False))
        self.ui.deviceComboBox.addItems(["auto", "cpu", "cuda"])
        self.ui.deviceComboBox.setCurrentText(self.logic.device)
        self.ui.deviceComboBox.connect("currentTextChanged(QString)", self.onDeviceChanged)
        self.ui.settingsCollapsibleButton.connect("contentsCollapsed(bool)", lambda _c: self.updateWeightsStatus())
        self.ui.downloadWeightsButton.connect("clicked(bool)", self.onDownloadWeights)
        self.ui.useLocalWeightsButton.connect("clicked(bool)", self.onUseLocalWeights)
        self._updateTimer = qt.QTimer()
        self._updateTimer.setSingleShot(True)
        self._updateTimer.setInterval(_DEBOUNCE_MS)
        self._updateTimer.connect("timeout()", self.onPromptsMoved)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        # A closed scene stays empty: the parameter node comes back with the user's next selection.
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.updateButtons)
        self.updateButtons()
        self.updateWeightsStatus()

    def cleanup(self) -> None:
        """Module unload or reload (no exit() comes): undo what enter() did; never wait for a prediction."""
        self.exit()
        self.removeObservers()
        if self.logic is not None:
            self.logic.statusCallback = logging.info
            self.logic.segmentCallback = None
            self.logic.shutdown()

    def enter(self) -> None:
        self._shown = True
        # Bind to the scene's parameter node when there is one; otherwise the first selection creates it.
        if self.logic.existingParameterNode() is not None:
            self.setParameterNode(self.logic.existingParameterNode())
        # Scoped to the panel, so they never take the application's own shortcuts elsewhere.
        for keys, slot in (("Ctrl+Return", self.onSegmentButton), ("Ctrl+Z", self.ui.undoButton.click),
                           ("Ctrl+Y", self.ui.redoButton.click), ("Ctrl+Shift+Z", self.ui.redoButton.click)):
            shortcut = qt.QShortcut(qt.QKeySequence(keys), self.parent)
            shortcut.setContext(qt.Qt.WidgetWithChildrenShortcut)
            shortcut.connect("activated()", slot)
            self._shortcuts.append(shortcut)
        self.observePrompts()

    def exit(self) -> None:
        self._shown = False
        for shortcut in self._shortcuts:
            shortcut.disconnect("activated()")
            shortcut.setParent(None)
        self._shortcuts = []
        if self._updateTimer is not None:
            self._updateTimer.stop()
        self._stopObservingPrompts()
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.logic.forgetWorkflow()
        self.setParameterNode(None)

    def _ensureParameterNode(self):
        """The parameter node, created and bound at the user's first selection, keeping what they selected."""
        if self._parameterNode is None and self._shown:
            parameterNode = self.logic.getParameterNode()
            for name in _NODE_PARAMETERS:
                node = getattr(self.ui, f"{name}Selector").currentNode()
                if node is not None:
                    setattr(parameterNode, name, node)
            self.setParameterNode(parameterNode)
        return self._parameterNode

    def setParameterNode(self, parameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateButtons)
            self.ui.segmentSelectorWidget.setCurrentNode(self._parameterNode.segmentation)
        self.observePrompts()
        self.updateButtons()

    def onSelectorChanged(self, node=None) -> None:
        if node is not None:
            self._ensureParameterNode()
        self.ui.roiPlaceWidget.setCurrentNode(self.ui.roiSelector.currentNode())
        self.ui.segmentSelectorWidget.setCurrentNode(self.ui.segmentationSelector.currentNode())
        self.observePrompts()

    def updateButtons(self, caller=None, event=None) -> None:
        node = self._parameterNode
        ready = bool(node and node.inputVolume)
        self.ui.segmentButton.enabled = ready
        self.ui.segmentButton.toolTip = _("Run SegVol on the box and apply the clicks not applied yet (Ctrl+Enter in "
                                          "the panel).") if ready else _("Select the volume to segment first.")
        for button in (self.ui.undoButton, self.ui.redoButton, self.ui.resetPromptsButton, self.ui.clearSegmentButton):
            button.enabled = bool(node and node.inputVolume and node.segmentation)
        self.updateTextPrompt()

    def updateTextPrompt(self) -> None:
        available = self.logic.textPromptAvailable()
        self.ui.textPromptLineEdit.enabled = available
        self.ui.textPromptLineEdit.toolTip = _("Organ name (e.g. liver), used with the box.") if available else _(
            "The DEMO model (or the loaded one) has no text tower: use box and clicks, or the official weights.")

    def _stopObservingPrompts(self) -> None:
        for node, event, method in self._observed:
            self.removeObserver(node, event, method)
        self._observed = []

    def observePrompts(self) -> None:
        """Observe the lists, the ROI and the volume the selectors show now: a selector's signal comes before the
        parameter node binding has stored the new node, so the parameter node may still name the old one."""
        from segvolgru.slicer_bridge import color_points

        self._stopObservingPrompts()
        lists = ((self.ui.positivePointsSelector.currentNode(), self.ui.positivePlaceWidget, _POSITIVE_COLOR),
                 (self.ui.negativePointsSelector.currentNode(), self.ui.negativePlaceWidget, _NEGATIVE_COLOR))
        moved = [self.ui.roiSelector.currentNode(), self.ui.inputVolumeSelector.currentNode()]
        for points, placeWidget, color in lists:
            placeWidget.setCurrentNode(points)
            if points is not None and self._shown:
                color_points(points, color)
                self._observed += [(points, event, self.onPointsEdited) for event in _POINT_EVENTS]
                self._observed += [(points, _POINT_MOVED_EVENT, self.onPromptMoved),
                                   (points, _DRAG_STARTED_EVENT, self.onDragStarted)]
                moved.append(points)
        self._observed += [(n, _TRANSFORM_EVENT, self.onPromptMoved) for n in moved if n is not None and self._shown]
        for node, event, method in self._observed:
            self.addObserver(node, event, method)

    def onDragStarted(self, caller, event) -> None:
        self._dragging = True

    def onPointsEdited(self, caller, event) -> None:
        self._dragging = False
        if self._parameterNode and self._parameterNode.autoUpdate and not self.logic.applying:
            self.run(lambda: self.logic.syncClicks(self._parameterNode), mayInstall=False)

    def onPromptMoved(self, caller=None, event=None) -> None:
        """A point moved without an end of interaction, or a transform changed: update after a pause."""
        if self._parameterNode and self._parameterNode.autoUpdate and not self.logic.applying and not self._dragging:
            self._updateTimer.start()

    def onPromptsMoved(self) -> None:
        if self._parameterNode and self._shown:
            self.run(lambda: self.logic.update(self._parameterNode), mayInstall=False)

    def onSegmentChanged(self, segmentId, deferred: bool = False) -> None:
        node = self._parameterNode
        if not segmentId or not node or not node.inputVolume:
            return
        if self.ui.segmentSelectorWidget.currentNode() is not node.segmentation:
            # the selector changes before the parameter node stores its new segmentation: act once it has
            if not deferred:
                qt.QTimer.singleShot(0, lambda: self.onSegmentChanged(segmentId, True))
            return
        self.run(lambda: self.logic.selectSegment(node, segmentId), needsModel=False)

    def onLogicSelectedSegment(self, segmentId: str) -> None:
        """A new segment, or an undo or redo that selected the segment it acted on."""
        self.ui.segmentSelectorWidget.setCurrentNode(self._parameterNode.segmentation)
        if self.ui.segmentSelectorWidget.currentSegmentID() != segmentId:
            self.ui.segmentSelectorWidget.setCurrentSegmentID(segmentId)

    def onNewSegment(self) -> None:
        self.run(lambda: self.onLogicSelectedSegment(self.logic.newSegment(self._ensureParameterNode())),
                 needsModel=False)

    def onSegmentButton(self) -> None:
        self.run(lambda: self.logic.segment(self._ensureParameterNode()))

    def onDeviceChanged(self, device) -> None:
        self.run(lambda: self.logic.setDevice(device), needsModel=False)

    def onDownloadWeights(self) -> None:
        self.run(self.logic.downloadOfficialWeights)

    def onUseLocalWeights(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, _("SegVol weights file"), "",
                                              _("Weights (*.bin *.pt *.pth *.safetensors);;All files (*)"))
        if path:
            self.run(lambda: self.logic.useLocalWeights(path), needsModel=False)

    def updateWeightsStatus(self) -> None:
        self.ui.weightsStatusLabel.text = self.logic.weightsStatus()
        # Detecting the device imports torch (seconds): only while Settings, which shows it, is open.
        if not self.ui.settingsCollapsibleButton.collapsed:
            self.ui.detectedDeviceLabel.text = self.logic.detectedDevice()

    def showStatus(self, message: str) -> None:
        self.ui.statusLabel.text = message
        slicer.util.showStatusMessage(message, 5000)
        self.updateTextPrompt()

    def run(self, action, needsModel: bool = True, mayInstall: bool = True) -> None:
        """Run a user action, showing any error. Predictions first set up the packages (asking), except from
        markups callbacks (``mayInstall`` False), which never open that dialog."""
        from segvolgru.errors import SegVolGRUError

        try:
            if needsModel and not mayInstall and not self.logic.requirementsChecked:
                self.showStatus(_("Press Segment once first: it sets up the Python packages SegVolGRU needs."))
                return
            if needsModel:
                self.logic.setupPythonRequirements()
            action()
        except Exception as error:
            expected = isinstance(error, (SegVolGRUError, ValueError, TimeoutError))
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
    """Installs, settings and the request queue (``segvolgru.slicer_bridge.StepQueue``: prepared on the main thread,
    computed on one worker thread, applied on the main thread, in order) around ``SegmentationWorkflow``; usable
    without the panel. ``statusCallback(message)`` reports each result; ``segmentCallback(segmentId)`` says when an
    undo or redo selected another segment."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.statusCallback = logging.info
        self.segmentCallback = None
        self.applying = False
        self._workflow = None
        self._workflowKey = None
        self._pendingSegment = None
        self._generation = 0  # bumped when the model changes: a step computed with the old one is dropped
        self._model = None
        self._modelDescription = ""
        self.requirementsChecked = False
        self._steps = None
        self._download = None
        settings = qt.QSettings()
        self.device = str(settings.value(_SETTINGS_DEVICE, "auto"))
        self.weightsPath = str(settings.value(_SETTINGS_WEIGHTS, "")) or None

    def getParameterNode(self):
        return SegVolGRUParameterNode(super().getParameterNode())

    def existingParameterNode(self):
        """The scene's parameter node, or None: unlike ``getParameterNode`` this never adds one."""
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        return SegVolGRUParameterNode(node) if node is not None else None

    def setupPythonRequirements(self, askConfirmation: bool = True) -> None:
        """torch through the PyTorch extension, then the packages of Resources/requirements.txt with torch pinned, so
        pip never replaces PyTorch Utils' torch (``segvolgru.slicer_bridge.requirements``). Tests install nothing:
        anything missing raises InstallError naming it."""
        if self.requirementsChecked:
            return
        from segvolgru.slicer_bridge.requirements import ensure_requirements

        try:
            import slicer.packaging as packaging  # Slicer 5.12 and later
        except ImportError:
            packaging = None
        pipEnsure = None if packaging is None or not hasattr(packaging, "pip_ensure") else (
            lambda path, constraints: packaging.pip_ensure(packaging.load_requirements(path), constraints=constraints,
                                                           requester="SegVolGRU"))
        ensure_requirements(
            self.resourcePath("requirements.txt"), problem=versionProblem(), testing=slicer.app.testingEnabled(),
            install_torch=lambda requirement: self._installTorch(requirement, askConfirmation),
            torch_version=lambda: __import__("torch").__version__, pip_ensure=pipEnsure,
            pip_install=slicer.util.pip_install, confirm=askConfirmation and slicer.util.confirmOkCancelDisplay or None)
        self.requirementsChecked = True

    def _installTorch(self, requirement: str, askConfirmation: bool) -> bool:
        try:
            import PyTorchUtils
        except ImportError:
            from segvolgru.errors import InstallError

            raise InstallError(_("torch is not installed and the PyTorch extension is missing: install 'PyTorch' "
                                 "from the Extensions Manager, restart Slicer and try again.")) from None
        return bool(PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=askConfirmation, forceComputationBackend="cpu" if self.device == "cpu" else None,
            torchVersionRequirement=requirement))

    def resourcePath(self, relativePath: str) -> str:
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", relativePath)

    def setDevice(self, device: str) -> None:
        """"auto", "cpu" or "cuda"; stored in the application settings. The model moves on its next use."""
        self.device = device
        qt.QSettings().setValue(_SETTINGS_DEVICE, device)
        self._modelChanged()

    def _modelChanged(self) -> None:
        """Device or weights changed: a step computing now is dropped, and each segment is replayed with the new
        model at its next step; the undo history stays."""
        self._model = None
        self._generation += 1
        if self._steps is not None:
            self._steps.forget()
        if self._workflow is not None:
            self._workflow.set_model(self.loadModel)

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
        from segvolgru.weights import download_in_background

        if self._download is None or (self._download.done() and self._download.exception() is not None):
            self._download = download_in_background()
        progress = slicer.util.createProgressDialog(maximum=0, windowTitle="SegVolGRU",
                                                    windowModality=qt.Qt.WindowModal)
        started = time.monotonic()
        try:
            while not self._download.done() and not progress.wasCanceled:
                progress.labelText = _("Downloading the SegVol weights: {0} s").format(int(time.monotonic() - started))
                slicer.app.processEvents()
                concurrent.futures.wait([self._download], timeout=_WAIT_S)
        finally:
            progress.close()
        if not self._download.done():
            self.statusCallback(_("Stopped waiting; the download goes on: press Download again to use it."))
            return
        path, self._download = self._download.result(), None
        self.useLocalWeights(str(path))
        self.statusCallback(_("Official SegVol weights downloaded and checked."))

    def useLocalWeights(self, path: str) -> None:
        from segvolgru.weights import verify_weights

        verify_weights(path)
        self.weightsPath = path
        qt.QSettings().setValue(_SETTINGS_WEIGHTS, path)
        self._modelChanged()

    def loadModel(self):
        """The model for the current weights and device: official weights when found, else the DEMO model.

        Called on the worker thread (torch only); the result is kept for later requests.
        """
        if self._model is not None:
            return self._model
        from segvolgru.device import resolve_device
        from segvolgru.weights import pick_model

        # Plain strings here: this runs off the main thread, where Qt's translator must not be called.
        loaded = pick_model(self._weightsFile(), device=str(resolve_device(self.device)))
        self._model, self._modelDescription = loaded.model, loaded.description
        return self._model

    def forgetWorkflow(self) -> None:
        """Drop the workflow (and its undo history) and the waiting requests; a running step is dropped too."""
        if self._steps is not None:
            self._steps.forget()
        if self._workflow is not None and slicer.mrmlScene is self._workflow.scene:
            self._workflow.close()
        self._workflow, self._workflowKey = None, None

    @staticmethod
    def _key(parameterNode):
        volume, segmentation = parameterNode.inputVolume, parameterNode.segmentation
        return (volume.GetID() if volume else None, segmentation.GetID() if segmentation else None)

    def workflow(self, parameterNode):
        """The workflow for the panel's volume and segmentation (a new one when either changed; a segmentation
        named after the volume when none is selected)."""
        from segvolgru.errors import InputError
        from segvolgru.slicer_bridge import SegmentationWorkflow

        if parameterNode.inputVolume is None:
            raise InputError(_("No input volume: select the volume to segment first."))
        if self._workflow is None or self._key(parameterNode) != self._workflowKey:
            self.forgetWorkflow()
            self._workflow = SegmentationWorkflow.open(
                slicer.mrmlScene, parameterNode.inputVolume, parameterNode.segmentation, self.loadModel,
                app_logic=slicer.app.applicationLogic(), settings=self.sessionSettings(parameterNode),
                masking_from=lambda: slicer.mrmlScene.GetSingletonNode("SegmentEditor", "vtkMRMLSegmentEditorNode"))
            parameterNode.segmentation = self._workflow.segmentation_node
            self._workflowKey = self._key(parameterNode)
            pending, self._pendingSegment = self._pendingSegment, None
            if pending and self._workflow.segmentation_node.GetSegmentation().GetSegment(pending) is not None:
                self._guarded(lambda: self._workflow.select_segment(pending))
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
        from segvolgru.slicer_bridge import color_points

        color_points(parameterNode.positivePoints, _POSITIVE_COLOR)
        color_points(parameterNode.negativePoints, _NEGATIVE_COLOR)

    def segment(self, parameterNode) -> None:
        """The Segment button: the box when it moved (or never ran), then every click not applied yet, so it
        also catches up on clicks placed with auto-update off."""
        self.ensurePromptNodes(parameterNode)
        self.submit(lambda: self._boxOrPendingStep(parameterNode))
        self.syncClicks(parameterNode)

    def update(self, parameterNode) -> None:
        """After moves and transform changes, once the segment has a box: the box when the ROI moved, then the
        clicks not applied yet; silent when nothing changed."""
        if self._workflow is not None and any(p["type"] == "box" for p in self._workflow.prompts()):
            self.submit(lambda: self.workflow(parameterNode).segment_step(
                parameterNode.roi, parameterNode.positivePoints, parameterNode.negativePoints))

    def _boxOrPendingStep(self, parameterNode):
        step = self.workflow(parameterNode).segment_step(parameterNode.roi, parameterNode.positivePoints,
                                                         parameterNode.negativePoints)
        if step is None:
            self.statusCallback(_("Nothing new to segment: move the box or place a click."))
        return step

    def syncClicks(self, parameterNode) -> None:
        self.submit(lambda: self.workflow(parameterNode).sync_step(parameterNode.positivePoints,
                                                                 parameterNode.negativePoints), coalesce="sync")

    def undo(self, parameterNode) -> None:
        """Undo the last step (box, clicks, Clear or Reset prompts) of this volume and segmentation."""
        self.submit(lambda: self.workflow(parameterNode).undo_step())

    def redo(self, parameterNode) -> None:
        self.submit(lambda: self.workflow(parameterNode).redo_step())

    def selectSegment(self, parameterNode, segmentId: str) -> None:
        """Prompts go to this segment; before its workflow exists the choice waits for it (nothing is built)."""
        self.waitForIdle()
        if self._workflow is None or self._workflowKey != self._key(parameterNode):
            self._pendingSegment = segmentId
        else:
            self._guarded(lambda: self._workflow.select_segment(segmentId))

    def newSegment(self, parameterNode) -> str:
        self.waitForIdle()
        return self._guarded(self.workflow(parameterNode).new_segment)

    def resetPrompts(self, parameterNode) -> None:
        """Forget the segment's prompts and remove their points; the voxels stay. Undo brings them back."""
        self.waitForIdle()
        self._guarded(self.workflow(parameterNode).reset_prompts)
        self.statusCallback(_("Prompts cleared; the segment keeps its voxels (Undo brings the prompts back)."))

    def clearSegment(self, parameterNode) -> None:
        """Empty the segment and forget its prompts, as one step that Undo reverts."""
        self.waitForIdle()
        self.statusCallback(self._guarded(self.workflow(parameterNode).clear_segment).message)

    def _guarded(self, action):
        """Run an action that moves markups without the panel's point observers reacting to it."""
        self.applying = True
        try:
            return action()
        finally:
            self.applying = False

    def _stepQueue(self):
        if self._steps is None:
            from segvolgru.slicer_bridge import StepQueue

            self._steps = StepQueue(
                self._applyStep, is_current=lambda owner: owner == (self._workflow, self._generation),
                on_started=self._stepStarted, on_dropped=self._stepDropped, on_error=self._report,
                schedule=lambda seconds, poll: qt.QTimer.singleShot(int(seconds * 1000), poll),
                poll_gap_seconds=_POLL_GAP_MS / 1000, wait_seconds=_WAIT_S)
        return self._steps

    def submit(self, request, coalesce: str | None = None) -> None:
        """Queue ``request`` (main thread; returns a workflow Step or None) and start it when the worker is free.
        With ``coalesce``, a request of that kind already waiting is not queued twice (one sync covers all)."""
        def prepare():
            step = request()
            # Every request prepares its step through workflow(), so self._workflow is the one it belongs to.
            return None if step is None else ((self._workflow, self._generation), step)

        self._stepQueue().submit(prepare, coalesce)

    def _stepStarted(self, step) -> None:
        self.statusCallback(_("{0}: predicting...").format(step.action))

    def _stepDropped(self, step) -> None:
        self.statusCallback(_("{0}: result dropped, because the volume, segmentation, device or weights changed "
                              "while it was computed.").format(step.action))

    def _applyStep(self, owner, step) -> None:
        workflow = owner[0]
        selected = workflow.segment_id
        status = self._guarded(lambda: workflow.apply(step))
        self.statusCallback(f"{status.message} [{self._modelDescription}]")
        if workflow.segment_id != selected and self.segmentCallback is not None:
            self.segmentCallback(workflow.segment_id)

    def _report(self, error: Exception) -> None:
        """A failed request (later ones were built on it and are dropped): shown; waitForIdle re-raises it."""
        logging.error("SegVolGRU: %s", error, exc_info=error)
        self.statusCallback(str(error))
        if not slicer.app.testingEnabled():
            slicer.util.errorDisplay(str(error), windowTitle="SegVolGRU")

    def waitForIdle(self, timeoutSeconds: float = 600.0) -> None:
        """Apply every queued request before returning (scripts, tests and segment switches); raises the first
        error reported meanwhile. Waits on the running step with the GIL released, processing events between."""
        if self._steps is not None:
            self._steps.wait_idle(timeoutSeconds, lambda: slicer.app.processEvents())

    def shutdown(self) -> None:
        """Stop for good without waiting: a running prediction finishes on its thread and is never applied, and
        later requests are ignored (a reloaded module has a new Logic)."""
        self._stepQueue().shutdown()


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
        for device in ("cpu", "cuda"):
            self.setUp()
            try:
                self.test_panelWorkflowOnGeneratedVolume(device)
            except unittest.SkipTest as reason:
                self.delayDisplay(f"Skipped on {device}: {reason}")

    def test_panelWorkflowOnGeneratedVolume(self, device: str = "cpu") -> None:
        """Box, a click applied by Segment, one by a (coalesced) sync, undo/redo of clicks and of Clear."""
        import numpy as np
        from segvolgru.errors import InstallError, WeightsError

        logic = SegVolGRULogic()
        try:
            logic.setupPythonRequirements(askConfirmation=False)  # tests install nothing: InstallError says what
            import segvolgru
            from segvolgru.slicer_bridge import kji_to_world, new_volume_node, read_segment_mask

            segvolgru.demo_model_path()  # WeightsError in a build without the DEMO model
            if device == "cuda" and not __import__("torch").cuda.is_available():
                raise unittest.SkipTest("no CUDA device")
        except (InstallError, WeightsError) as error:
            raise unittest.SkipTest(str(error)) from None
        logic.device, logic.weightsPath = device, None
        k, j, i = np.meshgrid(np.arange(24), np.arange(64), np.arange(64), indexing="ij")
        ball = ((k - 12) / 7.0) ** 2 + ((j - 30) / 14.0) ** 2 + ((i - 34) / 16.0) ** 2 < 1
        values = (50 + 900 * ball + np.random.default_rng(0).normal(0, 30, ball.shape)).astype(np.int16)
        volume = new_volume_node(slicer.mrmlScene, values, (1.2, 1.2, 2.5), (0, 0, 0), np.eye(3), "phantom")
        node = logic.getParameterNode()
        node.inputVolume = volume
        logic.ensurePromptNodes(node)

        def segment():
            return read_segment_mask(node.segmentation, logic._workflow.segment_id, volume)

        node.roi.SetCenter(*kji_to_world(volume, (12, 30, 34)))
        node.roi.SetSize(45.0, 40.0, 40.0)
        logic.segment(node)
        logic.waitForIdle()
        np.testing.assert_array_equal(segment(), logic._workflow.mask())
        afterBox = segment()

        node.positivePoints.AddControlPointWorld(list(kji_to_world(volume, (12, 30, 34))))
        logic.segment(node)  # same box: only the pending click runs
        logic.waitForIdle()
        node.negativePoints.AddControlPointWorld(list(kji_to_world(volume, (4, 10, 10))))
        logic.syncClicks(node)
        logic.syncClicks(node)  # coalesced with the first while it waits
        logic.waitForIdle()
        clicks = [(p["voxel"], p["positive"]) for p in logic._workflow.prompts() if p["type"] == "click"]
        self.assertEqual(clicks, [([12, 30, 34], True), ([4, 10, 10], False)])
        afterClicks = segment()
        np.testing.assert_array_equal(afterClicks, logic._workflow.mask())

        logic.undo(node)
        logic.undo(node)
        logic.waitForIdle()
        self.assertEqual([n.GetNumberOfControlPoints() for n in (node.positivePoints, node.negativePoints)], [0, 0])
        np.testing.assert_array_equal(segment(), afterBox)
        logic.redo(node)
        logic.redo(node)
        logic.waitForIdle()
        np.testing.assert_array_equal(segment(), afterClicks)
        logic.clearSegment(node)
        logic.undo(node)
        logic.waitForIdle()
        np.testing.assert_array_equal(segment(), afterClicks)
        logic.shutdown()
        self.delayDisplay(f"Panel workflow passed on {device}")
