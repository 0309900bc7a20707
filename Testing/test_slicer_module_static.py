"""Static checks of the Slicer module and its packaging; nothing here imports SegVolGRU.py or needs Slicer."""
from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "SegVolGRU"
MODULE_FILE = MODULE_DIR / "SegVolGRU.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SegVolGRU.ui"
S4EXT_KEYS = ("scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors",
              "category", "iconurl", "status", "description", "screenshoturls", "enabled")
# The s4ext key that must equal each EXTENSION_* value of the extension's CMakeLists.txt.
CMAKE_TO_S4EXT = {"EXTENSION_HOMEPAGE": "homepage", "EXTENSION_CATEGORY": "category",
                  "EXTENSION_CONTRIBUTORS": "contributors", "EXTENSION_DESCRIPTION": "description",
                  "EXTENSION_ICONURL": "iconurl", "EXTENSION_SCREENSHOTURLS": "screenshoturls",
                  "EXTENSION_DEPENDS": "depends", "EXTENSION_STATUS": "status"}
# Widget class expected from the ending of its object name.
CLASS_BY_SUFFIX = (("PlaceWidget", {"qSlicerMarkupsPlaceWidget"}), ("SelectorWidget", {"qMRMLSegmentSelectorWidget"}),
                   ("Selector", {"qMRMLNodeComboBox"}), ("CollapsibleButton", {"ctkCollapsibleButton"}),
                   ("Button", {"QPushButton"}), ("CheckBox", {"QCheckBox"}), ("ComboBox", {"QComboBox"}),
                   ("LineEdit", {"QLineEdit"}), ("Label", {"QLabel"}))


def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(UI_FILE).getroot().iter("widget")}


def cmake_listed_files() -> set[str]:
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    listed = set()
    for block in re.findall(r"set\(MODULE_PYTHON_(?:SCRIPTS|RESOURCES)\s+(.*?)\)", text, re.S):
        listed.update(line.strip().replace("${MODULE_NAME}", "SegVolGRU") for line in block.splitlines() if line.strip())
    return listed


def shipped_files() -> set[str]:
    """Every file under SegVolGRU/ except build and cache output (what git would not ignore)."""
    files = set()
    for path in MODULE_DIR.rglob("*"):
        parts = path.relative_to(MODULE_DIR).parts
        if path.is_file() and "__pycache__" not in parts and not any(p.endswith(".egg-info") for p in parts) \
                and path.suffix != ".pyc" and path.name != "CMakeLists.txt":
            files.add(path.relative_to(MODULE_DIR).as_posix())
    return files


def s4ext() -> dict[str, str]:
    pairs = {}
    for line in (ROOT / "SegVolGRU.s4ext").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            pairs[key] = value.strip()
    return pairs


def test_every_file_under_the_module_folder_is_listed_in_cmake_and_every_listed_file_exists():
    listed, present = cmake_listed_files(), shipped_files()
    assert not present - listed, f"add these lines to SegVolGRU/CMakeLists.txt: {sorted(present - listed)}"
    assert not listed - present, f"SegVolGRU/CMakeLists.txt lists missing files: {sorted(listed - present)}"


def test_ui_file_parses_and_names_are_unique():
    root = ET.parse(UI_FILE).getroot()
    names = [w.get("name") for w in root.iter("widget")]
    assert root.tag == "ui" and len(names) == len(set(names))


def test_every_ui_widget_the_module_uses_exists_with_the_expected_class():
    used = {node.attr for node in ast.walk(module_tree())
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
            and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"}
    widgets = ui_widgets()
    assert used, "the widget uses no self.ui.<name>"
    assert not used - set(widgets), f"not in SegVolGRU.ui: {sorted(used - set(widgets))}"
    for name in used:
        expected = next(classes for suffix, classes in CLASS_BY_SUFFIX if name.endswith(suffix))
        assert widgets[name].get("class") in expected, f"{name} is a {widgets[name].get('class')}, expected {expected}"


def test_parameter_bound_widgets_name_fields_of_the_parameter_node():
    classes = {n.name: n for n in module_tree().body if isinstance(n, ast.ClassDef)}
    parameter_class = classes["SegVolGRUParameterNode"]
    assert any(getattr(d, "id", None) == "parameterNodeWrapper" for d in parameter_class.decorator_list)
    fields = {n.target.id for n in parameter_class.body if isinstance(n, ast.AnnAssign)}
    bound = {w.get("name"): p.find("string").text for w in ui_widgets().values()
             for p in w.findall("property") if p.get("name") == "SlicerParameterName"}
    assert bound and set(bound.values()) <= fields, f"unknown parameters: {set(bound.values()) - fields}"


def test_module_file_has_the_five_template_classes_in_order_and_stays_short():
    names = [n.name for n in module_tree().body if isinstance(n, ast.ClassDef) and n.name.startswith("SegVolGRU")]
    assert names == ["SegVolGRU", "SegVolGRUParameterNode", "SegVolGRUWidget", "SegVolGRULogic", "SegVolGRUTest"]
    assert len(MODULE_FILE.read_text(encoding="utf-8").splitlines()) <= 800


def test_module_imports_nothing_heavy_at_import_time():
    top_level = set()
    for node in module_tree().body:
        if isinstance(node, ast.Import):
            top_level.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            top_level.add((node.module or "").split(".")[0])
    assert not top_level & {"torch", "segvolgru", "monai", "numpy", "PyTorchUtils"}


def test_s4ext_has_its_fields_and_agrees_with_the_cmake_metadata():
    pairs = s4ext()
    assert not set(S4EXT_KEYS) - set(pairs), f"missing s4ext keys: {set(S4EXT_KEYS) - set(pairs)}"
    assert pairs["scm"] == "git" and pairs["enabled"] == "1" and pairs["depends"] == "PyTorch"
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    values = dict(re.findall(r'set\((EXTENSION_\w+)\s+"([^"]*)"\)', cmake))
    for cmake_key, s4ext_key in CMAKE_TO_S4EXT.items():
        assert values.get(cmake_key) == pairs[s4ext_key], f"{cmake_key} differs from s4ext '{s4ext_key}'"
    assert "add_subdirectory(SegVolGRU)" in cmake and "add_subdirectory(Testing/Slicer)" in cmake


def test_slicer_only_tests_are_registered_with_ctest():
    registered = re.findall(r"slicer_add_python_unittest\(SCRIPT\s+(\S+)\)",
                            (ROOT / "Testing" / "Slicer" / "CMakeLists.txt").read_text(encoding="utf-8"))
    scripts = sorted(p.name for p in (ROOT / "Testing" / "Slicer").glob("*.py"))
    assert sorted(registered) == scripts


def test_icon_is_a_128_pixel_square_png():
    data = (MODULE_DIR / "Resources" / "Icons" / "SegVolGRU.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(data[16:20], "big") == 128 and int.from_bytes(data[20:24], "big") == 128


@pytest.mark.parametrize("package", ["torch", "slicer-core", "numpy", "SimpleITK", "vtk"])
def test_requirements_leave_out_what_slicer_or_pytorchutils_provide(package):
    lines = (MODULE_DIR / "Resources" / "requirements.txt").read_text(encoding="utf-8").splitlines()
    names = {re.split(r"[<>=!~\[ ]", line.strip())[0].lower() for line in lines if line.strip() and not line.startswith("#")}
    assert package.lower() not in names
    assert {"monai", "einops", "huggingface_hub", "safetensors"} <= names
