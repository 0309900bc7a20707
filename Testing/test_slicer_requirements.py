"""First-use installs in Slicer (segvolgru.slicer_bridge.requirements) with stand-in installers: pip never gets
to change torch, an old torch / Python / Slicer is refused with what to upgrade, tests install nothing."""
from __future__ import annotations

import pytest

from segvolgru.errors import InstallError
from segvolgru.slicer_bridge import requirements as req


def write_requirements(tmp_path, *lines):
    path = tmp_path / "requirements.txt"
    path.write_text("# comment\n" + "\n".join(lines) + "\n", encoding="utf-8")
    return path


def ensure(path, tmp_path, calls, *, testing=False, version="2.5.1+cu121", pip_ensure=True, confirm=None):
    return req.ensure_requirements(
        path, problem=None, testing=testing, install_torch=lambda spec: calls.append(("torch", spec)) or True,
        torch_version=lambda: version,
        pip_ensure=(lambda p, c: calls.append(("pip_ensure", p, open(c).read()))) if pip_ensure else None,
        pip_install=lambda args: calls.append(("pip_install", args)), confirm=confirm)


def test_pip_gets_torch_pinned_to_the_installed_version(tmp_path):
    calls = []
    path = write_requirements(tmp_path, "monai>=1.3,<1.7", "numpy")
    ensure(path, tmp_path, calls)
    assert calls == [("pip_ensure", str(path), "torch==2.5.1+cu121\n")]


def test_without_slicer_packaging_a_missing_package_is_installed_with_the_pin_after_asking(tmp_path):
    calls, asked = [], []
    path = write_requirements(tmp_path, "surely-not-installed-package>=1")
    with pytest.raises(InstallError, match="still missing"):
        ensure(path, tmp_path, calls, pip_ensure=False, confirm=lambda text: asked.append(text) or True)
    assert asked and calls[0][0] == "pip_install" and calls[0][1][-2] == "-c"
    with pytest.raises(InstallError, match="not installed"):
        ensure(path, tmp_path, [], pip_ensure=False, confirm=lambda text: False)


def test_an_old_torch_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(InstallError, match="torch 2.1.0 is older than the 2.2 .*PyTorch Utils"):
        ensure(write_requirements(tmp_path, "numpy"), tmp_path, [], version="2.1.0")


def test_tests_install_nothing_and_name_what_is_missing(tmp_path):
    calls = []
    with pytest.raises(InstallError, match="surely-not-installed-package are missing"):
        ensure(write_requirements(tmp_path, "surely-not-installed-package"), tmp_path, calls, testing=True)
    assert calls == []


@pytest.mark.parametrize(("python", "slicer_version", "expected"), [
    ((3, 9), (5, 8), "Python 3.10 or later"), ((3, 12), (5, 8), "Slicer 5.10 or later"), ((3, 12), (5, 10), None)])
def test_old_python_or_slicer_is_named_with_the_upgrade(python, slicer_version, expected):
    problem = req.version_problem(python, slicer_version)
    assert (problem is None) if expected is None else (expected in problem)


def test_a_version_problem_installs_nothing(tmp_path):
    calls = []
    with pytest.raises(InstallError, match="Slicer 5.10"):
        req.ensure_requirements(write_requirements(tmp_path, "numpy"), problem="SegVolGRU needs Slicer 5.10",
                                testing=False, install_torch=calls.append, torch_version=lambda: "2.5",
                                pip_ensure=None, pip_install=calls.append, confirm=None)
    assert calls == []


def test_version_strings_with_local_tags_compare_by_major_and_minor():
    assert req.version_tuple("2.10.0+cpu") == (2, 10) > req.TORCH_MINIMUM
