"""The correction and fusion of one click, as a function of explicit state.

After a click the base model gives new logits for the region that holds it (SegVol re-decodes its windows with the
click; another base gives what it gives). ``refine_step`` turns them into the region's logits after the click: the
corrector's rows are read from the new probabilities, its deltas are written back around the click, and the fusion
keeps what the click may not change. Its state — the logits before the click and the corrector's hidden state — comes
in through arguments and goes out as the result, as with segment-anything's predictor, so that interactive sessions,
evaluation on any base and training all run the same step.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .correction import CorrectionConfig, apply_deltas, build_rows, click_radius, fuse


@dataclass
class StepResult:
    """Region logits after the click (float32, the region's (K, J, I)) and the corrector's hidden state (1, H),
    None when no corrector ran."""

    logits: torch.Tensor
    hidden: torch.Tensor | None


def refine_step(previous: torch.Tensor, new: torch.Tensor, clicks: np.ndarray, labels: np.ndarray,
                config: CorrectionConfig, *, corrector=None, hidden: torch.Tensor | None = None,
                image: torch.Tensor | None = None, radius: float | None = None) -> StepResult:
    """One click on a region.

    Args:
        previous: logits before the click (K, J, I).
        new: the base's logits after the click, same shape.
        clicks: (n, 3) voxel coordinates of the region, newest last (the corrector's error rows look around them).
        labels: (n,) 1 for positive clicks, 0 for negative ones.
        config: the correction's settings (rows, write-back, fusion).
        corrector: a module ``(rows, hidden) -> (delta (2K,), hidden)`` with ``initial_state()``, or None for the
            fusion only.
        hidden: the corrector's state before this click; None starts from ``corrector.initial_state()``.
        image: the region's normalised intensities (K, J, I), for the intensity-aware spread.
        radius: the fusion ball's radius when the caller measured it on earlier logits of the same click;
            by default it is measured on ``previous``.
    Returns the logits after the click and the corrector's new state. Differentiable in ``new`` and the
    corrector's weights, so training runs this very step.
    """
    click, positive = clicks[-1], bool(labels[-1])
    if config.fusion and radius is None:
        radius = click_radius(previous, click, config, positive)
    out = new
    if corrector is not None:
        cube_image = image.cpu().numpy() if config.patch_radius and image is not None else None
        rows = build_rows(torch.sigmoid(new.detach()).cpu().numpy(), clicks, labels, config, cube_image)
        state = corrector.initial_state(new.device) if hidden is None else hidden
        delta, hidden = corrector(rows, state)
        out = apply_deltas(new, rows, delta, click, config, image)
    if config.fusion:
        out = fuse(previous, out, (0, 0, 0), click, config, positive, radius)
    return StepResult(out, hidden)
