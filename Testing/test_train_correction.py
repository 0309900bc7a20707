"""segvolgru train-correction: a corrector trained on several bases through the sessions' own click step."""
from __future__ import annotations

import json

import numpy as np
import torch

import segvolgru
from segvolgru.cli import main
from segvolgru.correction import CorrectionConfig, build_rows
from segvolgru.corrector_file import read_corrector


def test_rows_carry_the_image_around_them_relative_to_the_clicked_voxel():
    image = np.zeros((6, 6, 6), np.float32)
    image[3:, :, :] = 1.0
    prob = np.full((6, 6, 6), 0.3, np.float32)
    config = CorrectionConfig(k=4, patch_radius=1)
    rows = build_rows(prob, np.array([[1, 1, 1]]), np.array([1]), config, image)
    assert rows.features.shape == (8, 10 + 27)
    error_rows = (rows.features[:, 0] == 1) & rows.valid
    patch = rows.features[error_rows][:, 10:]
    assert float(patch.min()) == 0.0 and float(patch.max()) <= 1.0  # the click lies in the dark half
    assert CorrectionConfig().row_features == 10  # the shipped design carries no image


def test_a_short_run_writes_a_corrector_that_loads_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train-correction", str(out), "--steps", "3", "--hidden-size", "8", "--row-dim", "8",
                 "--clicks", "2", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    corrector, recipe = read_corrector(report["correction"])
    assert corrector.config.patch_radius == 1 and recipe["steps_done"] == 3 and "threshold" in recipe["trained_on"]
    first = {k: v.clone() for k, v in corrector.state_dict().items()}
    assert main(["train-correction", str(out), "--steps", "4", "--hidden-size", "8", "--row-dim", "8",
                 "--clicks", "2", "--quiet"]) == 2  # other settings: refused, not mixed
    model = segvolgru.load_model(segvolgru.demo_model_path(), correction=report["correction"])
    assert all(torch.equal(first[k], v) for k, v in model.correction.state_dict().items())
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2] and {r["base"] for r in log} <= {"segvol", "boundary", "structural"}
