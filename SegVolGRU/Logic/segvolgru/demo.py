"""The main job: the clinician's box + clicks workflow, headless, on real MRML (``segvolgru demo``).

A sample volume is loaded into an MRML scene, an ROI markup is placed around a structure and point markups for
the clicks are placed where the challenge's click rule puts them (as a user would correct the largest error), and
everything runs through the same :class:`~segvolgru.slicer_bridge.SegmentationWorkflow` that the Slicer panel
uses. Outputs: ``<name>.seg.nrrd`` (opens in 3D Slicer over ``<name>.nrrd``), an ``.mrb`` scene when the wheel
can write one, ``montage.png``, ``dice.png`` and ``summary.json``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .clicks import mask_to_box_kji, simulate_click
from .files import check_output_folder, save_figure, write_atomic, write_text_atomic
from .metrics import dice
from .weights import LoadedModel, pick_model  # noqa: F401  (re-exported: the demo's model choice)

SAMPLE_SEED = 20261201


def sample_case(seed: int = SAMPLE_SEED):
    """A generated CT-like phantom (volume int16 (K, J, I), labels, spacing) and the label of its largest organ."""
    from .phantoms import make_phantom

    volume, labels, spacing = make_phantom(seed, shape=(40, 128, 128), modality="ct")
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    return volume, labels, spacing, int(ids[np.argmax(counts)])


def _place_roi(headless, volume_node, box_kji):
    """An ROI markup whose faces lie half a voxel outside the box's voxel centres (what a user would draw)."""
    import slicer

    from .slicer_bridge import kji_to_world

    lo = kji_to_world(volume_node, np.asarray(box_kji[:3], float) - 0.5)
    hi = kji_to_world(volume_node, np.asarray(box_kji[3:], float) + 0.5)
    roi = headless.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "Box")
    roi.SetCenterWorld(*((np.asarray(lo) + np.asarray(hi)) / 2))
    roi.SetSize(*np.abs(np.asarray(hi) - np.asarray(lo)))
    assert isinstance(roi, slicer.vtkMRMLMarkupsROINode)
    return roi


def run_demo(out_dir: str | Path, weights: str | None = None, clicks: int = 5, quiet: bool = False) -> dict:
    """Box then ``clicks`` simulated clicks through the MRML workflow; writes the outputs, returns the summary."""
    from .slicer_bridge import (HeadlessSlicer, SegmentationWorkflow, create_segment_editor, kji_to_world,
                                new_volume_node, read_segment_mask, save_seg_nrrd)

    out = check_output_folder(out_dir).resolve()  # MRML writes an .mrb only to a full path
    out.mkdir(parents=True, exist_ok=True)
    loaded = pick_model(weights)
    volume, labels, spacing, target = sample_case()
    gt = labels == target
    headless = HeadlessSlicer()
    scene = headless.scene
    directions = np.diag([-1.0, -1.0, 1.0])  # an LPS-stored scan, as most CT arrive in Slicer
    volume_node = new_volume_node(scene, volume, spacing[::-1], (120.0, 90.0, -40.0), directions, "SampleCT")
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "SegVolGRU")
    seg_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    editor = create_segment_editor(scene, seg_node, volume_node)
    workflow = SegmentationWorkflow(scene, volume_node, seg_node, editor, loaded.model)
    workflow.new_segment("Structure")
    positive = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Positive")
    negative = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Negative")
    roi = _place_roi(headless, volume_node, mask_to_box_kji(gt))
    steps = []
    started = time.perf_counter()
    status = workflow.set_box_from_roi(roi)
    steps.append(_record("box", status, read_segment_mask(seg_node, workflow.segment_id, volume_node), gt))
    for n in range(clicks):
        pred = steps[-1]["mask"].astype(bool)
        click = simulate_click(pred, gt, seed=42 + n)
        if click is None:
            break
        node = positive if click.positive else negative
        index = node.AddControlPointWorld(*kji_to_world(volume_node, (click.k, click.j, click.i)))
        status = workflow.add_click_from_point(node, index, click.positive)
        steps.append(_record(f"click {n + 1} ({'+' if click.positive else '-'})", status,
                             read_segment_mask(seg_node, workflow.segment_id, volume_node), gt, click))
    total = time.perf_counter() - started
    write_atomic(out / "SampleCT.seg.nrrd", lambda temporary: save_seg_nrrd(seg_node, temporary))
    _save_volume(volume_node, out / "SampleCT.nrrd")
    scene_file = _save_scene(scene, out / "SampleCT.mrb")
    _montage(volume, gt, steps, out / "montage.png")
    _dice_plot(steps, out / "dice.png")
    summary = {
        "weights": loaded.description,
        "structure_voxels": int(gt.sum()),
        "spacing_kji_mm": list(map(float, spacing)),
        "steps": [{k: v for k, v in s.items() if k != "mask"} for s in steps],
        "total_s": round(total, 3),
        "files": sorted(p.name for p in out.iterdir()),
        "scene_file": scene_file,
    }
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2))
    if not quiet:
        print(f"SegVolGRU headless demo — weights: {loaded.description}")
        for s in summary["steps"]:
            print(f"  {s['step']:<14} Dice {s['dice']:.3f}   {s['seconds']:.2f} s")
        print(f"  wrote {', '.join(summary['files'])} to {out}")
    headless.close()
    return summary


def _record(name, status, mask, gt, click=None) -> dict:
    entry = {"step": name, "dice": round(dice(mask.astype(bool), gt), 4),
             "seconds": round(status.predict_seconds + status.write_seconds, 3), "mask": mask}
    if click is not None:
        entry["click_kji"] = [click.k, click.j, click.i]
    return entry


def _save_volume(volume_node, path: Path) -> None:
    def write(temporary: Path) -> None:
        storage = volume_node.CreateDefaultStorageNode()
        storage.SetFileName(str(temporary))
        if not storage.WriteData(volume_node):
            raise OSError(f"MRML could not write {temporary.name}")

    write_atomic(path, write)


def _save_scene(scene, path: Path) -> str | None:
    def write(temporary: Path) -> None:
        if not scene.WriteToMRB(str(temporary)):
            raise OSError("MRML could not write the scene bundle")

    try:
        write_atomic(path, write)
    except Exception:  # the wheel may lack the I/O managers an .mrb needs; the .seg.nrrd is the main output
        return None
    return path.name


def _montage(volume, gt, steps, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centre = np.round(np.argwhere(gt).mean(axis=0)).astype(int)
    views = [("axial", lambda a: a[centre[0]]), ("coronal", lambda a: a[:, centre[1]]),
             ("sagittal", lambda a: a[:, :, centre[2]])]
    colours = plt.cm.viridis(np.linspace(0, 1, len(steps)))
    fig, axes = plt.subplots(1, 3, figsize=(15, 5))
    for ax, (title, take) in zip(axes, views):
        ax.imshow(take(volume), cmap="gray", aspect="auto")
        ax.contour(take(gt), levels=[0.5], colors="red", linewidths=1.5, linestyles="dashed")
        for colour, step in zip(colours, steps):
            if take(step["mask"]).any():
                ax.contour(take(step["mask"]), levels=[0.5], colors=[colour], linewidths=1)
        ax.set_title(f"{title} (red dashed: reference)")
        ax.axis("off")
    fig.suptitle("SegVolGRU: outline after each step (box, then clicks; dark -> light)")
    fig.tight_layout()
    save_figure(fig, path)


def _dice_plot(steps, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(len(steps)), [s["dice"] for s in steps], marker="o")
    ax.set_xticks(range(len(steps)), ["box"] + [str(n) for n in range(1, len(steps))])
    ax.set_xlabel("step (box, then clicks)")
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
