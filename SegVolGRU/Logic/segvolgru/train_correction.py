"""``segvolgru train-correction``: train a click corrector on several bases, for any SegVol model.

Each step draws a training phantom and one of its structures, a base for it — the demo SegVol's own predictions
(its decoder re-run with every click) or a corruption of the ground truth (:mod:`segvolgru.bases`: a shifted
boundary, holes, a missing part, a false blob, a leak) — and simulates up to 10 clicks by the challenge rule on the
current mask. Every click runs :func:`segvolgru.click_step.refine_step`, the step sessions run, with gradients
into the corrector; the loss is Dice + BCE after every click, and the hidden state is carried across the clicks as
at inference. The threshold base is never used here, so ``evaluate-gru`` can measure a family unseen in training.

Outputs in OUT: ``correction.pt`` (the corrector file, loadable with ``--correction``), ``resume.pt`` (weights,
optimiser and step; loads without unpickling) and ``log.jsonl``. A run resumes from ``resume.pt``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .bases import TRAINING_FAMILIES, base_logits
from .click_step import refine_step
from .clicks import box_dict_to_kji, challenge_box, simulate_click
from .correction import ClickCorrector, CorrectionConfig
from .corrector_file import save_corrector
from .errors import InputError
from .files import check_output_folder, write_atomic, write_text_atomic
from .train import _decode, _read_state, dice_bce_loss, hard_dice, phantom_source
from .validation import positive_float, positive_int

BASES = ("segvol",) + TRAINING_FAMILIES
CLICKS = 10


@dataclass(frozen=True)
class CorrectorTraining:
    """What a run trains with (stored in the corrector file's recipe)."""

    steps: int = 2000
    seed: int = 1
    lr: float = 1e-3
    hidden_size: int = 64
    row_dim: int = 64
    patch_radius: int = 1
    clicks: int = CLICKS
    max_minutes: float = 55.0
    threads: int = 2


def _structure(sample, rng: np.random.Generator):
    present = [int(v) for v in np.unique(sample.labels) if v > 0]
    value = int(rng.choice(present))
    return sample.labels == value, (sample.labels > 0) & (sample.labels != value)


def session_loss(corrector, base_model, embedding, sample, rng: np.random.Generator, clicks: int):
    """Loss over the clicks of one structure, its base, and the hard Dice before and after the clicks."""
    gt, others = _structure(sample, rng)
    box = box_dict_to_kji(challenge_box(gt, rng))
    base = BASES[int(rng.integers(len(BASES)))]
    target = torch.from_numpy(gt.astype(np.float32))
    image = torch.from_numpy(sample.image)
    with torch.no_grad():
        fixed = None if base == "segvol" else torch.from_numpy(base_logits(base, gt, sample.image, box, rng, others))
        previous = _decode(base_model, embedding, box, []) if fixed is None else fixed
    start, hidden, placed, loss, steps = hard_dice(previous, gt), None, [], torch.zeros(()), 0
    for _ in range(clicks):
        click = simulate_click(previous.numpy() > 0, gt, seed=int(rng.integers(2 ** 31)))
        if click is None:
            break
        placed.append(click)
        with torch.no_grad():
            new = _decode(base_model, embedding, box, placed) if fixed is None else fixed
        points = np.array([[c.k, c.j, c.i] for c in placed], np.int64)
        labels = np.array([int(c.positive) for c in placed], np.int64)
        step = refine_step(previous, new, points, labels, corrector.config, corrector=corrector, hidden=hidden,
                           image=image)
        loss, hidden, steps = loss + dice_bce_loss(step.logits, target), step.hidden, steps + 1
        previous = step.logits.detach()
    return (loss / steps if steps else None), base, start, hard_dice(previous, gt)


def train_corrector(out_dir: str | Path, base_model, settings: CorrectorTraining = CorrectorTraining(),
                    progress: bool = True) -> Path:
    """Train (or resume) a corrector in ``out_dir``; returns the path of ``correction.pt``."""
    out = Path(out_dir)
    check_output_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(settings.threads)
    # the inference settings (rows, spread, fusion, reach) are the product's defaults, as sessions run them
    config = CorrectionConfig(hidden_size=settings.hidden_size, row_dim=settings.row_dim,
                              patch_radius=settings.patch_radius)
    torch.manual_seed(settings.seed)
    corrector = ClickCorrector(config)
    optimizer = torch.optim.Adam(corrector.parameters(), lr=settings.lr)
    resume, step, log = out / "resume.pt", 0, []
    if resume.exists():
        state = _read_state(resume, ("model", "optimizer", "step", "log", "settings"))
        if state["settings"] != asdict(settings):
            raise InputError(f"{resume} was written with other settings ({state['settings']}): resume with those, "
                             "or train in another folder")
        corrector.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step, log = int(state["step"]), list(state["log"])
    sample_for = phantom_source(settings.seed, base_model.config.spatial_size)
    started = time.monotonic()
    base_model.eval()
    while step < settings.steps and (time.monotonic() - started) / 60 < settings.max_minutes:
        rng = np.random.default_rng([settings.seed, step, 11])
        sample = sample_for(step)
        with torch.no_grad():
            embedding = base_model.encode(torch.from_numpy(sample.image)[None, None])
        loss, base, before, after = session_loss(corrector, base_model, embedding, sample, rng, settings.clicks)
        if loss is not None and loss.requires_grad:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(corrector.parameters(), 1.0)
            optimizer.step()
        log.append({"step": step, "base": base, "loss": None if loss is None else float(loss.detach()),
                    "dice_before": before, "dice_after": after})
        step += 1
        if step % 50 == 0 or step == settings.steps:
            _save(out, corrector, optimizer, step, log, settings)
            if progress:
                recent = [r["dice_after"] - r["dice_before"] for r in log[-50:]]
                print(f"step {step}: Dice gain over the last 50 sessions {np.mean(recent):+.3f}", file=sys.stderr)
    _save(out, corrector, optimizer, step, log, settings)
    return out / "correction.pt"


def _save(out: Path, corrector, optimizer, step: int, log: list[dict], settings: CorrectorTraining) -> None:
    state = {"model": corrector.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "log": log,
             "settings": asdict(settings)}
    write_atomic(out / "resume.pt", lambda temporary: torch.save(state, temporary))
    write_text_atomic(out / "log.jsonl", "".join(json.dumps(r) + "\n" for r in log))
    recipe = {"command": "segvolgru train-correction", "settings": asdict(settings), "steps_done": step,
              "trained_on": f"bases {list(BASES)} on generated phantoms (seed {settings.seed}); the threshold base "
                            "and the held-out seeds were never used", "torch": str(torch.__version__)}
    save_corrector(corrector, out / "correction.pt", recipe)


def main(argv: list[str] | None = None) -> int:
    from .weights import pick_model

    parser = argparse.ArgumentParser(prog="segvolgru train-correction", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output folder (correction.pt, resume.pt, log.jsonl); an existing run resumes")
    defaults = CorrectorTraining()
    for name, value in asdict(defaults).items():
        kind = positive_float if isinstance(value, float) else positive_int
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    parser.add_argument("--weights", default=None, help="the SegVol base (default: resolver, else the demo model)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    settings = CorrectorTraining(**{name: getattr(args, name) for name in asdict(defaults)})
    loaded = pick_model(args.weights, correction=None)
    path = train_corrector(args.out, loaded.model, settings, progress=not args.quiet)
    print(json.dumps({"correction": str(path), "base": loaded.description}))
    return 0
