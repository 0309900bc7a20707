"""The challenge evaluation over a folder: files written, scores recomputed, no-box cases, failures."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from engine_support import tiny_model
from segvolgru.checkpoint import save_checkpoint
from segvolgru.cli import main
from segvolgru.clicks import challenge_box
from segvolgru.evaluate import load_case, run_case
from segvolgru.metrics import dice


def _case(seed: int):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 40, (20, 48, 48)).astype(np.uint8)
    gts = np.zeros(imgs.shape, np.uint8)
    gts[5:14, 10:30, 12:34] = 1
    gts[8:12, 32:44, 30:44] = 2
    imgs[gts == 1] += 120
    imgs[gts == 2] += 180
    return imgs, gts


@pytest.fixture()
def data(tmp_path):
    folder = tmp_path / "cases"
    folder.mkdir()
    imgs, gts = _case(0)
    rng = np.random.default_rng(1)
    boxes = np.array([challenge_box(gts == c, rng) for c in (1, 2)], dtype=object)
    np.savez(folder / "withbox.npz", imgs=imgs, gts=gts, spacing=np.array([2.0, 1.0, 1.0]), boxes=boxes)
    imgs2, gts2 = _case(2)
    np.savez(folder / "nobox.npz", imgs=imgs2, spacing=np.array([1.0, 1.0, 1.0]))
    np.savez(folder / "nobox_gt.npz", gts=gts2)
    np.savez(folder / "broken.npz", something=np.zeros(3))
    (folder / "corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    return folder


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "tiny.pt"
    save_checkpoint(tiny_model(), path)
    return path


def test_evaluate_writes_csvs_report_and_json(data, weights, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["evaluate", str(data), "-o", str(out), "--weights", str(weights), "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("cases", "dsc_auc", "nsd_auc", "dsc_final", "nsd_final", "dsc_per_step", "nsd_per_step",
                "time_per_step_s", "failed"):
        assert key in summary
    assert summary["cases"] == 2 and [f["case"] for f in summary["failed"]] == ["broken.npz", "corrupt.npz"]
    assert len(summary["dsc_per_step"]) == 6
    assert (out / "report.md").exists() and (out / "curves.png").exists() and (out / "best.png").exists()
    rows = list(csv.DictReader(open(out / "nobox.csv")))
    assert rows[0]["step"] == "box" and float(rows[0]["dsc"]) == 0.0  # no box: scored 0 at the box step


def test_reported_dice_equals_a_recomputation(data):
    case = load_case(data / "withbox.npz")
    result = run_case(tiny_model(), case)
    final = result["preds"][-1]
    expected = np.mean([dice(final == c, case.gts == c) for c in (1, 2)])
    assert result["dsc_final"] == pytest.approx(expected)
    assert result["dsc_per_step"][-1] == pytest.approx(expected)
    assert result["has_box"] and len(result["preds"]) == 6


def test_boxes_belong_to_class_ids_even_when_a_class_is_absent(data, tmp_path):
    imgs, gts = _case(0)
    gts[gts == 1] = 0  # class 1 absent: the box list still has an entry for it
    rng = np.random.default_rng(1)
    boxes = np.array([None, challenge_box(gts == 2, rng)], dtype=object)
    np.savez(tmp_path / "gap.npz", imgs=imgs, gts=gts, spacing=np.array([1.0, 1.0, 1.0]), boxes=boxes)
    case = load_case(tmp_path / "gap.npz")
    result = run_case(tiny_model(), case)
    assert result["classes"] == [2]
    ys, xs = np.nonzero(result["preds"][0].any(axis=0))
    assert len(ys) > 0


def test_a_folder_without_cases_is_a_usage_error(tmp_path):
    assert main(["evaluate", str(tmp_path), "-o", str(tmp_path / "o")]) == 2


def test_gru_summary_counts_clicks_that_lower_dice_and_the_auc():
    from segvolgru.evaluate_gru import summarise

    curves = {"gru_on": [[0.5, 0.6, 0.55, 0.7, 0.8, 0.9], [0.2, 0.3, 0.4, 0.5, 0.6, 0.7]]}
    out = summarise({"curves": curves, "seconds": {"gru_on": [0.1, 0.3, 0.2]}, "structures": 2})
    assert out["frac_clicks_lower_dice"] == pytest.approx(1 / 10)
    assert out["dice_auc_gru_on"] == pytest.approx(np.mean([0.5 * 0.6 + 0.55 + 0.7 + 0.8 + 0.5 * 0.9,
                                                             0.5 * 0.3 + 0.4 + 0.5 + 0.6 + 0.5 * 0.7]))
    assert out["click_s_p50"] == pytest.approx(0.2) and out["cases"] == 2


def test_gru_evaluation_runs_every_variant_on_a_phantom():
    from segvolgru.evaluate_gru import VARIANTS, evaluate_cases, summarise
    from segvolgru.phantoms import make_phantom

    volume, labels, spacing = make_phantom(900_000_123, shape=(16, 64, 64))
    labels = np.where(labels == 1, 1, 0).astype(np.int16)
    model = tiny_model({"k": 20, "hidden_size": 16, "row_dim": 8})
    out = summarise(evaluate_cases(model, [("p", volume, labels, spacing)], progress=False))
    for name in VARIANTS:
        assert len(out[f"dice_{name}"]) == 6
    assert out["cases"] == 1
