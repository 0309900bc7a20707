"""The main job end to end: the headless MRML demo writes files Slicer opens, with Dice that recompute."""
from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("slicer", reason="the demo runs on real MRML from the slicer-core wheel")


def test_demo_writes_a_segmentation_that_reopens_with_the_reported_dice(tmp_path, monkeypatch):
    from segvolgru.demo import run_demo, sample_case
    from segvolgru.metrics import dice
    from segvolgru.slicer_bridge import HeadlessSlicer, load_seg_nrrd, load_volume, read_segment_mask

    monkeypatch.chdir(tmp_path.parent)
    summary = run_demo(tmp_path.name, quiet=True)  # a relative folder, as scripts/demo.sh passes it
    for name in ("SampleCT.seg.nrrd", "SampleCT.nrrd", "SampleCT.mrb", "montage.png", "dice.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert summary["scene_file"] == "SampleCT.mrb" and not list(tmp_path.glob("_tmp*"))
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == summary["steps"]
    assert "DEMO" in summary["weights"] and summary["steps"][0]["step"] == "box"
    assert 2 <= len(summary["steps"]) <= 6

    volume, labels, _, target = sample_case()
    headless = HeadlessSlicer()
    volume_node = load_volume(headless.scene, tmp_path / "SampleCT.nrrd")
    seg = load_seg_nrrd(headless.scene, tmp_path / "SampleCT.seg.nrrd")
    segment_id = seg.GetSegmentation().GetNthSegmentID(0)
    mask = read_segment_mask(seg, segment_id, volume_node)
    np.testing.assert_array_equal(np.asarray(volume_node.GetImageData().GetDimensions())[::-1], volume.shape)
    assert dice(mask, labels == target) == pytest.approx(summary["steps"][-1]["dice"], abs=1e-4)
    headless.close()
