"""The challenge evaluation over a folder: files written, scores recomputed, no-box cases, failures."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

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


def test_gru_summary_gives_both_aucs_the_lowering_share_and_regrowth():
    from segvolgru.evaluate_gru import summarise

    curve = [0.1, 0.5, 0.6, 0.55, 0.7, 0.8, 0.9, 0.9, 0.9, 0.9, 1.0]
    out = summarise([{"dice": curve, "seconds": [0.1, 0.3, 0.2], "regrown": 3, "changed": 12}])
    assert out["dsc_auc_5"] == pytest.approx(0.5 * 0.5 + 0.6 + 0.55 + 0.7 + 0.5 * 0.8)
    assert out["dsc_auc_10"] == pytest.approx(sum(curve[1:]) - 0.5 * (curve[1] + curve[10]))
    assert out["lowering"] == pytest.approx(1 / 10) and out["regrowth"] == pytest.approx(0.25)
    assert out["click_s_p50"] == pytest.approx(0.2) and out["structures"] == 1 and len(out["dice_per_click"]) == 11


def test_regrowth_counts_changed_voxels_that_are_back_two_clicks_later():
    from segvolgru.evaluate_gru import regrowth

    empty, one, two = np.zeros(4, bool), np.array([1, 0, 0, 0], bool), np.array([1, 1, 0, 0], bool)
    # click 1 adds voxel 0 and click 3 removes it; click 2 adds voxel 1, gone two clicks later; click 3 has no
    # mask two clicks after it
    assert regrowth([empty, one, two, empty, empty]) == (2, 2)
    assert regrowth([empty, one, one, one, one]) == (0, 1)


def test_the_controls_push_at_error_rows_only_and_forget_the_state():
    from segvolgru.correction import CorrectionConfig, build_rows
    from segvolgru.evaluate_gru import ConstantPush, StatelessCorrector

    config = CorrectionConfig(k=8, hidden_size=4, row_dim=4)
    prob = np.full((6, 6, 6), 0.2, np.float32)
    prob[2:4, 2:4, 2:4] = 0.45
    rows = build_rows(prob, np.array([[1, 1, 1]]), np.array([1.0]), config)
    delta, hidden = ConstantPush(config, 5.0)(rows, torch.zeros(1, 1))
    error_rows = (rows.features[:, 0] == 1) & rows.valid
    assert bool(error_rows.any()) and torch.all(delta[error_rows] == 5.0) and torch.all(delta[~error_rows] == 0)
    model = tiny_model({"k": 8, "hidden_size": 4, "row_dim": 4})
    stateless = StatelessCorrector(model.correction)
    warm = torch.ones(1, 4)
    assert torch.equal(stateless(rows, warm)[0], model.correction(rows, model.correction.initial_state())[0])
    assert not torch.equal(model.correction(rows, warm)[0], model.correction(rows, model.correction.initial_state())[0])


def test_gru_evaluation_runs_every_variant_on_every_base(monkeypatch):
    from segvolgru import evaluate_gru

    real_set = evaluate_gru.phantom_set

    def one_structure(seed_base, shape, minimum):
        name, volume, labels, spacing = real_set(seed_base, shape, 1)[0]
        return [(name, volume, (labels == 1).astype(np.int16), spacing)]

    monkeypatch.setattr(evaluate_gru, "phantom_set", one_structure)
    monkeypatch.setattr(evaluate_gru, "CLICKS", 3)
    model = tiny_model({"k": 20, "hidden_size": 16, "row_dim": 8})
    out = evaluate_gru.report(model, quick=True, constant=4.0, progress=False)
    assert set(out["variants"]) == {"gru", "stateless", "heuristic", "off"}
    for table in out["variants"].values():
        assert set(table) == {"pooled", "segvol", "boundary", "structural", "threshold"}
        for row in table.values():
            assert {"dsc_auc_5", "dsc_auc_10", "lowering", "regrowth", "dice_per_click"} <= set(row)
            assert len(row["dice_per_click"]) == 4
    assert out["variants"]["off"]["boundary"]["lowering"] == 0.0  # nothing changes a click-blind base without a corrector
