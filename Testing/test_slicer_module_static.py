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
    assert len(MODULE_FILE.read_text(encoding="utf-8").splitlines()) < 800


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


# ----------------------------------------------------------------------------- Extensions Index catalog entry
# Properties of the Extensions Index's slicer-extension-catalog-entry schema (v1.0.1; v1.0.2 adds
# dicom_support_rule) with their JSON types; the schema forbids any other key and requires the first three.
CATALOG_REQUIRED = ("$schema", "category", "scm_url")
CATALOG_TYPES = {"$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
                 "build_dependencies": list, "build_subdirectory": str, "enabled": bool, "tier": int,
                 "dicom_support_rule": str}
CATALOG_SCHEMA_URL = re.compile(r"https://raw\.githubusercontent\.com/Slicer/Slicer/main/Schemas/"
                                r"slicer-extension-catalog-entry-schema-v1\.0\.[12]\.json#?")
RAW_PREFIX = "https://raw.githubusercontent.com/"


def cmake_metadata() -> tuple[str, dict[str, str]]:
    """The project() name and the EXTENSION_* values of the root CMakeLists.txt."""
    cmake = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    values = dict(re.findall(r'set\((EXTENSION_\w+)\s+"([^"]*)"\)', cmake))
    return re.search(r"^project\((\w+)", cmake, re.M).group(1), values


def catalog_entry() -> dict:
    import json

    return json.loads((ROOT / "SegVolGRU.json").read_text(encoding="utf-8"))


def test_catalog_entry_is_named_after_the_project_and_follows_the_index_schema():
    project, _ = cmake_metadata()
    assert (ROOT / f"{project}.json").is_file(), "the Extensions Index file must be <CMake project name>.json"
    raw = (ROOT / "SegVolGRU.json").read_bytes()
    assert b"\r" not in raw and raw.endswith(b"\n"), "the index accepts LF line endings only"
    entry = catalog_entry()
    assert not set(CATALOG_REQUIRED) - set(entry), f"missing required keys: {set(CATALOG_REQUIRED) - set(entry)}"
    assert not set(entry) - set(CATALOG_TYPES), f"keys the schema forbids: {set(entry) - set(CATALOG_TYPES)}"
    for key, value in entry.items():
        assert type(value) is CATALOG_TYPES[key], f"{key} must be a {CATALOG_TYPES[key].__name__}"
    assert CATALOG_SCHEMA_URL.fullmatch(entry["$schema"]), entry["$schema"]
    assert all(isinstance(d, str) and d for d in entry["build_dependencies"])
    assert entry.get("scm_type", "git") in ("git", "local") and 1 <= entry.get("tier", 1) <= 5
    assert entry["scm_url"].startswith("https://") and entry["scm_url"].endswith(".git")


def test_catalog_entry_agrees_with_the_s4ext_and_the_cmake_metadata():
    entry, pairs = catalog_entry(), s4ext()
    _, values = cmake_metadata()
    assert entry["scm_url"] == pairs["scmurl"] and entry["scm_revision"] == pairs["scmrevision"]
    assert entry.get("scm_type", "git") == pairs["scm"]
    assert entry.get("build_subdirectory", ".") == pairs["build_subdirectory"]
    assert entry.get("enabled", True) == (pairs["enabled"] == "1")
    assert entry["category"] == pairs["category"] == values["EXTENSION_CATEGORY"]
    depends = [] if values["EXTENSION_DEPENDS"] == "NA" else values["EXTENSION_DEPENDS"].split()
    assert entry["build_dependencies"] == depends == pairs["depends"].split() == ["PyTorch"]
    # The repository the index clones is the one the homepage and the raw URLs name.
    repository = entry["scm_url"].removesuffix(".git")
    assert values["EXTENSION_HOMEPAGE"] == repository
    owner_repo = repository.removeprefix("https://github.com/")
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in values[key].split():
            assert url.startswith(f"{RAW_PREFIX}{owner_repo}/{entry['scm_revision']}/"), f"{key}: {url}"
    assert entry.get("tier", 1) == 1 or pairs["status"] != "Experimental", "an experimental extension is tier 1"


def test_license_file_is_the_apache_license_that_pyproject_declares():
    text = (ROOT / "LICENSE.txt").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert re.search(r'^license\s*=\s*"Apache-2\.0"', (ROOT / "pyproject.toml").read_text(encoding="utf-8"), re.M)
    assert "LICENSE.txt" in (ROOT / "NOTICE.md").read_text(encoding="utf-8")


def test_every_raw_url_in_the_metadata_names_a_committed_png():
    _, values = cmake_metadata()
    urls = values["EXTENSION_ICONURL"].split() + values["EXTENSION_SCREENSHOTURLS"].split()
    assert len(values["EXTENSION_SCREENSHOTURLS"].split()) >= 1
    for url in urls:
        path = ROOT / url.removeprefix(RAW_PREFIX).split("/", 3)[3]
        assert path.is_file(), f"{url} names {path.relative_to(ROOT)}, which is not in the repository"
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.relative_to(ROOT)} is not a PNG"
        assert len(data) < 300 * 1024, f"{path.relative_to(ROOT)} is {len(data) // 1024} KB"


def test_screenshot_is_produced_by_the_render_script_whose_caption_says_it_is_no_panel_screenshot():
    script = (ROOT / "scripts" / "render_screenshot.py").read_text(encoding="utf-8")
    assert "Screenshots\" / \"panel.png\"" in script and "NOT a screenshot of the Slicer panel" in script
    assert "InteractiveSession" in script and "demo_model_path()" in script
    assert "scripts/render_screenshot.py" in (ROOT / "NOTICE.md").read_text(encoding="utf-8")
