"""Stand-ins for the Qt widgets of the panel, so that pytest drives SegVolGRUWidget through its .ui file.

``qt.QUiLoader().load`` builds one ``StandInWidget`` per ``<widget>`` of the .ui file (its class, name and the
properties the module relies on), so the real ``slicer.util.loadUI`` and ``childWidgetVariables`` work on them.
The widgets keep what the panel reads and writes (current node, current segment, enabled, tool tip, text, checked)
and emit the signals Slicer's widgets emit when those change. ``connect_gui`` binds widgets that name a
``SlicerParameterName`` to a parameter node both ways, connecting after the module's own slots as
``parameterNodeWrapper.connectGui`` does. The look of the panel and Qt's exact signal order are not reproduced.
"""
from __future__ import annotations

import inspect
import xml.etree.ElementTree as ET
from collections import defaultdict


class StandInWidget:
    def __init__(self, class_name: str = "QWidget", name: str = "", properties: dict | None = None) -> None:
        self._class, self.name, self._children = class_name, name, []
        self._slots: dict[str, list] = defaultdict(list)
        self.properties = dict(properties or {})
        self.enabled, self.toolTip, self.text, self.labelText = True, "", "", ""
        self.collapsed = bool(self.properties.get("collapsed", False))
        self.checked = bool(self.properties.get("checked", False))
        self.segmentationNodeSelectorVisible = True
        self.placeMultipleMarkups = 0
        self._node, self._segment, self._items, self._current_text = None, "", [], ""

    def __bool__(self) -> bool:
        return True

    def className(self) -> str:
        return self._class

    def children(self) -> list:
        return list(self._children)

    def layout(self):
        return self

    def addWidget(self, widget) -> None:
        self._children.append(widget)

    def connect(self, signal: str, slot) -> None:
        self._slots[signal].append(slot)

    def disconnect(self, signal: str, slot=None) -> None:
        self._slots[signal] = [s for s in self._slots[signal] if slot is not None and s is not slot]

    def emit(self, signal: str, *args) -> None:
        for slot in list(self._slots[signal]):
            slot(*args[:_accepted(slot, len(args))])

    def setMRMLScene(self, scene) -> None:
        self.scene = scene

    def currentNode(self):
        return self._node

    def setCurrentNode(self, node) -> None:
        if node is self._node:
            return
        self._node = node
        self.emit("currentNodeChanged(vtkMRMLNode*)", node)
        if self._class == "qMRMLSegmentSelectorWidget":  # its segment list follows the segmentation
            ids = list(node.GetSegmentation().GetSegmentIDs()) if node is not None else []
            self.setCurrentSegmentID(ids[0] if ids else "")

    def currentSegmentID(self) -> str:
        return self._segment

    def setCurrentSegmentID(self, segment_id: str) -> None:
        if segment_id != self._segment:
            self._segment = segment_id
            self.emit("currentSegmentChanged(QString)", segment_id)

    def setChecked(self, checked: bool) -> None:
        if bool(checked) != self.checked:
            self.checked = bool(checked)
            self.emit("toggled(bool)", self.checked)

    def click(self) -> None:
        self.emit("clicked(bool)", False)

    def addItems(self, items) -> None:
        self._items += list(items)

    def setCurrentText(self, text: str) -> None:
        if text != self._current_text:
            self._current_text = text
            self.emit("currentTextChanged(QString)", text)


def _accepted(slot, offered: int) -> int:
    """How many of a signal's arguments PythonQt hands to ``slot``: as many as it takes (it drops the rest)."""
    try:
        parameters = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return offered
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return offered
    return min(offered, sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters))


def _build(element) -> StandInWidget:
    properties = {}
    for prop in element.findall("property"):
        value = prop.find("string")
        flag = prop.find("bool")
        properties[prop.get("name")] = value.text if value is not None else (flag is not None and flag.text == "true")
    widget = StandInWidget(element.get("class"), element.get("name"), properties)
    for child in element.iter("widget"):
        if child is not element and _parent_widget(element, child):
            widget._children.append(_build(child))
    return widget


def _parent_widget(parent, child) -> bool:
    """Whether ``child`` is a widget directly under ``parent`` (layouts and items in between)."""
    stack = list(parent)
    while stack:
        node = stack.pop()
        if node is child:
            return True
        if node.tag != "widget":
            stack.extend(list(node))
    return False


def load_ui(path: str) -> StandInWidget:
    return _build(ET.parse(path).getroot().find("widget"))


def connect_gui(node_wrapper, gui) -> list:
    """Bind the widgets of ``gui`` that name a ``SlicerParameterName`` to ``node_wrapper``, both ways."""
    bindings = []
    for widget in vars(gui).values():
        name = getattr(widget, "properties", {}).get("SlicerParameterName")
        if not name:
            continue
        if hasattr(widget, "_node") and widget._class != "QCheckBox":
            widget.setCurrentNode(getattr(node_wrapper, name))
            slot, signal = (lambda node, name=name: setattr(node_wrapper, name, node)), "currentNodeChanged(vtkMRMLNode*)"
        else:
            widget.setChecked(getattr(node_wrapper, name))
            slot, signal = (lambda checked, name=name: setattr(node_wrapper, name, checked)), "toggled(bool)"
        widget.connect(signal, slot)
        bindings.append((widget, signal, slot, name))

    def node_to_gui(caller=None, event=None):
        for widget, signal, _slot, name in bindings:
            value = getattr(node_wrapper, name)
            widget.setChecked(value) if signal == "toggled(bool)" else widget.setCurrentNode(value)

    tag = node_wrapper.parameterNode.AddObserver("ModifiedEvent", node_to_gui)
    return [bindings, tag]


def disconnect_gui(node_wrapper, binding) -> None:
    bindings, tag = binding
    for widget, signal, slot, _name in bindings:
        widget.disconnect(signal, slot)
    node_wrapper.parameterNode.RemoveObserver(tag)
