"""The demo model the project ships: a reduced SegVol (no text tower) with its GRU correction, trained on
generated phantoms by ``segvolgru train`` (the exact command, seed and data recipe are in the file's ``recipe``).

It is a demonstration model, not for clinical use; the official SegVol weights replace it when present.
"""
from __future__ import annotations

from pathlib import Path

from .errors import WeightsError

DEMO_MODEL_FILE = Path(__file__).resolve().parent / "models" / "demo.pt"


def demo_model_path() -> Path:
    """Path of ``models/demo.pt`` (``{'config', 'model', 'recipe'}``, load it with ``load_model``).

    Raises WeightsError when the file is missing from the installation.
    """
    if not DEMO_MODEL_FILE.is_file():
        raise WeightsError(
            f"the demo model {DEMO_MODEL_FILE} is missing: reinstall segvolgru (the file ships with the package), "
            "train one with 'segvolgru train OUT' and copy OUT/model.pt there, or use the official SegVol weights "
            "('segvolgru download-weights')")
    return DEMO_MODEL_FILE
