"""Whole-volume SegVol inference: the official zoom-out-zoom-in, step by step (``mode="official"``).

Follows BAAI-DCAI/SegVol ``inference_demo.py`` and its ``sliding_window_inference``: preprocessing, zoom-out pass,
nearest upsampling of its logits to the crop, ROI from the zoom-out mask with the official padding rule, sliding
windows over the ROI with window-local prompts, and back-fill of the stitched window logits. Volumes and prompts are
(K, J, I) voxel indices of the caller's array; the array is never modified or permuted.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .cache import EmbeddingCache, shared_cache
from .engine import Engine, PreparedVolume, Roi, Timings
from .errors import InputError
from .network import SegVol
from .preprocessing import check_volume
from .prompts import (
    Box, box_cube, box_of, box_to_zoom_out, clip_box, point_map, points_to_zoom_out, sample_window_points,
    upsample_nearest, upsample_nearest_region, validate_box, validate_points,
)
from .windows import Stitcher, WindowGrid, bounding_box, window_grid

MODES = ("official", "interactive")


@dataclass
class WindowTrace:
    """One zoom-in window: its start in the padded ROI crop and the prompts it was decoded with."""

    start: tuple[int, int, int]
    box: Box | None
    points: np.ndarray | None
    point_labels: np.ndarray | None
    low_res_logits: np.ndarray


@dataclass
class SegmentResult:
    """``mask`` (uint8, the volume's shape); ``logits`` (float32, the crop's shape); ``crop_start`` (K, J, I).

    Traced runs also fill the zoom-out prompts and logits, the ROI (inclusive crop voxels) and the windows.
    """

    mask: np.ndarray
    logits: np.ndarray
    crop_start: tuple[int, int, int]
    timings: dict[str, float] = field(default_factory=dict)
    zoom_out_box: Box | None = None
    zoom_out_points: np.ndarray | None = None
    zoom_out_point_labels: np.ndarray | None = None
    zoom_out_low_res_logits: np.ndarray | None = None
    zoom_out_logits: np.ndarray | None = None
    roi: Roi | None = None
    windows: list[WindowTrace] | None = None


def official_roi(pred: torch.Tensor, window: tuple[int, int, int]) -> Roi | None:
    """Bounding box of a boolean (K, J, I) mask grown to at least the window where the crop allows (the official
    ``logits2roi_coor``: half the shortfall on each side, clamped to [0, dim]); returned inclusive, clipped to
    dim − 1. None when the mask is empty."""
    found = bounding_box(pred)
    if found is None:
        return None
    lo, hi = found[:3], found[3:]
    shape = pred.shape
    roi_lo, roi_hi = [], []
    for axis in range(3):
        pad = max(0, window[axis] - (hi[axis] - lo[axis] + 1))
        roi_lo.append(max(0, lo[axis] - pad // 2))
        # The official clamps to dim (not dim - 1) and slices to max + 1: the same voxels as clipping to dim - 1.
        roi_hi.append(min(shape[axis] - 1, hi[axis] + pad // 2))
    return (*roi_lo, *roi_hi)  # type: ignore[return-value]


def roi_slices(roi: Roi) -> tuple[slice, slice, slice]:
    return tuple(slice(roi[a], roi[a + 3] + 1) for a in range(3))  # type: ignore[return-value]


def prompts_in_crop(prepared: PreparedVolume, box: Box | None, points: np.ndarray) -> tuple[Box | None, np.ndarray]:
    """Volume voxels -> crop voxels. A box must meet the foreground crop; clicks outside it are clamped to it."""
    start = np.asarray(prepared.pre.crop_start)
    crop_box = None
    if box is not None:
        shifted = tuple(int(v) for v in np.concatenate([np.asarray(box[:3]) - start, np.asarray(box[3:]) - start]))
        crop_box = clip_box(shifted, prepared.crop_shape)  # type: ignore[arg-type]
        if crop_box is None:
            raise InputError(
                f"the box {box} lies entirely in the background region outside the image content (voxels "
                f"{prepared.pre.crop_start} to {tuple(np.asarray(prepared.pre.crop_stop) - 1)}): place it on the "
                "structure")
    crop_points = np.clip(points - start, 0, np.asarray(prepared.crop_shape) - 1) if len(points) else points
    return crop_box, crop_points


def _zoom_out(engine: Engine, prepared: PreparedVolume, crop_box, crop_points, labels, text, text_emb, timings):
    spatial = engine.window
    zoom_box = box_to_zoom_out(crop_box, prepared.crop_shape, spatial) if crop_box is not None else None
    zoom_points = points_to_zoom_out(crop_points, prepared.crop_shape, spatial) if len(crop_points) else crop_points
    embedding = engine.zoom_out_embedding(prepared, timings)
    low_res = engine.decode(embedding, ("zoom_out", prepared.key), zoom_box, zoom_points, labels, text_emb, text,
                            timings)
    return zoom_box, zoom_points, low_res


def _window_prompts(index: int, grid: WindowGrid, maps: dict[str, torch.Tensor], crop_points: np.ndarray,
                    labels: np.ndarray, roi: Roi, has_box: bool, generator: torch.Generator):
    """Window-local prompts as the official box and point modes build them (box and points together: the box
    mode's box plus the user's clicks that fall in the window)."""
    sl = grid.window_slices(index)
    box = points = point_labels = None
    if has_box:
        source = maps["cube"] if len(grid.starts) == 1 else maps["preds"]
        box = box_of(source[sl])
        if len(crop_points):
            local = crop_points - np.asarray(roi[:3]) + np.asarray(grid.pad_before) - np.asarray(grid.starts[index])
            inside = np.all((local >= 0) & (local < np.asarray(grid.window)), axis=1)
            if inside.any():
                points, point_labels = local[inside], labels[inside]
    elif "points" in maps:
        points, point_labels = sample_window_points(maps["points"][sl], generator)
        box = box_of(maps["preds"][sl])
    return box, points, point_labels


def _zoom_in(engine: Engine, prepared: PreparedVolume, logits_crop: torch.Tensor, zoom_box, zoom_points, labels,
             crop_points, text, text_emb, overlap: float, seed: int, timings: Timings, trace: bool):
    spatial = engine.window
    roi = official_roi(torch.sigmoid(logits_crop) > 0.5, spatial)
    if roi is None:
        return None, []
    sl = roi_slices(roi)
    grid = window_grid(tuple(r1 - r0 + 1 for r0, r1 in zip(roi[:3], roi[3:])), spatial, overlap)
    maps = {"preds": grid.pad((torch.sigmoid(logits_crop[sl]) > 0.5).float())}
    # The official pads only the zoom-out mask and forgets the prompt maps, which shifts them in crops smaller
    # than a window; both are padded here.
    if zoom_box is not None:
        maps["cube"] = grid.pad(upsample_nearest_region(box_cube(zoom_box, spatial), prepared.crop_shape, sl))
    if len(zoom_points):
        maps["points"] = grid.pad(upsample_nearest_region(point_map(zoom_points, labels, spatial),
                                                          prepared.crop_shape, sl))
    padded_image = grid.pad(prepared.image[sl])
    generator = torch.Generator().manual_seed(int(seed))
    stitcher = Stitcher(grid)
    windows: list[WindowTrace] = []
    for index in range(len(grid.starts)):
        box, points, point_labels = _window_prompts(index, grid, maps, crop_points, labels, roi,
                                                    zoom_box is not None, generator)
        embedding = engine.window_embedding(prepared, roi, grid, index, padded_image, timings)
        low_res = engine.decode(embedding, ("window", prepared.key, roi, grid.starts[index]), box, points,
                                point_labels, text_emb, text, timings)
        start = time.perf_counter()
        stitcher.add(index, engine.upsample(low_res))
        timings.add("stitch_s", time.perf_counter() - start)
        if trace:
            windows.append(WindowTrace(grid.starts[index], box, points, point_labels, low_res[0, 0].numpy()))
    logits_crop[sl] = stitcher.result()
    return roi, windows


def segment_official(engine: Engine, volume: np.ndarray, box=None, points=None, point_labels=None, text=None,
                     seed: int = 0, trace: bool = False, overlap: float = 0.5, zoom_in: bool = True) -> SegmentResult:
    """The official zoom-out-zoom-in for one target (see :func:`segment`)."""
    timings = Timings()
    started = time.perf_counter()
    box = validate_box(box, volume.shape)
    pts, labels = validate_points(points, point_labels, volume.shape)
    if box is None and not len(pts) and text is None:
        raise InputError("no prompt given: give a box, at least one click, or a text prompt")
    text_emb = engine.text_embedding(text)
    prepared = engine.prepare(volume)
    timings.add("preprocess_s", time.perf_counter() - started)
    crop_box, crop_points = prompts_in_crop(prepared, box, pts)
    zoom_box, zoom_points, zoom_low = _zoom_out(engine, prepared, crop_box, crop_points, labels, text, text_emb,
                                                timings)
    zoom_logits = engine.upsample(zoom_low)
    logits_crop = upsample_nearest(zoom_logits, prepared.crop_shape)
    roi = windows = None
    if zoom_in:
        roi, windows = _zoom_in(engine, prepared, logits_crop, zoom_box, zoom_points, labels, crop_points, text,
                                text_emb, overlap, seed, timings, trace)
    result = _result(prepared, logits_crop, timings, started)
    if trace:
        result.zoom_out_box = zoom_box
        result.zoom_out_points = zoom_points.copy()
        result.zoom_out_point_labels = labels.copy()
        result.zoom_out_low_res_logits = zoom_low[0, 0].numpy()
        result.zoom_out_logits = zoom_logits.numpy()
        result.roi = roi
        result.windows = windows
    return result


def _result(prepared: PreparedVolume, logits_crop: torch.Tensor, timings: Timings, started: float) -> SegmentResult:
    mask = np.zeros(prepared.shape, dtype=np.uint8)
    crop = tuple(slice(a, b) for a, b in zip(prepared.pre.crop_start, prepared.pre.crop_stop))
    mask[crop] = (torch.sigmoid(logits_crop) > 0.5).numpy()
    timings.add("total_s", time.perf_counter() - started)
    values = dict(timings.values, encoder_runs=timings.encoder_runs, decoder_runs=timings.decoder_runs)
    return SegmentResult(mask, logits_crop.numpy(), tuple(prepared.pre.crop_start), values)


_last_engine: Engine | None = None


def engine_for(model: SegVol, cache: EmbeddingCache | None = None, precision: str = "fp32") -> Engine:
    """The engine of the latest (model, cache, precision), so that repeated :func:`segment` calls share
    preprocessing and embeddings; only one is kept so that a discarded model is not held alive."""
    global _last_engine
    wanted = cache if cache is not None else shared_cache()
    last = _last_engine
    if last is None or last.model is not model or last.cache is not wanted or last.precision != precision:
        _last_engine = Engine(model, wanted, precision)
    return _last_engine


def segment(model: SegVol, volume: np.ndarray, *, box=None, points=None, point_labels=None, text: str | None = None,
            mode: str = "official", seed: int = 0, trace: bool = False, overlap: float = 0.5, zoom_in: bool = True,
            cache: EmbeddingCache | None = None, precision: str = "fp32") -> SegmentResult:
    """Segment one structure of a (K, J, I) volume.

    ``box``: inclusive voxel corners (k0, j0, i0, k1, j1, i1); ``points``: (N, 3) voxels (k, j, i) with
    ``point_labels`` 1 = positive, 0 = negative; ``text``: an organ name (models with a text tower). ``mode``
    "official" reproduces the official pipeline (seeded random extra points in point-mode windows); "interactive"
    replays the prompts through a fresh :class:`~segvolgru.session.InteractiveSession`. ``overlap`` of the
    zoom-in windows (0 = fast preview); ``zoom_in=False`` returns the zoom-out result. ``precision`` "bf16" or
    "fp16" runs the network under autocast on a CUDA model (CPU always computes in fp32).
    """
    check_volume(volume)  # before the prompts, so that a volume problem is reported as one
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}: use one of {', '.join(MODES)}")
    engine = engine_for(model, cache, precision)
    if mode == "interactive":
        from .session import replay_segment

        return replay_segment(engine, volume, box=box, points=points, point_labels=point_labels, text=text,
                              trace=trace, overlap=overlap, zoom_in=zoom_in)
    return segment_official(engine, volume, box, points, point_labels, text, seed, trace, overlap, zoom_in)
