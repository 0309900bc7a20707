"""``segvolgru evaluate-gru``: what the GRU correction adds, measured with box + 5 simulated clicks per structure.

Data: three held-out phantom sets (seeds never used in training, >= 20 structures each), and, when available, the
pyradiomics ``lung2`` CT with its tumour label (BSD-3 repository; the data's clinical origin is not stated) and the
nilearn MNI152 masks (grey matter, white matter, brain; each its own case since they overlap). Variants: GRU
on/off, spread vs sparse write-back, fusion on/off, the fusion keeping accepted (confident) values beyond its
radius, a negative (or positive) click's fusion ball at the fixed radius instead of its depth-following reach, and
the LIM-Net fusion alone with an image-blind spread (the design before the defaults). Each structure runs in its
own interactive session; clicks follow the challenge rule on the current prediction. The last printed line is one
JSON object.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from .clicks import box_dict_to_kji, challenge_box, simulate_click
from .metrics import challenge_auc, dice
from .train import HELD_OUT_SEED_BASE

HELD_OUT_SETS = (1, 2, 3)
MIN_STRUCTURES = 20
CLICKS = 5
VARIANTS = {
    "gru_on": {"gru": True},
    "gru_off": {"gru": False},
    "sparse": {"gru": True, "write_back": "sparse"},
    "no_fusion": {"gru": True, "fusion": False},
    # beyond the fusion radius, a confident new value replaces only an unsure previous one
    "keep_accepted": {"gru": True, "fusion_keep_accepted": True},
    # a negative click's fusion ball at the fixed fusion radius, with confident new values beyond it (the design
    # before the reach followed the click's depth)
    "fixed_negative_radius": {"gru": True, "negative_reach": None},
    # the same for positive clicks
    "fixed_positive_radius": {"gru": True, "positive_reach": None},
    # the design before the polarity-consistent fusion and the intensity-aware spread became the defaults
    "lim_net_fusion_only": {"gru": True, "polarity_fusion": False, "spread_intensity_sigma": None,
                            "negative_reach": None, "positive_reach": None},
}


def phantom_set(index: int, shape) -> list[tuple[str, np.ndarray, np.ndarray, tuple]]:
    """Held-out phantoms of set ``index`` until it holds at least MIN_STRUCTURES structures."""
    from .phantoms import make_phantom

    cases, structures, n = [], 0, 0
    while structures < MIN_STRUCTURES:
        seed = HELD_OUT_SEED_BASE + 10_000 * index + n
        volume, labels, spacing = make_phantom(seed, shape=tuple(shape))
        cases.append((f"phantom{index}-{seed}", volume, labels, spacing))
        structures += int(labels.max())
        n += 1
    return cases


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


def run_structure(model, volume, gt: np.ndarray, settings: dict, cache,
                  seed: int) -> tuple[list[float], list[float], list[bool | None]]:
    """Dice after the box and each click, the seconds of each click, and each step's click kind (True for a positive
    click, None when the mask was already perfect and no click was made)."""
    from .session import InteractiveSession

    session = InteractiveSession(model, volume, cache=cache, **settings)
    box = challenge_box(gt, np.random.default_rng(seed))
    mask = session.set_box(box_dict_to_kji(box)).mask
    dices, seconds, kinds = [dice(mask, gt)], [], []
    for _ in range(CLICKS):
        click = simulate_click(mask.astype(bool), gt)
        kinds.append(None if click is None else click.positive)
        if click is None:
            dices.append(dices[-1])
            continue
        started = time.perf_counter()
        mask = session.add_click((click.k, click.j, click.i), click.positive).mask
        seconds.append(time.perf_counter() - started)
        dices.append(dice(mask, gt))
    return dices, seconds, kinds


def evaluate_cases(model, cases, variants=VARIANTS, progress: bool = True) -> dict:
    from tqdm import tqdm

    from .cache import EmbeddingCache

    cache = EmbeddingCache()
    curves = {name: [] for name in variants}
    seconds = {name: [] for name in variants}
    work = [(name, vol, lab == c, k) for name, vol, lab, _ in cases for k, c in
            enumerate(int(v) for v in np.unique(lab) if v > 0)]
    for case_name, volume, gt, k in tqdm(work, desc="structures", disable=not progress, file=sys.stderr):
        for variant, settings in variants.items():
            d, s, _ = run_structure(model, volume, gt, settings, cache, seed=k)
            curves[variant].append(d)
            seconds[variant].extend(s)
    return {"curves": curves, "seconds": seconds, "structures": len(work)}


def summarise(result: dict) -> dict:
    out: dict = {"cases": result["structures"]}
    for variant, curves in result["curves"].items():
        arr = np.asarray(curves)
        out[f"dice_{variant}"] = [float(v) for v in arr.mean(axis=0)] if len(arr) else []
        out[f"dice_auc_{variant}"] = float(np.mean([challenge_auc(c) for c in curves])) if curves else 0.0
        # Click t lowers Dice when the Dice after it is below the Dice before it (the box for click 1).
        lowered = float((np.diff(arr, axis=1) < -1e-9).mean()) if len(arr) else 0.0
        out[f"frac_clicks_lower_dice_{variant}"] = lowered
        out[f"click_s_p50_{variant}"] = float(statistics.median(result["seconds"][variant])) \
            if result["seconds"][variant] else 0.0
    out["frac_clicks_lower_dice"] = out.get("frac_clicks_lower_dice_gru_on", 0.0)
    out["click_s_p50"] = out.get("click_s_p50_gru_on", 0.0)
    return out


def run(model, data_dir: Path | None = None, progress: bool = True) -> dict:
    shape = model.config.spatial_size
    report: dict = {"sets": {}}
    set_curves = {name: [] for name in VARIANTS}
    total = 0
    for index in HELD_OUT_SETS:
        result = summarise(evaluate_cases(model, phantom_set(index, shape), progress=progress))
        report["sets"][f"phantoms{index}"] = result
        total += result["cases"]
        for name in VARIANTS:
            set_curves[name].append(result[f"dice_{name}"])
    for name in VARIANTS:
        arr = np.asarray(set_curves[name])
        report[f"dice_{name}"] = [float(v) for v in arr.mean(axis=0)]
        report[f"dice_{name}_spread"] = [float(v) for v in arr.std(axis=0)]
        report[f"dice_auc_{name}"] = float(np.mean([report["sets"][s][f"dice_auc_{name}"] for s in report["sets"]]))
    report["frac_clicks_lower_dice"] = float(np.mean([s["frac_clicks_lower_dice"] for s in report["sets"].values()]))
    report["click_s_p50"] = float(np.median([s["click_s_p50"] for s in report["sets"].values()]))
    report["cases"] = total
    lung = lung2_case(data_dir) if data_dir else None
    brain = mni_cases()
    if lung is not None:
        report["lung2"] = summarise(evaluate_cases(model, [lung], progress=progress))
    if brain:
        report["mni152"] = summarise(evaluate_cases(model, brain, progress=progress))
    report["unavailable"] = [name for name, found in (("lung2", lung is not None), ("mni152", bool(brain)))
                             if not found]
    return report


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .demo import pick_model

    parser = argparse.ArgumentParser(prog="segvolgru evaluate-gru", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None, help="model file (default: resolver, else the demo model)")
    parser.add_argument("--data", default=None, help="folder holding lung2_image.nrrd and lung2_label.nrrd")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    loaded = pick_model(args.weights)
    report = run(loaded.model, Path(args.data) if args.data else None, progress=not args.quiet)
    report["weights"] = loaded.description
    if not args.quiet:
        for name in VARIANTS:
            print(f"{name:>10}: Dice per step {np.round(report[f'dice_{name}'], 3).tolist()} "
                  f"(spread {np.round(report[f'dice_{name}_spread'], 3).tolist()}), "
                  f"AUC {report[f'dice_auc_{name}']:.3f}", file=sys.stderr)
    print(json.dumps(report))
    return 0
