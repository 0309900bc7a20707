"""``segvolgru segment IMAGE PROMPTS.json -o OUT``: files in, a label image in the input's exact geometry out.

Prompts file: ``{"coordinates": "voxel" | "LPS" | "RAS", "box": [[a, b, c], [d, e, f]],
"clicks": [{"point": [a, b, c], "positive": true}, ...], "text": "liver"}``. "voxel" means (k, j, i) indices of the
array as SimpleITK returns it (box corners inclusive). In LPS/RAS (mm) the box is two opposite corners of a
world-axis-aligned box whose 8 corners map to continuous indices; per axis lo = ceil(min − 1e-4),
hi = floor(max + 1e-4), clipped; a click maps to floor(c + 0.5). Clicks run in order as one interactive session.
"""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from .errors import InputError

COORDINATES = ("voxel", "LPS", "RAS")


def read_image(path: str | Path):
    """A SimpleITK image from a file or a DICOM series folder."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.exists():
        raise InputError(f"image {path} does not exist")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            files = reader.GetGDCMSeriesFileNames(str(path))
            if not files:
                raise InputError(f"{path} is a folder without a DICOM series")
            reader.SetFileNames(files)
            return reader.Execute()
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"cannot read image {path}: {str(exc).strip().splitlines()[-1]}") from None


def _continuous_index(image, points_lps: np.ndarray) -> np.ndarray:
    """LPS mm -> continuous (i, j, k) indices."""
    origin = np.asarray(image.GetOrigin())
    spacing = np.asarray(image.GetSpacing())
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return (np.linalg.inv(direction) @ (points_lps - origin).T).T / spacing


def _to_lps(points: np.ndarray, coordinates: str) -> np.ndarray:
    return points * np.array([-1.0, -1.0, 1.0]) if coordinates == "RAS" else points


def prompts_to_voxels(image, prompts: dict, source: str = "prompts") -> tuple[tuple | None, list, str | None]:
    """Parse a prompts dict into (box_kji | None, [((k, j, i), positive)], text)."""
    coordinates = prompts.get("coordinates", "voxel")
    if coordinates not in COORDINATES:
        raise InputError(f"{source}: unknown coordinates {coordinates!r}; use one of {', '.join(COORDINATES)}")
    shape_kji = np.asarray(image.GetSize()[::-1])
    box = None
    if prompts.get("box") is not None:
        corners = np.asarray(prompts["box"], dtype=np.float64)
        if corners.shape != (2, 3):
            raise InputError(f"{source}: 'box' must be two corners [[a, b, c], [d, e, f]]")
        if coordinates == "voxel":
            lo, hi = corners.min(axis=0), corners.max(axis=0)
            box = tuple(int(v) for v in (*lo, *hi))
        else:
            world = np.array([[corners[c][a] for a, c in enumerate(combo)]
                              for combo in itertools.product((0, 1), repeat=3)])
            ijk = _continuous_index(image, _to_lps(world, coordinates))
            lo = np.ceil(ijk.min(axis=0) - 1e-4)[::-1]
            hi = np.floor(ijk.max(axis=0) + 1e-4)[::-1]
            if np.any(hi < 0) or np.any(lo > shape_kji - 1) or np.any(hi < lo):
                raise InputError(f"{source}: the box lies outside the image")
            lo, hi = np.clip(lo, 0, shape_kji - 1), np.clip(hi, 0, shape_kji - 1)
            box = tuple(int(v) for v in (*lo, *hi))
    clicks = []
    for n, click in enumerate(prompts.get("clicks") or []):
        if "point" not in click or "positive" not in click:
            raise InputError(f"{source}: click {n} needs 'point' and 'positive'")
        point = np.asarray(click["point"], np.float64)
        if coordinates == "voxel":
            voxel = np.floor(point + 0.5).astype(int)
        else:
            voxel = np.floor(_continuous_index(image, _to_lps(point[None], coordinates))[0] + 0.5).astype(int)[::-1]
        if np.any(voxel < 0) or np.any(voxel >= shape_kji):
            raise InputError(f"{source}: click {n} at {click['point']} ({coordinates}) lies outside the image")
        clicks.append((tuple(int(v) for v in voxel), bool(click["positive"])))
    text = prompts.get("text")
    if box is None and not clicks and not text:
        raise InputError(f"{source}: no prompt: give a 'box', 'clicks' or 'text'")
    return box, clicks, text


def segment_file(image_path, prompts_path, output, weights=None, device: str = "cpu", gru: bool = True) -> dict:
    import SimpleITK as sitk

    from .demo import pick_model
    from .device import resolve_device
    from .session import InteractiveSession

    image = read_image(image_path)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{image_path}: a 3-D single-component image is needed, got {image.GetDimension()}-D with "
                         f"{image.GetNumberOfComponentsPerPixel()} components")
    try:
        prompts = json.loads(Path(prompts_path).read_text())
    except FileNotFoundError:
        raise InputError(f"prompts file {prompts_path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"prompts file {prompts_path} is not valid JSON: {exc}") from None
    box, clicks, text = prompts_to_voxels(image, prompts, str(prompts_path))
    loaded = pick_model(weights)
    model = loaded.model.to(resolve_device(device))
    volume = sitk.GetArrayFromImage(image)
    if box is None and not clicks:
        from .inference import segment

        mask = segment(model, volume, text=text).mask  # text alone: the official zoom-out-zoom-in
    else:
        session = InteractiveSession(model, volume, spacing=image.GetSpacing()[::-1], gru=gru, text=text)
        if box is not None:
            session.set_box(box)
        for voxel, positive in clicks:
            session.add_click(voxel, positive)
        mask = session.mask
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    label = sitk.GetImageFromArray(mask)
    label.CopyInformation(image)
    if str(out).endswith(".seg.nrrd"):
        _write_seg_nrrd(image, mask, out)
    else:
        sitk.WriteImage(label, str(out), useCompression=True)
    return {"output": str(out), "voxels": int(mask.sum()), "weights": loaded.description,
            "box_kji": list(box) if box else None, "clicks_kji": [list(v) for v, _ in clicks]}


def _write_seg_nrrd(image, mask: np.ndarray, out: Path) -> None:
    """Through the MRML bridge, so Slicer opens it as a segmentation over the image."""
    from .slicer_bridge import HeadlessSlicer, ensure_segment, new_volume_node, save_seg_nrrd, write_segment_mask

    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    direction = lps_to_ras @ np.asarray(image.GetDirection()).reshape(3, 3)
    origin = lps_to_ras @ np.asarray(image.GetOrigin())
    headless = HeadlessSlicer()
    volume_node = new_volume_node(headless.scene, np.zeros(mask.shape, np.uint8), image.GetSpacing(), origin,
                                  direction, "Reference")
    seg = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "SegVolGRU")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    write_segment_mask(seg, ensure_segment(seg, "Structure"), mask, volume_node)
    save_seg_nrrd(seg, out)
    headless.close()
