"""``segvolgru evaluate``: the CVPR 2025 interactive protocol over a folder of cases.

Cases are challenge npz files (``imgs``, ``gts``, ``spacing``, optional ``boxes``; a sibling ``<case>_gt.npz``
holding ``gts`` is accepted) or image/label pairs (``<case>.nii.gz`` + ``<case>_label.nii.gz``, also ``.nrrd``/
``.mha``; box dicts are then drawn by the challenge rule with a fixed seed). Per class: the box (when the case has
boxes; otherwise that step scores 0, as the challenge does) and 5 simulated clicks, one per class per step on
the multi-class prediction, each class in its own interactive session; later classes overwrite earlier ones
where they overlap. Scores per :func:`segvolgru.metrics.case_scores`.
"""
from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .clicks import box_dict_to_kji, challenge_box, simulate_click
from .errors import InputError
from .files import check_output_folder, write_atomic, write_text_atomic
from .metrics import CHALLENGE_CLICKS, case_scores
from .npz import numeric_array, read_npz
from .validation import validate_spacing

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
BOX_SEED = 2025


@dataclass
class Case:
    name: str
    image: np.ndarray
    gts: np.ndarray
    spacing: tuple[float, float, float]
    boxes: list[dict] | None


def _strip(name: str) -> str:
    for suffix in IMAGE_SUFFIXES + (".npz",):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_cases(folder: str | Path) -> list[Path]:
    """Case files of a folder (npz files and images that have a ``_label`` sibling), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder of cases")
    found = []
    for path in sorted(folder.iterdir()):
        base = _strip(path.name)
        if base.endswith(("_gt", "_label")):
            continue
        if path.name.endswith(".npz") or any(path.name.endswith(s) and _label_of(path) for s in IMAGE_SUFFIXES):
            found.append(path)
    if not found:
        raise InputError(f"{folder} holds no cases: expected challenge .npz files or <case>.nii.gz + "
                         "<case>_label.nii.gz pairs")
    return found


def _label_of(path: Path) -> Path | None:
    base = _strip(path.name)
    for suffix in IMAGE_SUFFIXES:
        candidate = path.with_name(f"{base}_label{suffix}")
        if candidate.exists():
            return candidate
    return None


def load_case(path: Path) -> Case:
    """One case, read without unpickling anything but plain data (see :mod:`segvolgru.npz`)."""
    name = _strip(path.name)
    if path.name.endswith(".npz"):
        data = read_npz(path)
        if "imgs" not in data:
            raise InputError(f"{path}: no 'imgs' array (challenge npz cases hold imgs, gts, spacing)")
        image = numeric_array(data, "imgs", str(path))
        spacing = validate_spacing(numeric_array(data, "spacing", str(path)) if "spacing" in data else (1, 1, 1),
                                   f"{path}: spacing")
        boxes = _boxes(data["boxes"], path) if "boxes" in data else None
        if "gts" in data:
            gts = numeric_array(data, "gts", str(path))
        else:
            sibling = path.with_name(f"{name}_gt.npz")
            if not sibling.exists():
                raise InputError(f"{path}: no 'gts' in the file and no sibling {sibling.name}")
            labels = read_npz(sibling)
            if "gts" not in labels:
                raise InputError(f"{sibling}: no 'gts' array")
            gts = numeric_array(labels, "gts", str(sibling))
        return Case(name, image, gts, spacing, boxes)
    import SimpleITK as sitk

    label_path = _label_of(path)
    try:
        image, label = sitk.ReadImage(str(path)), sitk.ReadImage(str(label_path))
    except RuntimeError as exc:
        raise InputError(f"cannot read {path} or {label_path}: {str(exc).strip().splitlines()[-1]}") from None
    if image.GetSize() != label.GetSize() or not np.allclose(image.GetSpacing(), label.GetSpacing()) or \
            not np.allclose(image.GetOrigin(), label.GetOrigin(), atol=1e-3) or \
            not np.allclose(image.GetDirection(), label.GetDirection(), atol=1e-4):
        raise InputError(f"{label_path}: its geometry (size, spacing, origin or direction) differs from {path}")
    gts = sitk.GetArrayFromImage(label)
    spacing = validate_spacing(image.GetSpacing()[::-1], f"{path}: spacing")
    rng = np.random.default_rng(BOX_SEED)
    # Indexed like the challenge's list: entry c - 1 belongs to class c (None for a class the labels lack).
    boxes = [challenge_box(gts == c, rng) if (gts == c).any() else None for c in range(1, int(gts.max()) + 1)]
    return Case(name, sitk.GetArrayFromImage(image), gts, spacing, boxes)


def _boxes(array: np.ndarray, path: Path) -> list[dict | None]:
    """The challenge's box list: one dict (or None) per class, in label order."""
    boxes = list(array.reshape(-1))
    bad = [n for n, box in enumerate(boxes) if box is not None and not isinstance(box, dict)]
    if bad:
        raise InputError(f"{path}: 'boxes' entry {bad[0]} is a {type(boxes[bad[0]]).__name__}, not a box dict "
                         "(z_min, z_max, z_mid, z_mid_y_min, ...)")
    return boxes


def run_case(model, case: Case, gru: bool = True, fusion: bool = True, cache: bool = True) -> dict:
    """Box + 5 clicks for every class of one case; returns the scores, per-step times and the label maps."""
    from .cache import EmbeddingCache
    from .session import InteractiveSession

    if case.image.shape != case.gts.shape:
        raise InputError(f"{case.name}: image {case.image.shape} and labels {case.gts.shape} differ in shape")
    values = np.unique(case.gts)
    if not np.array_equal(values, np.round(values)):
        raise InputError(f"{case.name}: the labels hold non-integer values ({values[values != np.round(values)][:3]}): "
                         "give a label map of class numbers")
    classes = sorted(int(v) for v in values if v > 0)
    if not classes:
        raise InputError(f"{case.name}: the labels have no foreground class")
    has_box = case.boxes is not None
    sessions = {c: InteractiveSession(model, case.image, spacing=case.spacing, gru=gru, fusion=fusion,
                                      cache=None if cache else EmbeddingCache(0)) for c in classes}
    masks = {c: np.zeros(case.image.shape, np.uint8) for c in classes}
    preds, times = [], []

    def compose() -> np.ndarray:
        seg = np.zeros(case.image.shape, np.int16)
        for c in classes:
            seg[masks[c] > 0] = c
        return seg

    if has_box:
        started = time.perf_counter()
        for c in classes:
            # The challenge lists one box per class in label order (labels are 1..N), so class c owns entry c - 1.
            box = case.boxes[c - 1] if c - 1 < len(case.boxes) else None
            if box:
                masks[c] = sessions[c].set_box(box_dict_to_kji(box)).mask
        times.append(time.perf_counter() - started)
        preds.append(compose())
    seg = compose()
    for _ in range(CHALLENGE_CLICKS):
        started = time.perf_counter()
        for c in classes:
            click = simulate_click(seg == c, case.gts == c)
            if click is not None:
                masks[c] = sessions[c].add_click((click.k, click.j, click.i), click.positive).mask
        times.append(time.perf_counter() - started)
        seg = compose()
        preds.append(seg)
    scores = case_scores(preds, case.gts, case.spacing, classes=classes, has_box=has_box)
    if not has_box:
        times.insert(0, 0.0)
    return {**scores, "time_per_step_s": times, "classes": classes, "preds": preds, "has_box": has_box}


def write_case_csv(path: Path, name: str, result: dict) -> None:
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["case", "step", "dsc", "nsd", "seconds"])
    for step, (d, n, t) in enumerate(zip(result["dsc_per_step"], result["nsd_per_step"], result["time_per_step_s"])):
        writer.writerow([name, "box" if step == 0 else f"click{step}", f"{d:.6f}", f"{n:.6f}", f"{t:.4f}"])
    write_atomic(path, lambda temporary: temporary.write_text(text.getvalue(), encoding="utf-8", newline=""))


def evaluate_folder(folder, out_dir, model, gru=True, fusion=True, cache=True, progress=True) -> dict:
    from tqdm import tqdm

    out = check_output_folder(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results, failed = {}, []
    paths = find_cases(folder)
    for path in tqdm(paths, desc="cases", disable=not progress):
        try:
            case = load_case(path)
            result = run_case(model, case, gru=gru, fusion=fusion, cache=cache)
        except Exception as exc:  # noqa: BLE001 - a broken case is reported and the folder goes on
            failed.append({"case": path.name, "error": f"{type(exc).__name__}: {exc}"})
            continue
        write_case_csv(out / f"{case.name}.csv", case.name, result)
        results[case.name] = (case, result)
    summary = summarise({k: r for k, (_, r) in results.items()}, failed)
    from .report import write_report

    write_report(out, results, summary)
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def summarise(results: dict[str, dict], failed: list[dict]) -> dict:
    def mean(key):
        return float(np.mean([r[key] for r in results.values()])) if results else 0.0

    def per_step(key):
        if not results:
            return []
        return [float(v) for v in np.mean([r[key] for r in results.values()], axis=0)]

    def spread(key):
        if not results:
            return []
        return [float(v) for v in np.std([r[key] for r in results.values()], axis=0)]

    return {"cases": len(results), "dsc_auc": mean("dsc_auc"), "nsd_auc": mean("nsd_auc"),
            "dsc_final": mean("dsc_final"), "nsd_final": mean("nsd_final"),
            "dsc_per_step": per_step("dsc_per_step"), "nsd_per_step": per_step("nsd_per_step"),
            "dsc_per_step_std": spread("dsc_per_step"), "time_per_step_s": per_step("time_per_step_s"),
            "failed": failed}
