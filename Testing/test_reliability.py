"""Bad input and faults, as a hostile but fair user would try them: nothing lost, nothing executed, honest exit
codes, one error type. docs/reliability.md lists every case and the test that covers it."""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from engine_support import ct_like, tiny_model
from segvolgru import InteractiveSession, load_model, segment
from segvolgru.checkpoint import save_checkpoint
from segvolgru.cli import main
from segvolgru.clicks import challenge_box
from segvolgru.config import TINY_CONFIG
from segvolgru.errors import InputError, WeightsError
from segvolgru.evaluate import load_case
from segvolgru.files import readable, write_atomic
from segvolgru.npz import read_npz

SHAPE = (20, 48, 48)
BOX = [[4, 10, 10], [15, 40, 40]]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "tiny.pt"
    save_checkpoint(tiny_model(), path)
    return path


def _image(path: Path, direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1)) -> Path:
    image = sitk.GetImageFromArray(ct_like(SHAPE))
    image.SetSpacing((0.8, 0.9, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture()
def image_file(tmp_path):
    return _image(tmp_path / "ct.nrrd")


def _prompts(tmp_path, data, name="prompts.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


@pytest.fixture()
def no_inference(monkeypatch):
    """Loading a model fails the test: the refusal must come before any inference."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was refused")

    monkeypatch.setattr("segvolgru.checkpoint.load_model", refuse)


class Payload:
    """Unpickling this runs ``touch MARKER``: what a crafted file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _challenge_arrays(seed: int = 0):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 40, SHAPE).astype(np.uint8)
    gts = np.zeros(SHAPE, np.uint8)
    gts[5:14, 10:30, 12:34] = 1
    imgs[gts == 1] += 150
    return imgs, gts


# ----------------------------------------------------------------------------- 1. outputs that are inputs
@pytest.mark.parametrize("spelling", ["same", "dotted", "symlink", "hardlink", "prompts"])
def test_segment_refuses_an_output_that_resolves_to_an_input(tmp_path, weights, image_file, capsys, no_inference,
                                                              spelling):
    prompts = _prompts(tmp_path, {"box": BOX}, name="prompts.nii.gz" if spelling == "prompts" else "prompts.json")
    if spelling == "same":
        out = image_file
    elif spelling == "dotted":
        (tmp_path / "sub").mkdir()
        out = tmp_path / "sub" / ".." / "." / image_file.name
    elif spelling == "symlink":
        out = tmp_path / "link.nrrd"
        out.symlink_to(image_file)
    elif spelling == "hardlink":
        out = tmp_path / "hard.nrrd"
        os.link(image_file, out)
    else:
        out = prompts
    before = {p: p.read_bytes() for p in (image_file, prompts)}
    assert main(["segment", str(image_file), str(prompts), "-o", str(out), "--weights", str(weights)]) == 2
    assert "is the input" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in before} == before


# ----------------------------------------------------------------------------- 2. nothing is unpickled
def test_a_crafted_npz_runs_nothing_and_is_listed_as_failed(tmp_path, weights, capsys):
    folder = tmp_path / "cases"
    folder.mkdir()
    marker = tmp_path / "executed"
    imgs, gts = _challenge_arrays()
    boxes = np.array([challenge_box(gts == 1, np.random.default_rng(1))], dtype=object)
    np.savez(folder / "good.npz", imgs=imgs, gts=gts, spacing=np.array([2.0, 1.0, 1.0]), boxes=boxes)
    np.savez(folder / "crafted.npz", imgs=imgs, gts=gts, spacing=np.array([1.0, 1.0, 1.0]),
             boxes=np.array([Payload(marker)], dtype=object))
    (folder / "pickled.npz").write_bytes(pickle.dumps(Payload(marker)))
    out = tmp_path / "report"
    assert main(["evaluate", str(folder), "-o", str(out), "--weights", str(weights), "--json", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert not marker.exists()
    assert summary["cases"] == 1
    failed = {f["case"]: f["error"] for f in summary["failed"]}
    assert set(failed) == {"crafted.npz", "pickled.npz"}
    assert "posix.system" in failed["crafted.npz"] and "refused" in failed["crafted.npz"]
    assert "not an .npz archive" in failed["pickled.npz"]


def test_challenge_object_entries_are_read_as_plain_data(tmp_path):
    imgs, gts = _challenge_arrays()
    box = challenge_box(gts == 1, np.random.default_rng(1))
    box["z_mid"] = np.int64(box["z_mid"])  # numpy scalars inside the dicts, as some writers leave them
    np.savez(tmp_path / "case.npz", imgs=imgs, gts=gts, spacing=np.array([2.0, 1.0, 1.0]),
             boxes=np.array([None, box], dtype=object), text_prompts=np.array({"1": "liver"}, dtype=object))
    arrays = read_npz(tmp_path / "case.npz")
    assert arrays["text_prompts"].item() == {"1": "liver"}
    case = load_case(tmp_path / "case.npz")
    assert case.boxes == [None, box] and case.spacing == (2.0, 1.0, 1.0)
    np.testing.assert_array_equal(case.image, imgs)


@pytest.mark.parametrize("entry, message", [
    ({"imgs": np.array([1, "a"], dtype=object)}, "must be an array of numbers"),
    ({"spacing": np.array(["1", "1", "1"])}, "must be an array of numbers"),
    ({"spacing": np.array([0.0, 1.0, 1.0])}, "finite positive"),
    ({"spacing": np.array([1.0, np.nan, 1.0])}, "finite positive"),
    ({"spacing": np.array([1.0, 1.0])}, "finite positive"),
    ({"boxes": np.array(["z_min"], dtype=object)}, "not a box dict"),
])
def test_npz_entries_must_be_plain_numbers(tmp_path, entry, message):
    imgs, gts = _challenge_arrays()
    np.savez(tmp_path / "case.npz", **{"imgs": imgs, "gts": gts, "spacing": np.ones(3), **entry})
    with pytest.raises(InputError, match=message):
        load_case(tmp_path / "case.npz")


def test_train_resume_files_load_without_unpickling(tmp_path, monkeypatch):
    from segvolgru import train

    config = dataclasses.replace(TINY_CONFIG, correction={"hidden_size": 16, "row_dim": 8})
    model = train.build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    path = tmp_path / "train_state.pt"
    np.random.seed(0)
    train._save_state(path, model, optimizer, 3, [{"step": 0, "loss": 1.0, "seconds": 0.1}], {"settings": {}})
    first = np.random.random()
    np.random.seed(99)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(k.get("weights_only")) or real_load(*a, **k))
    step, log = train._load_state(path, train.build_model(config), optimizer, "all")
    assert (step, len(log), loads) == (3, 1, [True])
    assert np.random.random() == first  # the numpy generator's state survives as plain tensors
    path.write_bytes(pickle.dumps({"config": Payload(tmp_path / "executed")}, protocol=2))
    with pytest.raises(InputError, match="resume file"):
        train._load_state(path, model, optimizer, "all")
    assert not (tmp_path / "executed").exists()


# ----------------------------------------------------------------------------- 3. atomic writes
def _failing_write_image(image, path, *args, **kwargs):
    """SimpleITK's writer on a full disk: half a file behind, then an error."""
    Path(path).write_bytes(b"\x00" * 10)
    raise RuntimeError("Exception thrown in SimpleITK WriteImage: No space left on device")


def test_a_failed_segment_write_keeps_the_previous_file_and_exits_2(tmp_path, weights, image_file, capsys,
                                                                   monkeypatch):
    prompts = _prompts(tmp_path, {"box": BOX})
    out = tmp_path / "label.nii.gz"
    out.write_bytes(b"previous result")
    monkeypatch.setattr(sitk, "WriteImage", _failing_write_image)
    assert main(["segment", str(image_file), str(prompts), "-o", str(out), "--weights", str(weights)]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "No space left on device" in err and "previous file is unchanged" in err
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nrrd", "label.nii.gz", "prompts.json"]


@pytest.mark.parametrize("name", ["label.nii", "label.nii.gz", "label.mha"])
def test_a_file_size_limit_mid_write_keeps_the_previous_file(tmp_path, weights, image_file, name):
    prompts = _prompts(tmp_path, {"box": BOX})
    out = tmp_path / name
    out.write_bytes(b"previous result")
    # ITK's NIfTI writer only prints a short write; the limit is below even the compressed label's size
    script = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100)); "
              "from segvolgru.cli import main; sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", script, "segment", str(image_file), str(prompts), "-o", str(out),
                           "--weights", str(weights)], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "cannot write" in done.stderr and str(out) in done.stderr
    assert out.read_bytes() == b"previous result"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".incoming")]


def test_write_atomic_removes_its_temporary_file_on_any_failure(tmp_path):
    target = tmp_path / "summary.json"
    target.write_text("old")

    def partial(fault):
        def write(temporary):
            temporary.write_text("new but trunc")
            raise fault
        return write

    with pytest.raises(InputError, match="summary.json: No space left on device .the previous file is unchanged"):
        write_atomic(target, partial(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    with pytest.raises(KeyboardInterrupt):
        write_atomic(target, partial(KeyboardInterrupt()))
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]
    write_atomic(target, lambda temporary: temporary.write_text("new"))
    assert target.read_text() == "new"


def test_checkpoints_and_evaluation_reports_are_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    save_checkpoint(tiny_model(), path)
    before = path.read_bytes()

    def broken_save(obj, file, *args, **kwargs):
        Path(file).write_bytes(b"PK truncated")
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(InputError, match="model.pt: File too large"):
        save_checkpoint(tiny_model(), path)
    assert path.read_bytes() == before
    load_model(path)

    from segvolgru.evaluate import write_case_csv
    from segvolgru.files import write_text_atomic

    csv_path = tmp_path / "case.csv"
    write_case_csv(csv_path, "case", {"dsc_per_step": [0.5], "nsd_per_step": [0.4], "time_per_step_s": [0.1]})
    assert csv_path.read_text().splitlines()[1] == "case,box,0.500000,0.400000,0.1000"
    monkeypatch.setattr(Path, "write_text", lambda self, *a, **k: (_ for _ in ()).throw(OSError(errno.EIO, "I/O")))
    with pytest.raises(InputError, match="case.csv"):
        write_case_csv(csv_path, "case", {"dsc_per_step": [0.9], "nsd_per_step": [0.9], "time_per_step_s": [0.1]})
    with pytest.raises(InputError, match="summary.json"):
        write_text_atomic(tmp_path / "summary.json", "{}")
    assert "0.500000" in csv_path.read_text() and not (tmp_path / "summary.json").exists()


# ----------------------------------------------------------------------------- 4. sheared geometry
SHEAR = (1.0, np.sin(0.3), 0.0, 0.0, np.cos(0.3), 0.0, 0.0, 0.0, 1.0)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".seg.nrrd"])
def test_a_sheared_image_is_not_written_where_the_format_would_rotate_it(tmp_path, weights, capsys, no_inference,
                                                                          suffix):
    image = _image(tmp_path / "sheared.nrrd", SHEAR)
    out = tmp_path / f"label{suffix}"
    assert main(["segment", str(image), str(_prompts(tmp_path, {"box": BOX})), "-o", str(out), "--weights",
                 str(weights)]) == 2
    err = capsys.readouterr().err
    assert "sheared" in err and ".nrrd or .mha" in err
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_a_sheared_image_keeps_its_exact_geometry_in_nrrd_and_mha(tmp_path, weights, suffix):
    image = _image(tmp_path / "sheared.nrrd", SHEAR)
    out = tmp_path / f"label{suffix}"
    assert main(["segment", str(image), str(_prompts(tmp_path, {"box": BOX})), "-o", str(out), "--weights",
                 str(weights), "--quiet"]) == 0
    np.testing.assert_allclose(sitk.ReadImage(str(out)).GetDirection(), SHEAR, atol=1e-12)


# ----------------------------------------------------------------------------- 5. click polarity
@pytest.mark.parametrize("positive", ["false", "true", None, 2, 0.0, [1]])
def test_a_click_polarity_that_is_not_a_boolean_is_refused_naming_the_click(tmp_path, weights, image_file, capsys,
                                                                            no_inference, positive):
    prompts = _prompts(tmp_path, {"box": BOX, "clicks": [{"point": [9, 25, 25], "positive": True},
                                                          {"point": [9, 26, 25], "positive": positive}]})
    assert main(["segment", str(image_file), str(prompts), "-o", str(tmp_path / "o.nrrd"), "--weights",
                 str(weights)]) == 2
    assert "click 1: 'positive' must be true or false" in capsys.readouterr().err


def test_click_polarity_is_a_boolean_or_1_0_in_the_api_and_replay():
    model = tiny_model()
    volume = ct_like(SHAPE)
    session = InteractiveSession(model, volume)
    session.set_box((4, 10, 10, 15, 40, 40))
    for bad in ("false", "0", None, 2, 1.0):
        with pytest.raises(InputError, match=r"the click at \(9, 25, 25\): 'positive'"):
            session.add_click((9, 25, 25), bad)
    assert session.prompts == [{"type": "box", "box": [4, 10, 10, 15, 40, 40]}]
    session.add_click((9, 25, 25), 0)
    session.add_click((9, 26, 25), np.True_)
    assert [p["positive"] for p in session.prompts[1:]] == [False, True]
    tampered = session.prompts[:1] + [{"type": "click", "voxel": [9, 25, 25], "positive": "false"}]
    with pytest.raises(InputError, match="stored prompt 1: the click at"):
        InteractiveSession.replay(model, volume, tampered)


# ----------------------------------------------------------------------------- 6. weights that are not finite
def test_nan_weights_are_refused_with_exit_3(tmp_path, image_file, capsys):
    model = tiny_model()
    with torch.no_grad():
        next(model.mask_decoder.parameters())[0] = float("nan")
    path = tmp_path / "nan.pt"
    save_checkpoint(model, path)
    with pytest.raises(WeightsError, match="NaN or infinite"):
        load_model(path)
    assert main(["segment", str(image_file), str(_prompts(tmp_path, {"box": BOX})), "-o",
                 str(tmp_path / "o.nrrd"), "--weights", str(path)]) == 3
    assert "NaN or infinite" in capsys.readouterr().err


# ----------------------------------------------------------------------------- 7. spacing
@pytest.mark.parametrize("spacing", [(0, 1, 1), (-1, 1, 1), (float("nan"), 1, 1), (1, float("inf"), 1), (1, 1),
                                     "abc", (1, "x", 1)])
def test_session_spacing_is_three_finite_positive_numbers(spacing):
    with pytest.raises(InputError, match="finite positive"):
        InteractiveSession(tiny_model(), ct_like(SHAPE), spacing=spacing)


def test_an_image_file_with_a_zero_spacing_exits_2(tmp_path, weights, capsys, no_inference):
    image = tmp_path / "flat.nrrd"
    image.write_text("NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 6 5 4\n"
                     "space directions: (0,0,0) (0,1,0) (0,0,1)\nkinds: domain domain domain\nendian: little\n"
                     "encoding: raw\nspace origin: (0,0,0)\n\n")
    with image.open("ab") as data:
        data.write(bytes(240))
    assert main(["segment", str(image), str(_prompts(tmp_path, {"box": BOX})), "-o", str(tmp_path / "o.nrrd"),
                 "--weights", str(weights)]) == 2
    assert "cannot read image" in capsys.readouterr().err


def test_a_zero_spacing_mrml_volume_is_an_input_error(mrml):
    from segvolgru.slicer_bridge import create_segment_editor, new_volume_node
    from segvolgru.slicer_bridge.geometry import world_to_kji_matrix
    from segvolgru.slicer_bridge.workflow import SegmentationWorkflow

    volume = new_volume_node(mrml.scene, ct_like(SHAPE), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), "CT")
    volume.SetSpacing(0.0, 1.0, 1.0)
    with pytest.raises(InputError, match="degenerate geometry"):
        world_to_kji_matrix(volume)
    segmentation = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    editor = create_segment_editor(mrml.scene, segmentation, volume, app_logic=mrml.app_logic)
    with pytest.raises(InputError, match="spacing .K, J, I. of the volume 'CT'"):
        SegmentationWorkflow(mrml.scene, volume, segmentation, editor, tiny_model())


def test_invalid_settings_in_the_workflow_get_their_own_message(mrml):
    from segvolgru.slicer_bridge import create_segment_editor, kji_to_world, new_volume_node
    from segvolgru.slicer_bridge.workflow import SegmentationWorkflow

    volume = new_volume_node(mrml.scene, ct_like(SHAPE), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), "CT")
    segmentation = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    editor = create_segment_editor(mrml.scene, segmentation, volume, app_logic=mrml.app_logic)
    workflow = SegmentationWorkflow(mrml.scene, volume, segmentation, editor, tiny_model(),
                                    settings={"fusion_radius": "wide"})
    roi = mrml.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Box")
    roi.SetCenterWorld(*kji_to_world(volume, (9, 25, 25)))
    roi.SetSize(20.0, 20.0, 8.0)
    with pytest.raises(InputError) as raised:
        workflow.set_box_from_roi(roi)
    assert "invalid session setting fusion_radius='wide'" in str(raised.value)
    assert "CPU" not in str(raised.value)


@pytest.mark.parametrize("prompts", [
    [{"type": "box", "box": [4, 10, 10, 15, 40, 40]}, {"type": "click", "voxel": [9, 25, 25], "positive": "false"}],
    [{"type": "box", "box": [4, 10, 10, 15, 40, 40]}, "click"],
    [{"type": "box", "box": "everything"}],
])
def test_altered_prompts_stored_in_a_scene_are_an_input_error_naming_the_prompt(mrml, prompts):
    from segvolgru.slicer_bridge import create_segment_editor, ensure_segment, new_volume_node
    from segvolgru.slicer_bridge.workflow import PROMPTS_TAG, SegmentationWorkflow

    volume = new_volume_node(mrml.scene, ct_like(SHAPE), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3), "CT")
    segmentation = mrml.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Segmentation")
    segment_id = ensure_segment(segmentation, "liver")
    segmentation.GetSegmentation().GetSegment(segment_id).SetTag(PROMPTS_TAG, json.dumps({"prompts": prompts}))
    editor = create_segment_editor(mrml.scene, segmentation, volume, app_logic=mrml.app_logic)
    workflow = SegmentationWorkflow(mrml.scene, volume, segmentation, editor, tiny_model())
    with pytest.raises(InputError, match=f"stored prompt {len(prompts) - 1}") as raised:
        workflow.apply(workflow.replay_step(segment_id))
    assert "CPU" not in str(raised.value)


# ----------------------------------------------------------------------------- 9. exit codes of the command line
@pytest.mark.parametrize("content, message", [
    ("[1, 2, 3]", "top level must be a JSON object"),
    (json.dumps({"box": "abc"}), "'box' must be two corners"),
    (json.dumps({"box": [[1, 2], [3, 4, 5]]}), "'box' must be two corners"),
    (json.dumps({"box": [[None, 10, 10], [15, 40, 40]]}), "'box' must be two corners"),
    (json.dumps({"box": [["4", 10, 10], [15, 40, 40]]}), "'box' must be two corners"),
    (json.dumps({"box": [[0, 0, 0], [1e20, 1e20, 1e20]]}), "reaches outside the volume"),
    (json.dumps({"clicks": [{"point": [9, 25], "positive": True}]}), "three coordinates"),
    (json.dumps({"clicks": [{"point": [1e20, 25, 25], "positive": True}]}), "lies outside the image"),
    (json.dumps({"clicks": {"point": [9, 25, 25]}}), "'clicks' must be a list"),
    (json.dumps({"clicks": ["here"]}), "click 0 must be an object"),
    (json.dumps({"box": BOX, "colour": "red"}), "unknown keys ['colour']"),
    (json.dumps({"text": 5}), "'text' must be a string"),
    ('{"coordinates": "LPS", "box": [[-Infinity, 0, 0], [10, 10, 10]]}', "must be finite numbers"),
    ('{"coordinates": "RAS", "clicks": [{"point": [NaN, 0, 0], "positive": true}]}', "must be finite numbers"),
])
def test_bad_prompt_files_exit_2_before_inference(tmp_path, weights, image_file, capsys, no_inference, content,
                                                  message):
    path = tmp_path / "p.json"
    path.write_text(content)
    assert main(["segment", str(image_file), str(path), "-o", str(tmp_path / "o.nrrd"), "--weights",
                 str(weights)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err


@pytest.mark.parametrize("kind, message", [
    ("binary", "not UTF-8 text"), ("folder", "is a folder, not a file"), ("missing", "does not exist"),
])
def test_unusable_prompt_files_exit_2_saying_what_is_wrong(tmp_path, weights, image_file, capsys, no_inference,
                                                           kind, message):
    path = tmp_path / "p.json"
    if kind == "binary":
        path.write_bytes(bytes(range(256)))
    elif kind == "folder":
        path.mkdir()
    assert main(["segment", str(image_file), str(path), "-o", str(tmp_path / "o.nrrd"), "--weights",
                 str(weights)]) == 2
    assert message in capsys.readouterr().err


@contextlib.contextmanager
def _unprivileged():
    """Run as 'nobody' (tests run as root, which reads everything) and back."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_an_unreadable_file_is_not_readable_rather_than_missing(tmp_path):
    tmp_path.chmod(0o755)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    hidden = locked / "ct.nrrd"
    hidden.write_bytes(b"x")
    private = tmp_path / "private.json"
    private.write_text("{}")
    private.chmod(0o000)
    with _unprivileged():
        with pytest.raises(InputError, match="is not readable .permission denied"):
            readable(hidden, "image")
        with pytest.raises(InputError, match="is not readable .permission denied"):
            readable(private, "prompts file")
        with pytest.raises(WeightsError, match="is not readable"):
            load_model(hidden)


@pytest.mark.parametrize("output, message", [
    ("folder", "is a folder"), ("folder.nrrd", "is a folder"), ("label.png", "unknown file type"),
    ("file/label.nrrd", "is a file"), ("file/sub/label.nrrd", "is a file"), ("label.mhd", "unknown file type"),
])
def test_bad_output_paths_exit_2_before_inference(tmp_path, weights, image_file, capsys, no_inference, output,
                                                  message):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder.nrrd").mkdir()
    (tmp_path / "file").write_text("a file, not a folder")
    assert main(["segment", str(image_file), str(_prompts(tmp_path, {"box": BOX})), "-o", str(tmp_path / output),
                 "--weights", str(weights)]) == 2
    assert message in capsys.readouterr().err


def test_evaluate_into_a_file_exits_2_before_loading_weights(tmp_path, capsys, no_inference):
    imgs, gts = _challenge_arrays()
    np.savez(tmp_path / "case.npz", imgs=imgs, gts=gts, spacing=np.ones(3))
    out = tmp_path / "report.txt"
    out.write_text("keep")
    assert main(["evaluate", str(tmp_path), "-o", str(out)]) == 2
    assert "is a file" in capsys.readouterr().err and out.read_text() == "keep"


def test_evaluate_where_every_case_failed_exits_2(tmp_path, weights, capsys):
    folder = tmp_path / "cases"
    folder.mkdir()
    (folder / "a.npz").write_bytes(b"not a zip")
    np.savez(folder / "b.npz", something=np.zeros(3))
    assert main(["evaluate", str(folder), "-o", str(tmp_path / "out"), "--weights", str(weights), "--quiet"]) == 2
    assert "every case failed" in capsys.readouterr().err


def _tampered(tmp_path, change) -> Path:
    model = tiny_model()
    data = {"config": model.config.to_dict(), "model": model.state_dict(), "recipe": {}}
    change(data)
    path = tmp_path / "tampered.pt"
    torch.save(data, path)
    return path


@pytest.mark.parametrize("change", [
    lambda d: d["config"].update(hidden_size="wide"),
    lambda d: d["config"].update(spatial_size=[0, 0, 0]),
    lambda d: d["config"].update(hidden_size=-64, num_heads=4, decoder_heads=4),
    lambda d: d["config"].update(correction={"k": "many"}),
    lambda d: d.update(config=["not", "a", "dict"]),
    lambda d: d.update(recipe="altered"),
], ids=["type", "range", "negative", "correction", "list", "recipe"])
def test_a_tampered_checkpoint_config_exits_3(tmp_path, image_file, capsys, change):
    path = _tampered(tmp_path, change)
    with pytest.raises(WeightsError):
        load_model(path)
    assert main(["segment", str(image_file), str(_prompts(tmp_path, {"box": BOX})), "-o",
                 str(tmp_path / "o.nrrd"), "--weights", str(path)]) == 3
    assert "unexpected" not in capsys.readouterr().err


def test_garbage_safetensors_exit_3(tmp_path, image_file, capsys):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"garbage" * 50)
    assert main(["segment", str(image_file), str(_prompts(tmp_path, {"box": BOX})), "-o",
                 str(tmp_path / "o.nrrd"), "--weights", str(path)]) == 3
    assert "cannot read checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("threads", ["-3", "0", "many"])
@pytest.mark.parametrize("command", ["bench", "train"])
def test_a_bad_thread_count_is_a_usage_error(tmp_path, capsys, command, threads):
    out = tmp_path / "never"
    assert main([command, "--threads", threads] + ([str(out)] if command == "train" else ["--quick"])) == 2
    assert "positive integer" in capsys.readouterr().err and not out.exists()


# ----------------------------------------------------------------------------- 10. one error type in the API
def test_the_api_raises_input_error_for_bad_input():
    model = tiny_model()
    volume = ct_like(SHAPE)
    with pytest.raises(InputError, match="dtype object"):
        InteractiveSession(model, volume.astype(object))
    with pytest.raises(InputError, match="dtype object"):
        segment(model, volume.astype(object), box=(4, 10, 10, 15, 40, 40))
    session = InteractiveSession(model, volume)
    for box in ("abc", ["4", "10", "10", "15", "40", "40"], [4, 10, None, 15, 40, 40], [[4, 10], [10, 15, 40]]):
        with pytest.raises(InputError, match="six finite voxel indices"):
            session.set_box(box)
    with pytest.raises(InputError, match="points must be"):
        segment(model, volume, points=[["a", "b", "c"]], point_labels=[1])


@pytest.mark.parametrize("prompts, message", [
    ([{"type": "click", "voxel": [9, 25, 25]}], "stored prompt 0 .* is not a prompt"),
    (["box"], "stored prompt 0 'box' is not a prompt"),
    ([{"type": ["box"], "box": [1, 2, 3, 4, 5, 6]}], "is not a prompt"),
    ([{"type": "box", "box": "abc"}], "stored prompt 0: a box is six"),
    ([{"type": "click", "voxel": [9, 25, 25], "positive": True, "extra": 1}], "is not a prompt"),
    (5, "must be a list"),
])
def test_tampered_replay_prompts_raise_input_error(prompts, message):
    with pytest.raises(InputError, match=message):
        InteractiveSession.replay(tiny_model(), ct_like(SHAPE), prompts)


@pytest.mark.parametrize("settings, message", [
    ({"overlap": "half"}, "overlap='half': it must be a finite number"),
    ({"overlap": 1.5}, r"overlap=1.5: it must be in \[0, 1\)"),
    ({"gru": "no"}, "gru='no': it must be True or False"),
    ({"tau": "x"}, "tau='x'"),
    ({"tau": 0.9}, "tau must be in"),
    ({"fusion_band": (0.1,)}, "a pair of finite numbers"),
    ({"negative_reach": float("nan")}, "a finite number or None"),
    ({"text": 3}, "a string or None"),
    ({"colour": "red"}, r"unknown session settings \['colour'\]"),
])
def test_invalid_session_settings_raise_input_error_with_their_own_message(settings, message):
    with pytest.raises(InputError, match=message):
        InteractiveSession(tiny_model(), ct_like(SHAPE), **settings)


def test_load_model_refuses_a_config_name_and_a_missing_device(weights):
    with pytest.raises(InputError, match="config must be a SegVolConfig"):
        load_model(weights, config="tiny")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            load_model(weights, device="cuda")
    with pytest.raises(InputError, match="unknown device"):
        load_model(weights, device="tpu")


# ----------------------------------------------------------------------------- 11. messages that say what is true
def test_a_huge_box_is_outside_not_inverted():
    session = InteractiveSession(tiny_model(), ct_like(SHAPE))
    with pytest.raises(InputError, match="reaches outside the volume") as raised:
        session.set_box((0, 0, 0, 1e20, 1e20, 1e20))
    assert "inverted" not in str(raised.value)
    with pytest.raises(InputError, match="lies outside the volume"):
        session.add_click((1e20, 0, 0), True)


def test_a_4d_volume_is_reported_as_a_volume_problem():
    with pytest.raises(InputError, match="4 dimensions"):
        segment(tiny_model(), ct_like(SHAPE)[None], box=(4, 10, 10, 15, 40, 40))
    with pytest.raises(InputError, match="4 dimensions"):
        segment(tiny_model(), ct_like(SHAPE)[None], box=(4, 10, 10, 15, 40, 40), mode="interactive")


def test_undo_past_the_history_cap_says_the_history_is_exhausted(monkeypatch):
    import segvolgru.session as session_module

    monkeypatch.setattr(session_module, "MAX_HISTORY", 2)
    session = InteractiveSession(tiny_model(), ct_like(SHAPE))
    session.set_box((4, 10, 10, 15, 40, 40))
    session.add_click((9, 25, 25), True)
    session.add_click((9, 30, 25), False)
    session.undo()
    session.undo()
    with pytest.raises(InputError, match="undo history holds the last 2 steps") as raised:
        session.undo()
    assert "no prompts yet" not in str(raised.value)
    fresh = InteractiveSession(tiny_model(), ct_like(SHAPE))
    with pytest.raises(InputError, match="no prompts yet"):
        fresh.undo()


# ---------------------------------------------------------------- a second pass (review of the first)
def test_segment_refuses_an_output_that_is_the_corrector_file(tmp_path, weights, image_file):
    from segvolgru.corrector_file import save_corrector

    corrector = tmp_path / "c.nrrd"
    save_corrector(tiny_model({"k": 8, "hidden_size": 4, "row_dim": 4}).correction, corrector)
    before = corrector.read_bytes()
    prompts = _prompts(tmp_path, {"coordinates": "voxel", "box": [[10, 30, 20], [29, 69, 59]]})
    assert main(["segment", str(image_file), str(prompts), "-o", str(corrector), "--weights", str(weights),
                 "--correction", str(corrector)]) == 2
    assert corrector.read_bytes() == before


def test_a_deeply_nested_prompts_file_exits_2(tmp_path, weights, image_file):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert main(["segment", str(image_file), str(deep), "-o", str(tmp_path / "o.nrrd"),
                 "--weights", str(weights)]) == 2


@pytest.mark.parametrize("content", [{"config": {}, "model": {"w": [1, 2]}},
                                     {"config": {}, "model": {}, "recipe": 5}, [1, 2]])
def test_a_tampered_corrector_file_is_a_weights_error(tmp_path, content):
    from segvolgru.corrector_file import read_corrector

    path = tmp_path / "c.pt"
    torch.save(content, path)
    with pytest.raises(WeightsError, match="not a corrector file"):
        read_corrector(path)


@pytest.mark.parametrize("settings", [{"fusion_radius": -1.0}, {"error_radius": 0.0}, {"spread_sigma": -2.0},
                                      {"fusion_band": [0.9, 0.1]}])
def test_meaningless_correction_settings_are_refused(settings):
    with pytest.raises(InputError, match="invalid session setting"):
        InteractiveSession(tiny_model(), ct_like((8, 16, 16)), **settings)


def test_a_device_that_is_not_a_name_and_a_nan_box_dict_are_input_errors(weights):
    from segvolgru.clicks import box_dict_to_kji

    with pytest.raises(InputError, match="device must be"):
        load_model(weights, device=5)
    box = {k: 1 for k in ("z_min", "z_max", "z_mid", "z_mid_y_min", "z_mid_y_max", "z_mid_x_min", "z_mid_x_max")}
    with pytest.raises(InputError, match="not finite numbers"):
        box_dict_to_kji({**box, "z_max": float("nan")})


@pytest.mark.parametrize("spacing", [("1", "1", "1"), (True, True, True)])
def test_spacing_of_strings_or_booleans_is_refused(spacing):
    from segvolgru.validation import validate_spacing

    with pytest.raises(InputError, match="three finite positive"):
        validate_spacing(spacing)


def test_training_outputs_and_numbers_that_cannot_be_used_exit_2(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["train", str(a_file), "--steps", "1"]) == 2
    assert main(["train", str(tmp_path / "t"), "--steps", "1", "--lr", "nan"]) == 2
    assert main(["train-correction", str(a_file), "--steps", "1"]) == 2
    assert main(["download-weights", "--cache-dir", str(a_file)]) == 2
    (tmp_path / "r").mkdir()
    torch.save({}, tmp_path / "r" / "resume.pt")
    assert main(["train-correction", str(tmp_path / "r"), "--steps", "1", "--quiet"]) == 2


def test_weights_cast_to_integers_and_fractional_labels_are_refused(tmp_path):
    from segvolgru.evaluate import Case, run_case

    model = tiny_model()
    state = {k: v.long() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({"model": state}, tmp_path / "ints.pth")
    with pytest.raises(WeightsError, match="as integers"):
        load_model(tmp_path / "ints.pth", config=TINY_CONFIG)
    gts = np.zeros((8, 16, 16), np.float32)
    gts[2:5, 4:9, 4:9] = 0.5
    case = Case("half", ct_like((8, 16, 16)), gts, (1.0, 1.0, 1.0), None)
    with pytest.raises(InputError, match="non-integer"):
        run_case(model, case)
