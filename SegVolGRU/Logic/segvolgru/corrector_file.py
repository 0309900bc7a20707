"""The click corrector as a file of its own, attachable to any SegVol model.

The corrector reads probabilities, coordinates and clicks (and optionally the image), never SegVol's internals, so
one trained corrector serves every SegVol checkpoint. ``models/correction.pt`` ships with the package:
``{'config': CorrectionConfig fields, 'model': the corrector's state dict, 'recipe': what it was trained on}``.

One rule decides which corrector a model gets (``correction="default"``), wherever a model is loaded (API,
command line, panel): a checkpoint that carries its own corrector keeps it; one without (the official SegVol
weights) gets the shipped ``correction.pt``. ``None`` runs without a corrector; a path attaches that file's.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .correction import ClickCorrector, CorrectionConfig
from .errors import InputError, WeightsError
from .files import readable, write_atomic

SHIPPED_CORRECTION_FILE = Path(__file__).resolve().parent / "models" / "correction.pt"


def shipped_correction_path() -> Path:
    """``models/correction.pt``; WeightsError when the installation lacks it."""
    if not SHIPPED_CORRECTION_FILE.is_file():
        raise WeightsError(f"the shipped corrector {SHIPPED_CORRECTION_FILE} is missing: reinstall segvolgru, or load "
                           "the model with correction=None to run without the GRU correction")
    return SHIPPED_CORRECTION_FILE


def read_corrector(path: str | os.PathLike) -> tuple[ClickCorrector, dict[str, Any]]:
    """The corrector of a correction file and its recipe. Nothing is unpickled (``weights_only``); a file of the
    wrong layout, shape or with non-finite values is a WeightsError saying so."""
    path = readable(path, "corrector file", error=WeightsError,
                    hint="give a file written by 'segvolgru train-correction' (or the shipped correction.pt)")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a file that is not a checkpoint
        raise WeightsError(f"{path} is not a readable corrector file ({type(error).__name__}: {error})") from None
    if not isinstance(data, dict) or not {"config", "model"} <= set(data) or not isinstance(data["model"], dict) \
            or not isinstance(data["config"], dict) or not isinstance(data.get("recipe") or {}, dict) \
            or not all(isinstance(v, torch.Tensor) for v in data["model"].values()):
        raise WeightsError(f"{path} is not a corrector file: expected {{'config': {{...}}, 'model': {{name: tensor}}, "
                           "'recipe': {...}}")
    try:
        corrector = ClickCorrector(CorrectionConfig.from_dict(dict(data["config"])))
        state = {k: v.float() for k, v in data["model"].items()}
        if not all(bool(torch.isfinite(v).all()) for v in state.values()):
            raise WeightsError(f"{path} holds NaN or infinite values: the file is corrupted")
        corrector.load_state_dict(state, strict=True)
    except WeightsError:
        raise
    except (TypeError, ValueError, RuntimeError) as error:
        raise WeightsError(f"{path} does not fit the corrector its configuration describes ({error})") from None
    return corrector.eval(), dict(data.get("recipe") or {})


def save_corrector(corrector: ClickCorrector, path: str | os.PathLike, recipe: dict[str, Any] | None = None) -> None:
    """Write ``{'config', 'model', 'recipe'}`` atomically (fp16 floats: the file ships with the package)."""
    state = {k: v.detach().half() if v.is_floating_point() else v for k, v in corrector.state_dict().items()}
    data = {"config": corrector.config.to_dict(), "model": state, "recipe": dict(recipe or {})}
    write_atomic(path, lambda temporary: torch.save(data, temporary))


def attach_corrector(model, correction: str | os.PathLike | None = "default") -> None:
    """Give ``model`` its corrector by the one rule (see the module docstring) and name it in
    ``model.corrector_source``: "own (<checkpoint format>)", the file it came from, or "none"."""
    if correction is None:
        model.correction, model.corrector_source = None, "none"
        return
    if isinstance(correction, str) and correction == "default":
        if model.correction is not None:
            model.corrector_source = f"own ({model.checkpoint_format or 'checkpoint'})"
            return
        correction = shipped_correction_path()
    elif not isinstance(correction, (str, os.PathLike)):
        raise InputError(f"correction must be 'default', a corrector file or None, got {correction!r}")
    corrector, _ = read_corrector(correction)
    device = next(model.parameters()).device
    model.correction = corrector.to(device)
    model.corrector_source = str(correction)
