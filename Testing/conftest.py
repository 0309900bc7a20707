"""Shared pytest fixtures for the SegVolGRU test suites."""
from __future__ import annotations

import pytest


@pytest.fixture
def mrml():
    """A fresh headless MRML scene with Slicer's module logics (``HeadlessSlicer``), cleared afterwards.

    Skips the test when ``slicer-core`` is not installed (``import slicer`` fails or is another package).
    """
    slicer = pytest.importorskip("slicer", reason="real MRML needs the slicer-core wheel (pip install slicer-core)")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed 'slicer' package is not slicer-core (it has no vtkMRMLScene)")
    from segvolgru.slicer_bridge import HeadlessSlicer

    app = HeadlessSlicer()
    yield app
    app.close()
