"""``segvolgru bench``: speed and memory of preprocessing, encoders, the first box and a click.

Official configuration with the golden synthetic weights (the official file when present) on a generated
300x512x512 int16 CT-like volume. Random weights would make the ROI arbitrary, so the zoom-in ROI is forced to a
liver-sized 150x250x250 region: for the official pipeline by handing it a zoom-out mask of that region, for the
interactive session by a model copy whose mask head predicts background (then the ROI is the user's box). Values
do not change any cost. Preprocessing is excluded from the click figures. ``click_session_s_at_200`` is the median
click at clicks 151-200 of one long session (with a correction module, on a 32x64x64 volume, so that it stays
quick): a click whose cost grew with the clicks before it shows there. The last printed line is JSON.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import sys
import time

import numpy as np
import torch

from .cache import EmbeddingCache, content_key
from .config import OFFICIAL_CONFIG, TINY_CONFIG, SegVolConfig
from .correction import CorrectionConfig
from .device import describe_device, resolve_device
from .engine import Engine, Timings
from .inference import _zoom_in
from .network import SegVol, build_model
from .prompts import box_to_zoom_out, points_to_zoom_out
from .session import InteractiveSession
from .synthetic_weights import synthetic_state_for
from .validation import positive_int


def ct_like_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """int16 HU: air, an elliptic body of soft tissue with noise, and a brighter organ."""
    rng = np.random.default_rng(seed)
    k, j, i = np.ogrid[:shape[0], :shape[1], :shape[2]]
    body = ((j - shape[1] / 2) / (0.45 * shape[1])) ** 2 + ((i - shape[2] / 2) / (0.48 * shape[2])) ** 2 < 1
    volume = np.ascontiguousarray(np.broadcast_to(np.where(body, 40, -1000), shape), dtype=np.int16)
    volume += rng.normal(0, 15, shape).astype(np.int16)
    volume[shape[0] // 4: shape[0] // 4 + shape[0] // 2, shape[1] // 4: shape[1] // 2, shape[2] // 4: shape[2] // 2] += 60
    return volume


def _peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MB (None where the platform has no ``resource`` module)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _model(config: SegVolConfig, device: torch.device) -> SegVol:
    model = build_model(config)
    model.load_state_dict(synthetic_state_for(model))
    return model.to(device).eval()


def _background_copy(model: SegVol) -> SegVol:
    quiet = copy.deepcopy(model)
    with torch.no_grad():
        quiet.mask_decoder.output_upscaling[3].bias.fill_(3.0)
        last = quiet.mask_decoder.output_hypernetworks_mlps[0].layers[-1]
        last.weight.zero_()
        last.bias.fill_(-5.0)
    return quiet


def long_session_click_s(config: SegVolConfig, device: torch.device, clicks: int = 200,
                         shape: tuple[int, int, int] = (32, 64, 64)) -> float:
    """Median seconds of clicks ``clicks - 49`` to ``clicks`` of one session with the GRU correction on, random clicks
    of alternating polarity inside a box in the middle half of a ``shape`` volume (the ROI is the box)."""
    model = _background_copy(_model(dataclasses.replace(config, correction=CorrectionConfig().to_dict()), device))
    volume = ct_like_volume(shape)
    lo, hi = np.asarray(shape) // 4, 3 * np.asarray(shape) // 4 - 1
    session = InteractiveSession(model, volume, cache=EmbeddingCache())
    session.set_box((*lo.tolist(), *hi.tolist()))
    rng = np.random.default_rng(2)
    times = []
    for n in range(clicks):
        voxel = tuple(int(v) for v in rng.integers(lo, hi + 1))
        begin = time.perf_counter()
        session.add_click(voxel, positive=bool(n % 2 == 0))
        times.append(time.perf_counter() - begin)
    return statistics.median(times[-50:])


def run_bench(quick: bool = False, device: str = "auto", threads: int | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    config = TINY_CONFIG if quick else OFFICIAL_CONFIG
    shape = (60, 128, 128) if quick else (300, 512, 512)
    roi_size = (30, 60, 60) if quick else (150, 250, 250)
    model = _model(config, dev)
    volume = ct_like_volume(shape)
    engine = Engine(model, EmbeddingCache())
    out: dict = {"config": "tiny" if quick else "official", "volume": list(shape), "roi": list(roi_size),
                 "device": describe_device(dev), "threads": torch.get_num_threads()}

    start = time.perf_counter()
    key = content_key(volume)
    out["content_key_s"] = time.perf_counter() - start
    start = time.perf_counter()
    prepared = engine.prepare(volume, key)  # the preprocessing, once; the key is timed on its own above
    out["preprocess_s"] = time.perf_counter() - start

    start = time.perf_counter()
    engine._encode(torch.from_numpy(prepared.pre.zoom_out))
    out["encoder_window_s"] = time.perf_counter() - start

    centre = np.asarray(prepared.crop_shape) // 2
    lo = np.maximum(centre - np.asarray(roi_size) // 2, 0)
    hi = np.minimum(lo + np.asarray(roi_size), prepared.crop_shape) - 1
    forced = torch.full(prepared.crop_shape, -1.0)
    forced[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = 1.0
    box = (*lo.tolist(), *hi.tolist())
    click = tuple(int(v) for v in centre)

    def official(points, labels) -> float:
        timings = Timings()
        begin = time.perf_counter()
        zoom_box = box_to_zoom_out(box, prepared.crop_shape, config.spatial_size)
        zoom_points = points_to_zoom_out(points, prepared.crop_shape, config.spatial_size)
        emb = engine.zoom_out_embedding(prepared, timings)
        engine.decode(emb, ("zoom_out", prepared.key), zoom_box, zoom_points, labels, None, None, timings)
        _zoom_in(engine, prepared, forced.clone(), zoom_box, zoom_points, labels, points, None, None, 0.5, 0,
                 timings, False)
        return time.perf_counter() - begin

    no_points = np.zeros((0, 3), np.int64)
    out["first_box_s"] = official(no_points, np.zeros(0, np.int64))
    pts, labs = np.asarray([click], np.int64), np.asarray([1], np.int64)
    out["click_cached_s"] = official(pts, labs)
    engine.cache.clear()
    out["click_recompute_s"] = official(pts, labs)
    out["cache_speedup"] = out["click_recompute_s"] / max(out["click_cached_s"], 1e-9)
    out["windows"] = len([k for k in engine.cache._items if k[0] == "window"])

    crop_start = np.asarray(prepared.pre.crop_start)
    quiet = _background_copy(model)
    # the official overlap 0.5 puts every click in two windows; overlap 0 (the fast-preview option) in one
    for name, overlap in (("click_session_s", 0.5), ("click_session_overlap0_s", 0.0)):
        session = InteractiveSession(quiet, volume, cache=EmbeddingCache(), overlap=overlap)
        session.set_box((*(lo + crop_start).tolist(), *(hi + crop_start).tolist()))
        times = []
        rng = np.random.default_rng(1)
        for n in range(5):
            voxel = tuple(int(v) for v in rng.integers(lo, hi + 1) + crop_start)
            begin = time.perf_counter()
            session.add_click(voxel, positive=bool(n % 2 == 0))
            times.append(time.perf_counter() - begin)
        out[name] = statistics.median(times)
        del session
    out["click_session_s_at_200"] = long_session_click_s(config, dev)
    out["peak_rss_mb"] = _peak_rss_mb()
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="segvolgru bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small configuration that runs in seconds")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args(argv)
    result = run_bench(args.quick, args.device, args.threads)
    if not args.json:
        for key, value in result.items():
            print(f"{key:>20}: {value}", file=sys.stderr)
    print(json.dumps(result))
    return 0
