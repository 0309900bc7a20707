"""Click-by-click validation of session settings on validation phantoms (seeds 500000+, never the held-out sets).

The sweeps behind the defaults of `negative_reach`, `positive_reach` and `spread_intensity_sigma` ran this: box +
5 simulated clicks (challenge rule, as `segvolgru evaluate-gru` runs them) on every structure of the first N
validation phantoms, with the given InteractiveSession settings. Prints the mean Dice per step and the DSC-AUC, the share of clicks that lower Dice,
and the same split by click kind; the last line is one JSON object.

    .venv/bin/python scripts/validate_clicks.py [--settings '{"negative_reach": null}'] [--phantoms 14]
        [--weights models/demo.pt]
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from segvolgru import demo_model_path, load_model
from segvolgru.cache import EmbeddingCache
from segvolgru.clicks import box_dict_to_kji, challenge_box
from segvolgru.evaluate_gru import VALIDATION_SEED_BASE, session_steps
from segvolgru.metrics import challenge_auc, dice
from segvolgru.phantoms import make_phantom



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default="{}", help="session settings as JSON (null for None)")
    parser.add_argument("--phantoms", type=int, default=14, help="validation phantoms (seeds 500000, 500001, ...)")
    parser.add_argument("--weights", default=None, help="model file (default: the shipped demo model)")
    args = parser.parse_args()
    settings = json.loads(args.settings)
    model = load_model(args.weights or demo_model_path())
    cache = EmbeddingCache()
    curves, steps = [], []
    for n in range(args.phantoms):
        volume, labels, _ = make_phantom(VALIDATION_SEED_BASE + n, shape=model.config.spatial_size)
        for index, value in enumerate(v for v in np.unique(labels) if v > 0):
            gt = labels == value
            box = box_dict_to_kji(challenge_box(gt, np.random.default_rng(index)))
            masks, _, kinds = session_steps(model, volume, box, gt, settings, cache, clicks=5)
            curve = [dice(mask, gt) for mask in masks]
            curves.append(curve)
            steps += [(kind, curve[t + 1] - curve[t]) for t, kind in enumerate(kinds) if kind is not None]
    report = {"settings": settings, "structures": len(curves),
              "dice": [round(float(v), 4) for v in np.mean(curves, axis=0)],
              "dice_auc": round(float(np.mean([challenge_auc(c) for c in curves])), 4),
              "frac_clicks_lower_dice": round(float(np.mean([d < -1e-9 for _, d in steps])), 4)}
    for kind, positive in (("positive", True), ("negative", False)):
        deltas = [d for p, d in steps if p == positive]
        report[f"{kind}_clicks"] = len(deltas)
        report[f"{kind}_frac_lower"] = round(float(np.mean([d < -1e-9 for d in deltas])), 4) if deltas else 0.0
        report[f"{kind}_mean_delta"] = round(float(np.mean(deltas)), 4) if deltas else 0.0
    print(f"Dice per step {report['dice']}, AUC {report['dice_auc']}, "
          f"{100 * report['frac_clicks_lower_dice']:.1f} % of {len(steps)} clicks lower Dice")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
