"""The command line end to end on small inputs: outputs, geometry, exit codes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from engine_support import ct_like, tiny_model
from segvolgru.checkpoint import save_checkpoint
from segvolgru.cli import main
from segvolgru.segment_file import prompts_to_voxels


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "tiny.pt"
    save_checkpoint(tiny_model(), path)
    return path


@pytest.fixture()
def image_file(tmp_path):
    image = sitk.GetImageFromArray(ct_like())
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(image, str(path))
    return path


def _prompts(tmp_path, data) -> str:
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_segment_writes_a_label_in_the_input_geometry(tmp_path, weights, image_file, capsys):
    prompts = _prompts(tmp_path, {"coordinates": "voxel", "box": [[10, 30, 20], [29, 69, 59]],
                                  "clicks": [{"point": [20, 50, 40], "positive": True}]})
    out = tmp_path / "label.nii.gz"
    assert main(["segment", str(image_file), prompts, "-o", str(out), "--weights", str(weights), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    label, image = sitk.ReadImage(str(out)), sitk.ReadImage(str(image_file))
    assert label.GetSize() == image.GetSize()
    np.testing.assert_allclose(label.GetOrigin(), image.GetOrigin())
    np.testing.assert_allclose(label.GetDirection(), image.GetDirection())
    np.testing.assert_allclose(label.GetSpacing(), image.GetSpacing())
    assert int(sitk.GetArrayFromImage(label).sum()) == report["voxels"]


@pytest.mark.parametrize(("choice", "named"), [("default", "correction.pt"), ("none", "corrector: none")])
def test_segment_says_which_corrector_it_used(tmp_path, weights, image_file, capsys, choice, named):
    prompts = _prompts(tmp_path, {"coordinates": "voxel", "box": [[10, 30, 20], [29, 69, 59]],
                                  "clicks": [{"point": [20, 50, 40], "positive": True}]})
    out = tmp_path / "label.nii.gz"
    assert main(["segment", str(image_file), prompts, "-o", str(out), "--weights", str(weights),
                 "--correction", choice, "--json"]) == 0
    assert named in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["weights"]


def test_world_prompts_map_with_the_bridge_rules(image_file):
    image = sitk.ReadImage(str(image_file))
    centre = image.TransformIndexToPhysicalPoint((40, 50, 20))  # (i, j, k)
    ras = [-centre[0], -centre[1], centre[2]]
    box, clicks, _ = prompts_to_voxels(image, {"coordinates": "RAS", "box": [ras, ras],
                                               "clicks": [{"point": ras, "positive": False}]})
    assert box == (20, 50, 40, 20, 50, 40)
    assert clicks == [((20, 50, 40), False)]


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"coordinates": "voxel"}), "no prompt"),
    (json.dumps({"coordinates": "IJK", "box": [[0, 0, 0], [1, 1, 1]]}), "unknown coordinates"),
    (json.dumps({"clicks": [{"point": [999, 0, 0], "positive": True}]}), "outside the image"),
])
def test_bad_prompt_files_exit_2_naming_the_file(tmp_path, weights, image_file, capsys, content, message):
    path = tmp_path / "p.json"
    path.write_text(content)
    assert main(["segment", str(image_file), str(path), "-o", str(tmp_path / "o.nrrd"), "--weights",
                 str(weights)]) == 2
    err = capsys.readouterr().err
    assert message in err


def test_missing_image_exits_2_and_bad_weights_exit_3(tmp_path, image_file, capsys):
    prompts = _prompts(tmp_path, {"box": [[10, 30, 20], [29, 69, 59]]})
    assert main(["segment", str(tmp_path / "none.nrrd"), prompts, "-o", str(tmp_path / "o.nrrd")]) == 2
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    assert main(["segment", str(image_file), prompts, "-o", str(tmp_path / "o.nrrd"), "--weights", str(broken)]) == 3


def test_bench_quick_prints_its_json_keys(capsys):
    assert main(["bench", "--quick", "--device", "cpu", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("preprocess_s", "encoder_window_s", "first_box_s", "click_cached_s", "click_recompute_s",
                "cache_speedup", "click_session_s", "click_session_s_at_200", "peak_rss_mb", "device", "threads"):
        assert key in result


def test_unknown_command_is_a_usage_error():
    assert main(["frobnicate"]) == 2


def test_segment_to_seg_nrrd_reopens_in_the_image_geometry(tmp_path, weights, image_file):
    pytest.importorskip("slicer", reason="writing .seg.nrrd goes through real MRML")
    from segvolgru.slicer_bridge import HeadlessSlicer, load_seg_nrrd, load_volume, read_segment_mask

    prompts = _prompts(tmp_path, {"box": [[10, 30, 20], [29, 69, 59]]})
    out = tmp_path / "label.seg.nrrd"
    assert main(["segment", str(image_file), prompts, "-o", str(out), "--weights", str(weights), "--quiet"]) == 0
    label = tmp_path / "label.nrrd"
    assert main(["segment", str(image_file), prompts, "-o", str(label), "--weights", str(weights), "--quiet"]) == 0
    headless = HeadlessSlicer()
    volume_node = load_volume(headless.scene, image_file)
    seg = load_seg_nrrd(headless.scene, out)
    mask = read_segment_mask(seg, seg.GetSegmentation().GetNthSegmentID(0), volume_node)
    np.testing.assert_array_equal(mask, sitk.GetArrayFromImage(sitk.ReadImage(str(label))))
    headless.close()


def test_text_prompt_without_a_text_tower_exits_2(tmp_path, weights, image_file, capsys):
    prompts = _prompts(tmp_path, {"text": "liver"})
    assert main(["segment", str(image_file), prompts, "-o", str(tmp_path / "o.nrrd"), "--weights",
                 str(weights)]) == 2
    assert "no text tower" in capsys.readouterr().err


def test_debug_flag_is_accepted_after_the_subcommand(tmp_path, weights, image_file):
    prompts = _prompts(tmp_path, {"box": [[10, 30, 20], [29, 69, 59]]})
    assert main(["segment", str(image_file), prompts, "-o", str(tmp_path / "o.nrrd"), "--weights", str(weights),
                 "--quiet", "--debug"]) == 0
