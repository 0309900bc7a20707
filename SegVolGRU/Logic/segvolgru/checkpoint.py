"""Reading and writing SegVol checkpoints: the official formats and the project's own.

Formats recognised (all load strictly for the SegVol keys):
- official ``SegVol_v1.pth``: ``{'model': {'module.' + key: tensor}, 'epoch': ...}`` (DataParallel prefix);
- Hugging Face ``BAAI/SegVol``: a plain state dict with the ``model.`` prefix (``pytorch_model.bin`` or
  ``model.safetensors``, or the directory holding one);
- SegFM / GRU fine-tunes: ``{'model_state_dict': {'model.' + key: tensor}, ...}``;
- the project's files: ``{'config': {...}, 'model': {key: tensor}, 'recipe': {...}}`` (no prefix).
Keys under ``correction.`` belong to the project's click-correction module; the published GRU's ``gru_blocks.*``
are a different design and are skipped with a warning.
"""
from __future__ import annotations

import logging
import os
import pickle
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import OFFICIAL_CONFIG, SegVolConfig
from .corrector_file import attach_corrector
from .errors import InputError, WeightsError
from .files import readable, write_atomic
from .network import SegVol, build_model

log = logging.getLogger(__name__)

CORRECTION_PREFIX = "correction."
PUBLISHED_GRU_PREFIX = "gru_blocks."
TEXT_PREFIX = "text_encoder."
_WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors")
# Buffers that newer library versions stopped saving; the loader fills them from their defining rule.
_OPTIONAL_BUFFERS = ("text_encoder.clip_text_model.text_model.embeddings.position_ids",)


class CheckpointError(WeightsError):
    """A checkpoint file that cannot be read, or whose keys or shapes do not fit the model."""


@dataclass
class Checkpoint:
    """A checkpoint normalised to un-prefixed SegVol keys."""

    format: str
    state: dict[str, torch.Tensor]
    config: SegVolConfig | None = None
    recipe: dict[str, Any] = field(default_factory=dict)


def _weights_file(path: Path) -> Path:
    hint = "give the path of SegVol_v1.pth, of the BAAI/SegVol pytorch_model.bin, or run 'segvolgru download-weights'"
    readable(path, "checkpoint", folder=True, error=CheckpointError, hint=hint)
    if path.is_dir():
        for name in _WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        candidates = sorted(path.glob("*.pth")) + sorted(path.glob("*.pt"))
        if len(candidates) == 1:
            return candidates[0]
        raise CheckpointError(
            f"{path} is a folder without a SegVol weights file: expected one of {', '.join(_WEIGHT_FILES)} or a "
            "single .pth file in it")
    return path


def _read_file(path: Path) -> Any:
    errors: tuple[type[BaseException], ...] = (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile,
                                               OSError, ValueError)
    try:
        if path.suffix == ".safetensors":
            from safetensors import SafetensorError
            from safetensors.torch import load_file

            errors += (SafetensorError,)
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except errors as exc:
        size = path.stat().st_size if path.exists() else 0
        raise CheckpointError(
            f"cannot read checkpoint {path} ({size:,} bytes): the file is truncated, corrupted or not a PyTorch / "
            f"safetensors checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
            "Download it again ('segvolgru download-weights') or check the path") from None


def _strip(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def parse_checkpoint(raw: Any) -> Checkpoint:
    """Recognise the container format and strip its key prefix."""
    if isinstance(raw, dict) and "config" in raw and _is_tensor_dict(raw.get("model")):
        config = _stored_config(raw["config"])
        recipe = raw.get("recipe") or {}
        if not isinstance(recipe, dict):
            raise CheckpointError(f"the checkpoint's recipe is a {type(recipe).__name__}, not a dict: the file was "
                                  "altered; export the model again")
        return Checkpoint("segvolgru", dict(raw["model"]), config, dict(recipe))
    if isinstance(raw, dict) and _is_tensor_dict(raw.get("model")):
        return Checkpoint("official-pth", _strip(raw["model"], "module."))
    if isinstance(raw, dict) and _is_tensor_dict(raw.get("model_state_dict")):
        return Checkpoint("fine-tune", _strip(raw["model_state_dict"], "model."))
    if _is_tensor_dict(raw):
        prefix = "model." if all(k.startswith("model.") for k in raw) else ""
        return Checkpoint("huggingface" if prefix else "state-dict", _strip(raw, prefix))
    kind = type(raw).__name__
    keys = ", ".join(sorted(map(str, raw))[:8]) if isinstance(raw, dict) else ""
    raise CheckpointError(
        f"unrecognised checkpoint container ({kind}{': keys ' + keys if keys else ''}); expected the official "
        "{'model': state_dict} .pth, a Hugging Face state dict with 'model.' keys, {'model_state_dict': ...} "
        "or a segvolgru file {'config': ..., 'model': ...}")


def _stored_config(data: Any) -> SegVolConfig | None:
    if data is None:
        return None
    try:
        if not isinstance(data, dict):
            raise TypeError(f"a {type(data).__name__}, not a dict")
        return SegVolConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"the checkpoint's configuration is invalid ({exc}): the file was altered or written "
                              "by another program; export or download it again") from None


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and normalise a checkpoint file (or a Hugging Face snapshot folder)."""
    return parse_checkpoint(_read_file(_weights_file(Path(path))))


def _describe(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}{f', … ({len(keys) - limit} more)' if len(keys) > limit else ''}"


def apply_state(model: SegVol, ckpt: Checkpoint, source: str = "checkpoint") -> None:
    """Load the SegVol keys strictly; keep ``correction.*`` on the model; skip the published GRU blocks."""
    state = dict(ckpt.state)
    skipped = sorted(k for k in state if k.startswith(PUBLISHED_GRU_PREFIX))
    if skipped:
        warnings.warn(
            f"{source}: skipping {len(skipped)} keys under '{PUBLISHED_GRU_PREFIX}' (the published 5-block GRU with "
            "hidden size 2000 is not this project's correction module); the SegVol weights are used", stacklevel=3)
        for k in skipped:
            del state[k]
    correction = {}
    if model.correction is None:
        # Kept aside for a model built later with a correction module; strict below for a model that has one.
        correction = {k[len(CORRECTION_PREFIX):]: state.pop(k) for k in list(state) if k.startswith(CORRECTION_PREFIX)}
    if not model.has_text:
        # A text-free configuration may take the official weights and leave the 250 MB CLIP tower behind.
        for k in [k for k in state if k.startswith(TEXT_PREFIX)]:
            del state[k]
    expected = model.state_dict()
    for k in _OPTIONAL_BUFFERS:
        if k in expected and k not in state:
            state[k] = expected[k].clone()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        matched = len(set(expected) & set(state))
        lines = [f"{source} ({ckpt.format} format) does not fit this SegVol model "
                 f"(spatial size {model.config.spatial_size}, hidden size {model.config.hidden_size}, "
                 f"{'with' if model.has_text else 'without'} text tower): {matched} of {len(expected)} keys match."]
        if matched < len(expected) // 4:
            lines.append("It does not look like a SegVol checkpoint at all.")
        if missing:
            lines.append(f"Missing keys ({len(missing)}): {_describe(missing)}")
        if unexpected:
            lines.append(f"Unexpected keys ({len(unexpected)}): {_describe(unexpected)}")
        if wrong:
            lines.append("Wrong shapes: " + _describe(
                [f"{k} {tuple(state[k].shape)} != {tuple(expected[k].shape)}" for k in wrong], 6))
        lines.append("Expected the official SegVol layout (keys image_encoder.*, mask_decoder.*, prompt_encoder.*, "
                     "text_encoder.*); give the matching configuration for a project checkpoint.")
        raise CheckpointError("\n".join(lines))
    truncated = sorted(k for k, v in state.items() if expected[k].is_floating_point() and not v.is_floating_point())
    if truncated:
        raise CheckpointError(f"{source} stores {len(truncated)} weight tensors as integers "
                              f"({_describe(truncated, 4)}): their fractions are lost; the file was altered, use the "
                              "original checkpoint")
    state = {k: v.to(expected[k].dtype) for k, v in state.items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{source} holds NaN or infinite values in {len(bad)} tensors ({_describe(bad, 4)}): "
                              "the weights are corrupted or the training diverged; use another checkpoint")
    model.load_state_dict(state, strict=True)
    model.correction_state = correction


def load_model(path: str | os.PathLike, config: SegVolConfig | None = None, device: str = "cpu",
               correction: str | os.PathLike | None = "default") -> SegVol:
    """Load a SegVol checkpoint into a model in eval mode on ``device`` (default CPU).

    With ``config=None`` a project file's own configuration is used, otherwise the official one. ``device``:
    "cpu", "cuda", "cuda:N" or "auto". ``correction``: "default" keeps a checkpoint's own click corrector and
    gives one without (the official weights) the shipped ``models/correction.pt``; a path attaches that corrector
    file; None runs without (see :mod:`segvolgru.corrector_file`; ``model.corrector_source`` says which).
    Raises InputError for a bad ``config`` or ``device`` and WeightsError (CheckpointError) for a file that cannot
    be read, does not fit the model or holds NaN or infinite values.
    """
    from .device import resolve_device

    if config is not None and not isinstance(config, SegVolConfig):
        raise InputError(f"config must be a SegVolConfig (e.g. segvolgru.config.OFFICIAL_CONFIG) or None for the "
                         f"file's own, got {config!r}")
    target = resolve_device(device)
    ckpt = read_checkpoint(path)
    try:
        model = build_model(config or ckpt.config or OFFICIAL_CONFIG)
    except (TypeError, ValueError, RuntimeError) as exc:
        if config is not None or ckpt.config is None:
            raise
        raise CheckpointError(f"the configuration stored in {path} cannot build a model ({exc}): the file was "
                              "altered or written by another program; export or download it again") from None
    apply_state(model, ckpt, source=str(path))
    model.recipe = ckpt.recipe
    model.checkpoint_format = ckpt.format
    model = model.to(target)
    attach_corrector(model, correction)
    log.info("loaded %s checkpoint %s (corrector: %s)", ckpt.format, path, model.corrector_source)
    return model.eval()


def save_checkpoint(model: SegVol, path: str | os.PathLike, recipe: dict[str, Any] | None = None,
                    half: bool = False) -> None:
    """Write the project's format: ``{'config', 'model', 'recipe'}``; ``half`` stores floats as fp16. The file is
    written atomically (a failed write keeps the previous file)."""
    state = model.state_dict()
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    data = {"config": model.config.to_dict(), "model": state, "recipe": recipe or {}}
    write_atomic(path, lambda temporary: torch.save(data, temporary))
