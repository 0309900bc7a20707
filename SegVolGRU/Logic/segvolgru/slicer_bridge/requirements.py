"""First use inside Slicer: the versions SegVolGRU needs, and installing its Python packages without touching torch.

No Qt and no ``slicer.app`` here: the Slicer module hands in what installs (PyTorch Utils, ``slicer.packaging``,
``slicer.util.pip_install``), so pytest checks the rules with stand-ins. torch comes from the PyTorch extension,
built for the user's GPU; pip installs the other packages with torch pinned to the installed version, so that a
dependency (a newer MONAI wanting a newer torch) can never replace it.
"""
from __future__ import annotations

import importlib.util
import os
import re
import tempfile
from collections.abc import Callable, Sequence

from segvolgru.errors import InstallError

# The engine's floors (pyproject.toml): the Python of its syntax and dependencies, the torch of its model code.
PYTHON_MINIMUM = (3, 10)
TORCH_MINIMUM = (2, 2)
# vtkSlicerSegmentEditorLogic, which writes with the user's masking, is in Slicer 5.10 and later.
SLICER_MINIMUM = (5, 10)


def version_tuple(text: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "2.5.1+cu121"."""
    numbers = [int(part) for part in re.findall(r"\d+", text.split("+")[0])[:2]]
    return (numbers + [0, 0])[0], (numbers + [0, 0])[1]


def version_problem(python: Sequence[int], slicer_version: Sequence[int]) -> str | None:
    """What to upgrade when Python (major, minor) or Slicer (major, minor) is too old, else None."""
    python, slicer_version = tuple(python[:2]), tuple(slicer_version[:2])
    if python < PYTHON_MINIMUM:
        return ("SegVolGRU needs Python {}.{} or later and this Slicer has Python {}.{}: install Slicer {}.{} or "
                "later from download.slicer.org.").format(*PYTHON_MINIMUM, *python, *SLICER_MINIMUM)
    if slicer_version < SLICER_MINIMUM:
        return ("SegVolGRU needs Slicer {}.{} or later (this is {}.{}): install a newer Slicer from "
                "download.slicer.org.").format(*SLICER_MINIMUM, *slicer_version)
    return None


def missing_modules(requirements_path: str | os.PathLike) -> list[str]:
    """Distribution names in a requirements file whose module cannot be imported (import name = distribution
    name with '-' as '_', which holds for every package SegVolGRU asks for)."""
    with open(requirements_path, encoding="utf-8") as lines:
        names = [re.split(r"[<>=!~;\[ ]", line.strip())[0] for line in lines if line.strip()[:1] not in ("", "#")]
    return [name for name in names if importlib.util.find_spec(name.replace("-", "_")) is None]


def ensure_requirements(requirements_path: str | os.PathLike, *, problem: str | None, testing: bool,
                        install_torch: Callable[[str], bool],
                        torch_version: Callable[[], str], pip_ensure: Callable[[str, str], None] | None,
                        pip_install: Callable[[list[str]], None], confirm: Callable[[str], bool] | None) -> None:
    """Make torch and the packages of ``requirements_path`` importable, or raise InstallError saying what to do.

    Args:
        problem: ``version_problem``'s answer for this Slicer: when not None, nothing is installed and it is raised.
        testing: install nothing; anything missing is an InstallError naming it (Slicer's --testing).
        install_torch: ``install_torch(">=2.2")`` installs torch through PyTorch Utils; returns whether it did.
        torch_version: the installed torch's ``__version__`` (imports torch).
        pip_ensure: ``pip_ensure(requirements_path, constraints_path)`` (``slicer.packaging``, Slicer 5.12+), or
            None to use ``pip_install(["-r", requirements, "-c", constraints])`` after ``confirm``.
        confirm: asks the user before a plain pip install; None installs without asking.
    The one-line constraints file pinning torch is written to a new temporary folder.
    """
    if problem:
        raise InstallError(problem)
    minimum = ".".join(str(v) for v in TORCH_MINIMUM)
    if importlib.util.find_spec("torch") is None:
        if testing:
            raise InstallError("torch is missing and tests install nothing: install it with PyTorch Utils.")
        if not install_torch(f">={minimum}"):
            raise InstallError("torch was not installed. Install it from the PyTorch Utils module, then retry.")
    version = torch_version()
    if version_tuple(version) < TORCH_MINIMUM:
        raise InstallError(f"torch {version} is older than the {minimum} SegVolGRU needs: upgrade it in the "
                           "PyTorch Utils module (uninstall, then install), restart Slicer and retry.")
    missing = missing_modules(requirements_path)
    if testing and missing:
        raise InstallError(f"Python packages {', '.join(missing)} are missing and tests do not install packages: "
                           f"run slicer.util.pip_install('-r {requirements_path}') first.")
    if testing or (not missing and pip_ensure is None):
        return  # pip_ensure, when there is one, also checks the installed versions
    constraints = os.path.join(tempfile.mkdtemp(prefix="segvolgru-"), "torch-constraint.txt")
    try:
        with open(constraints, "w", encoding="utf-8") as pin:
            pin.write(f"torch=={version}\n")
        if pip_ensure is not None:
            pip_ensure(str(requirements_path), constraints)
        else:
            if confirm is not None and not confirm(f"SegVolGRU needs these Python packages: {', '.join(missing)}. "
                                                   "Install them now?"):
                raise InstallError("The required Python packages were not installed.")
            pip_install(["-r", str(requirements_path), "-c", constraints])
    except InstallError:
        raise
    except Exception as error:
        raise InstallError(f"Installing Python packages failed or was declined ({error}). Check the network, or run "
                           f"slicer.util.pip_install('-r {requirements_path}') in the Python console, then restart "
                           "Slicer.") from error
    still_missing = missing_modules(requirements_path)
    if still_missing:
        raise InstallError(f"Python packages {', '.join(still_missing)} are still missing after installing: restart "
                           "Slicer, or install them in the Python console with slicer.util.pip_install.")
