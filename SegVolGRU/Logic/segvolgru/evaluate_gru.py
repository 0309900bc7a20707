"""``segvolgru evaluate-gru``: whether the learned, stateful corrector earns its place, against its controls.

Protocol: per structure, the challenge's box and then 10 simulated clicks (challenge rule on the current mask).
Variants on the same sessions:
- ``gru``: the learned corrector with its hidden state carried from click to click;
- ``stateless``: the same weights, the hidden state reset before every click (is the memory used?);
- ``heuristic``: the same rows, spread, fusion and reach, with a constant push: +c at the error rows of a positive
  click, −c at those of a negative one, 0 at the uncertain rows (is the learning used?); c is chosen on validation
  phantoms (seeds 500000+) unless given;
- ``off``: the base's own update and the fusion, no correction.
Bases (what produces the logits the corrector corrects): ``segvol`` (the model; clicks reach it as point prompts),
and logits that do not react to clicks (:mod:`segvolgru.bases`): ``boundary`` and ``structural`` corruptions of
the ground truth, and ``threshold``, a family no corrector trains on.
Data: three held-out phantom sets (seeds never used in training), and lung2 / MNI152 when available.
Per variant and base: Dice per step, DSC-AUC over clicks 1–5 (trapezoid, at most 4) and 1–10 (at most 9), the
share of clicks that lower Dice, and regrowth: of the voxels a click changed, the share that is back two clicks
later. The last printed line is one JSON object.
"""
from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .bases import BASE_FAMILIES, base_logits
from .click_step import refine_step
from .clicks import box_dict_to_kji, challenge_box, simulate_click
from .metrics import dice
from .train import HELD_OUT_SEED_BASE

HELD_OUT_SETS = (1, 2, 3)
MIN_STRUCTURES = 20
QUICK_STRUCTURES = 10
CLICKS = 10
VALIDATION_SEED_BASE = 500_000
HEURISTIC_CHOICES = (2.0, 4.0, 8.0, 16.0)
VARIANTS = ("gru", "stateless", "heuristic", "off")
BASES = ("segvol",) + BASE_FAMILIES
_MARGIN = 24  # voxels around the box and the clicks: the largest error and fusion ball fits


class StatelessCorrector(torch.nn.Module):
    """The corrector with its hidden state reset before every click."""

    def __init__(self, corrector) -> None:
        super().__init__()
        self.inner, self.config = corrector, corrector.config

    def initial_state(self, device="cpu"):
        return self.inner.initial_state(device)

    def forward(self, rows, hidden):
        delta, _ = self.inner(rows, self.inner.initial_state(hidden.device))
        return delta, hidden


class ConstantPush(torch.nn.Module):
    """The heuristic control: +c at the error rows of a positive click, −c at a negative one's, 0 elsewhere."""

    def __init__(self, config, constant: float) -> None:
        super().__init__()
        self.config, self.constant = config, float(constant)

    def initial_state(self, device="cpu"):
        return torch.zeros(1, 1, device=device)

    def forward(self, rows, hidden):
        error_rows = (rows.features[:, 0] == 1) & rows.valid
        sign = 2 * rows.features[:, 4] - 1  # an error row's feature 4 holds its click's label
        return torch.where(error_rows, self.constant * sign, torch.zeros_like(sign)).to(hidden.device), hidden


def corrector_for(model, variant: str, constant: float):
    """The corrector a variant runs (None: no correction)."""
    if variant == "off" or model.correction is None:
        return None
    if variant == "gru":
        return model.correction
    if variant == "stateless":
        return StatelessCorrector(model.correction)
    if variant == "heuristic":
        return ConstantPush(model.correction.config, constant)
    raise ValueError(f"unknown variant {variant!r}; use one of {VARIANTS}")


@contextlib.contextmanager
def _model_with(model, corrector):
    """The model with another corrector for one session (restored afterwards)."""
    original = model.correction
    if corrector is not None:
        model.correction = corrector
    try:
        yield model
    finally:
        model.correction = original


def session_steps(model, volume, box, gt, settings: dict, cache, clicks: int = CLICKS, corrector=None):
    """A SegVol session: the box, then ``clicks`` clicks by the challenge rule on the current mask.

    Returns the masks after the box and each click, each click's seconds, and each click's kind (True positive,
    None when the mask was already perfect and no click was made). ``corrector`` replaces the model's for the
    session (the controls).
    """
    from .session import InteractiveSession

    with _model_with(model, corrector):
        session = InteractiveSession(model, volume, cache=cache, **settings)
        masks, seconds, kinds = [session.set_box(box).mask.astype(bool)], [], []
        for _ in range(clicks):
            click = simulate_click(masks[-1], gt)
            kinds.append(None if click is None else click.positive)
            if click is None:
                masks.append(masks[-1])
                continue
            started = time.perf_counter()
            masks.append(session.add_click((click.k, click.j, click.i), click.positive).mask.astype(bool))
            seconds.append(time.perf_counter() - started)
    return masks, seconds, kinds


def _region(box, clicks: list, shape) -> tuple[slice, slice, slice]:
    points = np.array([box[:3], box[3:]] + [c for c, _ in clicks])
    lo = np.maximum(points.min(axis=0) - _MARGIN, 0)
    hi = np.minimum(points.max(axis=0) + _MARGIN + 1, shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _fixed_base_steps(base: np.ndarray, image: np.ndarray, box, corrector, config, gt, clicks: int):
    """Masks after the box and each click when the base's logits do not react to clicks: ``refine_step`` on the
    region around the box and the clicks, the rest keeping the base."""
    logits = torch.from_numpy(base.copy())
    new_full = torch.from_numpy(base)
    masks, seconds, placed, hidden = [base > 0], [], [], None
    for _ in range(clicks):
        click = simulate_click(masks[-1], gt)
        if click is None:
            masks.append(masks[-1])
            continue
        started = time.perf_counter()
        placed.append(((click.k, click.j, click.i), 1.0 if click.positive else 0.0))
        sl = _region(box, placed, base.shape)
        start = np.array([s.start for s in sl])
        local = np.array([c for c, _ in placed]) - start
        with torch.inference_mode():
            step = refine_step(logits[sl], new_full[sl], local, np.array([lab for _, lab in placed]), config,
                               corrector=corrector, hidden=hidden, image=torch.from_numpy(image[sl]))
        logits[sl], hidden = step.logits, step.hidden
        seconds.append(time.perf_counter() - started)
        masks.append((logits > 0).numpy())
    return masks, seconds


def _normalised(volume: np.ndarray) -> np.ndarray:
    v = volume.astype(np.float32)
    lo, hi = np.percentile(v, (0.5, 99.5))
    return np.clip((v - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32)


def regrowth(masks: list[np.ndarray]) -> tuple[int, int]:
    """(voxels a click changed that are back to their earlier label two clicks later, voxels clicks changed)."""
    back = changed = 0
    for t in range(1, len(masks) - 2):
        flipped = masks[t - 1] != masks[t]
        changed += int(flipped.sum())
        back += int((flipped & (masks[t + 2] == masks[t - 1])).sum())
    return back, changed


def _structure_box(gt: np.ndarray, seed: int):
    return box_dict_to_kji(challenge_box(gt, np.random.default_rng(seed)))


def run_structure(model, volume, gt: np.ndarray, variant: str, base: str, cache, seed: int, *,
                  constant: float = 8.0, others=None, clicks: int = CLICKS, fixed: np.ndarray | None = None,
                  image: np.ndarray | None = None) -> dict:
    """One structure: Dice per step (box, then each click), the click seconds, regrowth counts. ``fixed`` and
    ``image``: the click-blind base's logits and the normalised volume when the caller has them already (every
    variant runs on the same ones)."""
    gt = np.asarray(gt, bool)
    box = _structure_box(gt, seed)
    corrector = corrector_for(model, variant, constant)
    if base == "segvol":
        masks, seconds, _ = session_steps(model, volume, box, gt, {"gru": corrector is not None}, cache, clicks,
                                          corrector)
    else:
        from .correction import CorrectionConfig

        config = model.correction.config if model.correction is not None else CorrectionConfig()
        if fixed is None:
            fixed = base_logits(base, gt, volume, box, np.random.default_rng(seed), others)
        image = _normalised(volume) if image is None else image
        masks, seconds = _fixed_base_steps(fixed, image, box, corrector, config, gt, clicks)
    back, changed = regrowth(masks)
    return {"dice": [dice(m, gt) for m in masks], "seconds": seconds, "regrown": back, "changed": changed}


def structures(cases) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray, tuple, int]]:
    """(case, volume, structure mask, other structures, spacing, index) for every labelled structure."""
    out = []
    for name, volume, labels, spacing in cases:
        for index, value in enumerate(int(v) for v in np.unique(labels) if v > 0):
            out.append((name, volume, labels == value, (labels > 0) & (labels != value), spacing, index))
    return out


def auc(curve: list[float], clicks: int) -> float:
    """Trapezoid area under Dice after clicks 1..``clicks`` (the box step, first in ``curve``, left out)."""
    values = curve[1:clicks + 1]
    return float(sum(values) - 0.5 * (values[0] + values[-1]))


def summarise(runs: list[dict]) -> dict:
    """``{dsc_auc_5, dsc_auc_10, lowering, regrowth, dice_per_click, click_s_p50, structures}`` of some runs."""
    curves = np.asarray([r["dice"] for r in runs])
    seconds = [s for r in runs for s in r["seconds"]]
    changed = sum(r["changed"] for r in runs)
    return {"dsc_auc_5": float(np.mean([auc(list(c), 5) for c in curves])),
            "dsc_auc_10": float(np.mean([auc(list(c), min(10, curves.shape[1] - 1)) for c in curves])),
            "lowering": float((np.diff(curves, axis=1) < -1e-9).mean()),
            "regrowth": sum(r["regrown"] for r in runs) / changed if changed else 0.0,
            "dice_per_click": [float(v) for v in curves.mean(axis=0)],
            "click_s_p50": float(statistics.median(seconds)) if seconds else 0.0,
            "structures": int(len(curves))}


def evaluate(model, cases, *, variants=VARIANTS, bases=BASES, constant: float = 8.0, cache=None,
             progress: bool = True, clicks: int = CLICKS) -> dict[str, dict[str, list[dict]]]:
    """Runs per variant and base: ``{variant: {base: [run, ...]}}`` over every structure of ``cases``."""
    from tqdm import tqdm

    from .cache import EmbeddingCache

    cache = cache or EmbeddingCache()
    runs = {v: {b: [] for b in bases} for v in variants}
    images: dict[int, np.ndarray] = {}  # the normalised volume, once per case
    for name, volume, gt, others, spacing, index in tqdm(structures(cases), desc="structures", file=sys.stderr,
                                                          disable=not progress):
        if id(volume) not in images:
            images[id(volume)] = _normalised(volume)
        image = images[id(volume)]
        box = _structure_box(gt, index)
        # every variant corrects the same base predictions, drawn once per structure
        fixed = {b: base_logits(b, gt, volume, box, np.random.default_rng(index), others) for b in bases
                 if b != "segvol"}
        for variant in variants:
            for base in bases:
                runs[variant][base].append(run_structure(model, volume, gt, variant, base, cache, index,
                                                         constant=constant, clicks=clicks, fixed=fixed.get(base),
                                                         image=image))
    return runs


def phantom_set(seed_base: int, shape, minimum: int) -> list[tuple[str, np.ndarray, np.ndarray, tuple]]:
    """Phantoms from ``seed_base`` on until they hold at least ``minimum`` structures."""
    from .phantoms import make_phantom

    cases, count, n = [], 0, 0
    while count < minimum:
        volume, labels, spacing = make_phantom(seed_base + n, shape=tuple(shape))
        cases.append((f"phantom-{seed_base + n}", volume, labels, spacing))
        count += int(labels.max())
        n += 1
    return cases


def choose_constant(model, progress: bool = False) -> float:
    """The heuristic's c with the best pooled 10-click AUC on validation phantoms (never the held-out sets)."""
    cases = phantom_set(VALIDATION_SEED_BASE, model.config.spatial_size, QUICK_STRUCTURES)
    scores = {}
    for c in HEURISTIC_CHOICES:
        runs = evaluate(model, cases, variants=("heuristic",), constant=c, progress=progress)["heuristic"]
        scores[c] = float(np.mean([summarise(r)["dsc_auc_10"] for r in runs.values()]))
    return max(scores, key=scores.get)


def lung2_case(data_dir: Path):
    image, label = data_dir / "lung2_image.nrrd", data_dir / "lung2_label.nrrd"
    if not (image.exists() and label.exists()):
        return None
    import SimpleITK as sitk

    img, lab = sitk.ReadImage(str(image)), sitk.ReadImage(str(label))
    return ("lung2", sitk.GetArrayFromImage(img), (sitk.GetArrayFromImage(lab) > 0).astype(np.int16),
            tuple(img.GetSpacing()[::-1]))


def mni_cases() -> list:
    """The MNI152 T1 template with its grey-matter, white-matter and brain masks, one case per mask (they overlap)."""
    try:
        from nilearn import datasets
    except ImportError:
        return []
    template = datasets.load_mni152_template(resolution=1)
    # nibabel arrays are (I, J, K): transpose to the engine's (K, J, I).
    volume = np.asarray(template.get_fdata(), np.float32).transpose(2, 1, 0)
    spacing = tuple(float(z) for z in template.header.get_zooms()[:3][::-1])
    cases = []
    for name, loader in (("mni152-gm", datasets.load_mni152_gm_mask), ("mni152-wm", datasets.load_mni152_wm_mask),
                         ("mni152-brain", datasets.load_mni152_brain_mask)):
        mask = np.asarray(loader(resolution=1).get_fdata()) > 0
        cases.append((name, volume, mask.transpose(2, 1, 0).astype(np.int16), spacing))
    return cases


def report(model, *, quick: bool = False, data_dir: Path | None = None, constant: float | None = None,
           progress: bool = True) -> dict:
    """The table: ``variants`` → name → ``{"pooled": {...}, "<base>": {...}}`` over the held-out phantom sets, the
    spread of each variant's pooled 10-click AUC across sets, and lung2 / MNI152 when available."""
    constant = choose_constant(model, progress) if constant is None else float(constant)
    shape = model.config.spatial_size
    sets = HELD_OUT_SETS[:1] if quick else HELD_OUT_SETS
    minimum = QUICK_STRUCTURES if quick else MIN_STRUCTURES
    per_set = [evaluate(model, phantom_set(HELD_OUT_SEED_BASE + 10_000 * s, shape, minimum), constant=constant,
                        progress=progress, clicks=CLICKS) for s in sets]
    out: dict = {"variants": {}, "heuristic_constant": constant, "sets": len(sets), "clicks": CLICKS}
    for variant in VARIANTS:
        table = {}
        for base in BASES:
            table[base] = summarise([r for runs in per_set for r in runs[variant][base]])
        table["pooled"] = summarise([r for runs in per_set for base in BASES for r in runs[variant][base]])
        set_aucs = [summarise([r for base in BASES for r in runs[variant][base]])["dsc_auc_10"] for runs in per_set]
        table["pooled"]["dsc_auc_10_spread"] = float(np.std(set_aucs))
        out["variants"][variant] = table
    real = ([lung2_case(data_dir)] if data_dir else []) + ([] if quick else mni_cases())
    real = [case for case in real if case is not None]
    if real:
        runs = evaluate(model, real, constant=constant, progress=progress, clicks=CLICKS)
        out["real"] = {v: {b: summarise(runs[v][b]) for b in BASES} for v in VARIANTS}
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .validation import add_correction_argument, correction_choice
    from .weights import pick_model

    parser = argparse.ArgumentParser(prog="segvolgru evaluate-gru", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None, help="model file (default: resolver, else the demo model)")
    parser.add_argument("--data", default=None, help="folder holding lung2_image.nrrd and lung2_label.nrrd")
    add_correction_argument(parser)
    parser.add_argument("--quick", action="store_true", help=f"one held-out set of at least {QUICK_STRUCTURES} "
                        "structures, no MNI152 (for checks)")
    parser.add_argument("--constant", type=float, default=None,
                        help="the heuristic's push c (default: chosen on validation phantoms)")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    loaded = pick_model(args.weights, correction=correction_choice(args.correction))
    result = report(loaded.model, quick=args.quick, data_dir=Path(args.data) if args.data else None,
                    constant=args.constant, progress=not args.quiet)
    result["weights"] = loaded.description
    if not args.json:
        for variant, table in result["variants"].items():
            for base, row in table.items():
                print(f"{variant:>9} {base:>10}: AUC5 {row['dsc_auc_5']:.3f} AUC10 {row['dsc_auc_10']:.3f} "
                      f"lowering {row['lowering']:.1%} regrowth {row['regrowth']:.1%} "
                      f"Dice {np.round(row['dice_per_click'], 3).tolist()}", file=sys.stderr)
    print(json.dumps(result))
    return 0
