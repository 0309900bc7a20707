"""``segvolgru segment IMAGE PROMPTS.json -o OUT``: files in, a label image in the input's exact geometry out.

Prompts file: ``{"coordinates": "voxel" | "LPS" | "RAS", "box": [[a, b, c], [d, e, f]],
"clicks": [{"point": [a, b, c], "positive": true}, ...], "text": "liver"}``. "voxel" means (k, j, i) indices of the
array as SimpleITK returns it (box corners inclusive, rounded to the nearest voxel). ``positive`` is a JSON boolean
(or 1 / 0); unknown keys are refused. In LPS/RAS (mm) the box is two opposite corners of a
world-axis-aligned box whose 8 corners map to continuous indices; per axis lo = ceil(min − 1e-4),
hi = floor(max + 1e-4), clipped; a click maps to floor(c + 0.5). Clicks run in order as one interactive session.

Output: ``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha`` or ``.seg.nrrd``, written atomically. An image with a sheared
(non-orthogonal) direction matrix is written only as ``.nrrd`` or ``.mha``, which store it exactly.
"""
from __future__ import annotations

import errno
import itertools
import json
import numbers
from pathlib import Path

import numpy as np

from .errors import InputError
from .files import check_output_file, readable, write_atomic
from .validation import as_polarity, validate_spacing

COORDINATES = ("voxel", "LPS", "RAS")
PROMPT_KEYS = ("coordinates", "box", "clicks", "text")
CLICK_KEYS = ("point", "positive")
# Longest first, so that a name is matched by its whole suffix (.seg.nrrd before .nrrd).
OUTPUT_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")
# A sheared (non-orthogonal) direction survives only in these: NIfTI would store it rotated and MRML's
# segmentation geometry refuses it.
SHEAR_SAFE_SUFFIXES = (".nrrd", ".mha")


def read_image(path: str | Path):
    """A SimpleITK image from a file or a DICOM series folder."""
    import SimpleITK as sitk

    path = readable(path, "image", folder=True)
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


def read_prompts(path: str | Path) -> dict:
    """The prompts file's JSON object (its structure is checked by :func:`prompts_to_voxels`)."""
    path = readable(path, "prompts file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"prompts file {path} is not UTF-8 text (a binary file?): give a JSON file") from None
    except OSError as exc:
        raise InputError(f"prompts file {path} is not readable: {exc.strerror or exc}") from None
    try:
        prompts = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"prompts file {path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise InputError(f"prompts file {path} nests too deeply to be a prompts file: give a flat JSON object "
                         "{\"box\": ..., \"clicks\": ...}") from None
    if not isinstance(prompts, dict):
        raise InputError(f"prompts file {path}: the top level must be a JSON object {{\"box\": ..., \"clicks\": ...}}, "
                         f"got {type(prompts).__name__}")
    return prompts


def _numbers(value, shape: tuple[int, ...], source: str, what: str, form: str) -> np.ndarray:
    """``value`` as a float array of ``shape`` whose entries are finite JSON numbers (not strings, null or bool)."""
    try:
        entries = np.asarray(value, dtype=object)
    except ValueError:
        entries = np.empty(0, dtype=object)
    if entries.shape != shape or not all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                                         for v in entries.ravel()):
        raise InputError(f"{source}: {what} must be {form} of numbers, got {value!r}")
    values = entries.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise InputError(f"{source}: {what} must be finite numbers, got {value!r}")
    return values


def _continuous_index(image, points_lps: np.ndarray) -> np.ndarray:
    """LPS mm -> continuous (i, j, k) indices."""
    origin = np.asarray(image.GetOrigin())
    spacing = np.asarray(image.GetSpacing())
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return (np.linalg.inv(direction) @ (points_lps - origin).T).T / spacing


def _to_lps(points: np.ndarray, coordinates: str) -> np.ndarray:
    return points * np.array([-1.0, -1.0, 1.0]) if coordinates == "RAS" else points


def prompts_to_voxels(image, prompts: dict, source: str = "prompts") -> tuple[tuple | None, list, str | None]:
    """Parse a prompts dict into (box_kji | None, [((k, j, i), positive)], text).

    ``positive`` is a JSON boolean (or the integer 1 / 0); anything else, such as the string "false", is refused.
    """
    from .prompts import validate_box

    if not isinstance(prompts, dict):
        raise InputError(f"{source}: prompts must be a JSON object, got {type(prompts).__name__}")
    unknown = sorted(set(prompts) - set(PROMPT_KEYS))
    if unknown:
        raise InputError(f"{source}: unknown keys {unknown}; a prompts file has {', '.join(PROMPT_KEYS)}")
    coordinates = prompts.get("coordinates", "voxel")
    if coordinates not in COORDINATES:
        raise InputError(f"{source}: unknown coordinates {coordinates!r}; use one of {', '.join(COORDINATES)}")
    shape_kji = np.asarray(image.GetSize()[::-1])
    box = None
    if prompts.get("box") is not None:
        corners = _numbers(prompts["box"], (2, 3), source, "'box'", "two corners [[a, b, c], [d, e, f]]")
        if coordinates == "voxel":
            try:
                box = validate_box((*corners.min(axis=0), *corners.max(axis=0)), tuple(shape_kji))
            except InputError as exc:
                raise InputError(f"{source}: {exc}") from None
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
    listed = prompts.get("clicks") or []
    if not isinstance(listed, list):
        raise InputError(f"{source}: 'clicks' must be a list of {{\"point\": [a, b, c], \"positive\": true}}")
    for n, click in enumerate(listed):
        if not isinstance(click, dict) or "point" not in click or "positive" not in click:
            raise InputError(f"{source}: click {n} must be an object with 'point' and 'positive', got {click!r}")
        unknown = sorted(set(click) - set(CLICK_KEYS))
        if unknown:
            raise InputError(f"{source}: click {n} has unknown keys {unknown}; a click has 'point' and 'positive'")
        point = _numbers(click["point"], (3,), source, f"click {n} 'point'", "three coordinates [a, b, c]")
        positive = as_polarity(click["positive"], f"{source}: click {n}")
        if coordinates == "voxel":
            voxel = np.floor(point + 0.5)
        else:
            voxel = np.floor(_continuous_index(image, _to_lps(point[None], coordinates))[0] + 0.5)[::-1]
        if np.any(voxel < 0) or np.any(voxel >= shape_kji):
            raise InputError(f"{source}: click {n} at {click['point']} ({coordinates}) lies outside the image")
        clicks.append((tuple(int(v) for v in voxel), positive))
    text = prompts.get("text")
    if text is not None and not isinstance(text, str):
        raise InputError(f"{source}: 'text' must be a string such as \"liver\", got {text!r}")
    if box is None and not clicks and not text:
        raise InputError(f"{source}: no prompt: give a 'box', 'clicks' or 'text'")
    return box, clicks, text


def _check_geometry_fits(image, image_path, out: Path) -> None:
    """Refuse a sheared direction that the output format cannot store exactly."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    suffix = next(s for s in OUTPUT_SUFFIXES if out.name.endswith(s))
    if np.abs(direction.T @ direction - np.eye(3)).max() > 1e-4 and suffix not in SHEAR_SAFE_SUFFIXES:
        raise InputError(f"{image_path} has a sheared (non-orthogonal) direction matrix, which a {suffix} file "
                         "cannot store exactly (the label would come out rotated or be refused): write the label as "
                         ".nrrd or .mha, which store it exactly")


def segment_file(image_path, prompts_path, output, weights=None, device: str = "cpu", gru: bool = True,
                 correction="default") -> dict:
    """Segment ``image_path`` with the prompts of ``prompts_path`` and write the label to ``output``.

    Everything that can be checked without the model is checked first: an output that resolves to an input
    (image, prompts, weights), is a folder, has an unknown suffix or lies under a file is refused before any
    inference; the label is written atomically (the previous file survives a failed write).
    """
    import SimpleITK as sitk

    from .demo import pick_model
    from .device import resolve_device
    from .session import InteractiveSession
    from .weights import resolve_weights

    corrector = None if correction is None or correction == "default" else correction
    out = check_output_file(output, (image_path, prompts_path, resolve_weights(weights), corrector), OUTPUT_SUFFIXES)
    image = read_image(image_path)
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{image_path}: a 3-D single-component image is needed, got {image.GetDimension()}-D with "
                         f"{image.GetNumberOfComponentsPerPixel()} components")
    spacing = validate_spacing(image.GetSpacing()[::-1], f"{image_path}: spacing")
    _check_geometry_fits(image, image_path, out)
    box, clicks, text = prompts_to_voxels(image, read_prompts(prompts_path), str(prompts_path))
    loaded = pick_model(weights, correction=correction)
    model = loaded.model.to(resolve_device(device))
    volume = sitk.GetArrayFromImage(image)
    if box is None and not clicks:
        from .inference import segment

        mask = segment(model, volume, text=text).mask  # text alone: the official zoom-out-zoom-in
    else:
        session = InteractiveSession(model, volume, spacing=spacing, gru=gru, text=text)
        if box is not None:
            session.set_box(box)
        for voxel, positive in clicks:
            session.add_click(voxel, positive)
        mask = session.mask
    if out.name.endswith(".seg.nrrd"):
        write_atomic(out, lambda temporary: _write_seg_nrrd(image, mask, temporary))
    else:
        write_atomic(out, lambda temporary: _write_label(image, mask, temporary))
    return {"output": str(out), "voxels": int(mask.sum()), "weights": loaded.description,
            "box_kji": list(box) if box else None, "clicks_kji": [list(v) for v, _ in clicks]}


def _write_label(image, mask: np.ndarray, out: Path) -> None:
    """A label image in ``image``'s geometry, read back: ITK's NIfTI writer reports a short write (file-size limit,
    full disk) only on the terminal, so a file that does not read back as the mask is an error here."""
    import SimpleITK as sitk

    label = sitk.GetImageFromArray(mask)
    label.CopyInformation(image)
    sitk.WriteImage(label, str(out), useCompression=True)
    try:
        whole = np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), mask)
    except RuntimeError:
        whole = False
    if not whole:
        raise OSError(errno.EIO, "the written file does not read back as the label (a short write: disk full or a "
                                 "file-size limit?)")


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
    try:
        write_segment_mask(seg, ensure_segment(seg, "Structure"), mask, volume_node)
        save_seg_nrrd(seg, out)
    finally:
        headless.close()
