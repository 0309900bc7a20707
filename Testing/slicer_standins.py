"""Stand-ins for exactly what the ``slicer-core`` wheel lacks, so that pytest executes ``SegVolGRU/SegVolGRU.py``.

Real: MRML, markups, segmentations, the segment editor logic, ``slicer.util`` (from slicer-core). Stood in: the
``qt`` module (an event loop of single-shot timers, settings in memory, shortcuts, the .ui loader building the
widgets of Testing/slicer_widget_standins.py), ``slicer.app`` (testing mode, ``processEvents`` running due timers,
the application logic of a ``HeadlessSlicer``), ``slicer.i18n``, ``slicer.parameterNodeWrapper`` (typed attributes
stored in a scripted module node as Slicer stores them) and the ``ScriptedLoadableModule`` base classes. The
panel's look and Qt's exact signal order need the real application.
"""
from __future__ import annotations

import heapq
import importlib.util
import itertools
import logging
import sys
import tempfile
import time
import types
import unittest
from pathlib import Path

MODULE_FILE = Path(__file__).resolve().parents[1] / "SegVolGRU" / "SegVolGRU.py"


class _EventLoop:
    """Due single-shot timers, run by ``processEvents`` in order of their due time."""

    def __init__(self) -> None:
        self._timers: list[tuple[float, int, object]] = []
        self._order = itertools.count()

    def single_shot(self, milliseconds: int, callback) -> None:
        heapq.heappush(self._timers, (time.monotonic() + milliseconds / 1000.0, next(self._order), callback))

    def process_events(self) -> None:
        now = time.monotonic()
        due = []
        while self._timers and self._timers[0][0] <= now:
            due.append(heapq.heappop(self._timers)[2])
        for callback in due:
            callback()

    def run_until(self, condition, timeout_seconds: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_seconds
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError("the stand-in event loop timed out")
            self.process_events()
            time.sleep(0.001)


def _qt_module(loop: _EventLoop) -> types.ModuleType:
    qt = types.ModuleType("qt")
    settings: dict[str, object] = {}

    class QTimer:
        """Single-shot timers on the stand-in loop; an instance restarts on start() and fires once."""

        def __init__(self) -> None:
            self._interval, self._slots, self._generation = 0, [], 0
            self.active = False

        @staticmethod
        def singleShot(milliseconds, callback):
            loop.single_shot(milliseconds, callback)

        def setSingleShot(self, single: bool) -> None:
            pass

        def setInterval(self, milliseconds: int) -> None:
            self._interval = milliseconds

        def connect(self, signal, slot) -> None:
            self._slots.append(slot)

        def start(self) -> None:
            self._generation += 1
            self.active, generation = True, self._generation
            loop.single_shot(self._interval, lambda: self._fire(generation))

        def stop(self) -> None:
            self._generation += 1
            self.active = False

        def _fire(self, generation: int) -> None:
            if generation == self._generation and self.active:
                self.active = False
                for slot in self._slots:
                    slot()

    class QShortcut:
        """Registered in ``qt.shortcuts`` while connected, so tests can press them."""

        def __init__(self, keys, parent) -> None:
            self.keys, self.parent, self.slot, self.context = keys.keys, parent, None, None

        def setContext(self, context) -> None:
            self.context = context

        def connect(self, signal, slot) -> None:
            self.slot = slot
            qt.shortcuts.append(self)

        def disconnect(self, signal) -> None:
            self.slot = None
            qt.shortcuts.remove(self)

        def setParent(self, parent) -> None:
            self.parent = parent

    class QKeySequence:
        def __init__(self, keys: str) -> None:
            self.keys = keys

    class QFile:
        ReadOnly = 1

        def __init__(self, path) -> None:
            self.path = str(path)

        def exists(self) -> bool:
            return Path(self.path).is_file()

        def open(self, mode) -> bool:
            return True

    class QUiLoader:
        def load(self, qfile):
            from slicer_widget_standins import load_ui

            return load_ui(qfile.path)

    class QFileDialog:
        answer = ""  # what the next getOpenFileName returns (a test sets it)

        @classmethod
        def getOpenFileName(cls, *args):
            return cls.answer

    class QSettings:
        def value(self, key, default=None):
            return settings.get(key, default)

        def setValue(self, key, value):
            settings[key] = value

    class QElapsedTimer:
        def start(self):
            self._started = time.monotonic()

        def elapsed(self):
            return int((time.monotonic() - self._started) * 1000)

    class QEventLoop:
        AllEvents = 0

    class QMessageBox:
        Ok, Cancel, Critical, Warning, Information, Question = 1, 2, 3, 4, 5, 6

    class Qt:
        WidgetWithChildrenShortcut, WindowModal, WaitCursor = 1, 2, 3

    for cls in (QTimer, QSettings, QElapsedTimer, QEventLoop, QMessageBox, Qt, QShortcut, QKeySequence, QFile,
                QUiLoader, QFileDialog):
        setattr(qt, cls.__name__, cls)
    qt.settings, qt.shortcuts = settings, []
    return qt


class _App:
    """``slicer.app`` as the module uses it."""

    def __init__(self, loop: _EventLoop, headless) -> None:
        self._loop = loop
        self._headless = headless
        self.majorVersion, self.minorVersion = 5, 10
        self.applicationName = "Slicer"
        self.temporaryPath = tempfile.mkdtemp(prefix="segvolgru-slicer-")

    def testingEnabled(self) -> bool:
        return True

    def processEvents(self, *args) -> None:
        self._loop.process_events()

    def applicationLogic(self):
        return self._headless.app_logic

    def topLevelWidgets(self) -> list:
        return []


def _parameter_node_wrapper(cls):
    """Typed attributes on a ``vtkMRMLScriptedModuleNode``: MRML nodes as node references, the rest as parameters."""
    import slicer

    annotations = dict(cls.__annotations__)

    class Wrapper:
        def __init__(self, node) -> None:
            object.__setattr__(self, "parameterNode", node)
            for name, kind in annotations.items():
                if not _is_node_type(kind) and not node.GetParameter(name) and hasattr(cls, name):
                    setattr(self, name, getattr(cls, name))

        def __getattr__(self, name):
            if name not in annotations:
                raise AttributeError(name)
            kind = _resolve(annotations[name])
            node = object.__getattribute__(self, "parameterNode")
            if _is_node_type(kind):
                return node.GetNodeReference(name)
            text = node.GetParameter(name)
            return text == "True" if kind is bool else kind(text)

        def __setattr__(self, name, value):
            if name not in annotations:
                raise AttributeError(f"{cls.__name__} has no parameter '{name}'")
            node = self.parameterNode
            if _is_node_type(_resolve(annotations[name])):
                node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            else:
                node.SetParameter(name, str(value))

        def AddObserver(self, event, callback, priority=0.0):
            return self.parameterNode.AddObserver(event, callback, priority)

        def RemoveObserver(self, tag):
            self.parameterNode.RemoveObserver(tag)

        def StartModify(self):
            return self.parameterNode.StartModify()

        def EndModify(self, was_modifying):
            self.parameterNode.EndModify(was_modifying)

        def Modified(self):
            self.parameterNode.Modified()

        def connectGui(self, gui):
            from slicer_widget_standins import connect_gui

            return connect_gui(self, gui)

        def disconnectGui(self, tag):
            from slicer_widget_standins import disconnect_gui

            disconnect_gui(self, tag)

    def _resolve(kind):
        if isinstance(kind, str):
            return eval(kind, {"slicer": slicer, "str": str, "bool": bool, "float": float, "int": int})
        return kind

    def _is_node_type(kind) -> bool:
        kind = _resolve(kind)
        return isinstance(kind, type) and issubclass(kind, slicer.vtkMRMLNode)

    Wrapper.__name__ = cls.__name__
    return Wrapper


def _scripted_loadable_module() -> types.ModuleType:
    import slicer

    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent) -> None:
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None) -> None:
            from slicer_widget_standins import StandInWidget

            self.moduleName = type(self).__name__.removesuffix("Widget")
            self.parent = parent or StandInWidget("qMRMLWidget")
            self.layout = self.parent.layout()

        def resourcePath(self, filename):
            return str(MODULE_FILE.parent / "Resources" / filename)

        def setup(self) -> None:
            pass

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None) -> None:
            self.moduleName = type(self).__name__.removesuffix("Logic")

        def getParameterNode(self):
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.vtkMRMLScriptedModuleNode()
                node.SetSingletonTag(self.moduleName)
                node.SetAttribute("ModuleName", self.moduleName)
                node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
                node = slicer.mrmlScene.AddNode(node)
            return node

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, requestedDelay=None, msec=None):
            logging.info(message)

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(module, cls.__name__, cls)
    return module


class SlicerStandIns:
    """Installs the stand-ins around a ``HeadlessSlicer`` and loads the module file; ``remove()`` undoes it."""

    def __init__(self, headless) -> None:
        import slicer

        self.loop = _EventLoop()
        self.qt = _qt_module(self.loop)
        self.app = _App(self.loop, headless)
        i18n = types.ModuleType("slicer.i18n")
        i18n.tr = lambda text: text
        i18n.translate = lambda context, text: text
        wrapper = types.ModuleType("slicer.parameterNodeWrapper")
        wrapper.parameterNodeWrapper = _parameter_node_wrapper
        self._modules = {"qt": self.qt, "slicer.i18n": i18n, "slicer.parameterNodeWrapper": wrapper,
                         "slicer.ScriptedLoadableModule": _scripted_loadable_module()}
        self._saved_modules = {name: sys.modules.get(name) for name in self._modules}
        self._saved_attributes = {name: getattr(slicer, name, None)
                                  for name in ("app", "mrmlScene", "qSlicerMarkupsPlaceWidget")}
        sys.modules.update(self._modules)
        slicer.app, slicer.mrmlScene = self.app, headless.scene
        slicer.qSlicerMarkupsPlaceWidget = type("qSlicerMarkupsPlaceWidget", (), {
            "ForcePlaceSingleMarkup": 1, "ForcePlaceMultipleMarkups": 2})
        spec = importlib.util.spec_from_file_location("SegVolGRU", MODULE_FILE)
        self.module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.module)

    def remove(self) -> None:
        import slicer

        for name, module in self._saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        for name, value in self._saved_attributes.items():
            setattr(slicer, name, value)
