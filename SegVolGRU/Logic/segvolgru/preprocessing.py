"""SegVol's official preprocessing (BAAI-DCAI/SegVol `data_process/demo_data_process.py`), exact and fast.

The official chain, on a float32 copy of the raw volume (axis order (K, J, I) = (D, H, W), axis 0 the slice axis):

1. ForegroundNormalization: t = mean of all voxels; F = voxels strictly above t; lo, hi = the 0.05th and 99.95th
   percentiles of F (numpy 'linear'); mu, sigma = mean and std (ddof 0) of F; clip to [lo, hi];
   (x - mu) / max(sigma, 1e-8).
2. MinMax: subtract the volume minimum, divide by max(new maximum, 1e-8).
3. SpatialPad to at least the spatial size with zeros. It comes before the crop, and zeros never pass the crop's
   x > 0 test, so the pad is cropped away again and has no effect: it is not done here.
4. CropForeground (select x > 0, margin 0): the bounding box of the positive voxels.
5. Zoom-out: resize the crop to `spatial_size` with torch 'nearest-exact' sampling.

How it is made fast:
- One streaming pass over cache-sized chunks, on a few threads (numpy releases the GIL), gathers everything the
  chain needs: the sum (hence t), the maximum of every slice, row and column (for the crop), and the two tails of F
  that hold the percentiles. F depends on t, known only at the end of the pass, so the low tail is collected from a
  band that starts a safe margin below a strided subsample's estimate of t; the tails' far ends come from the same
  subsample. Exact counts verify every guess; a miss falls back to an exact second pass.
- After the clip the chain is an increasing affine map that sends lo to 0 and hi to 1, so in exact arithmetic it is
  (clip(x, lo, hi) - lo) / (hi - lo): mu and sigma cancel. Only the crop is normalised, that way. It differs from
  the official float32 operations by their rounding, below 1e-6 when mu lies near [lo, hi] (checked on the
  subsample's mu; otherwise the official operations are used with the exact mu and sigma).
- The crop is the bounding box of the raw voxels above lo, read off the maxima. The official rounding could map a
  voxel just above lo to 0: when the smallest voxel above lo is that close to it, the exact mu and sigma are
  computed and the official float32 chain decides, by binary search over the domain's ordered values.
- The zoom-out reads only its sampled voxels.
Integer volumes of up to 16 bits are processed in their own dtype (exact in float32); every other dtype is
converted chunk by chunk to float32, as the official does with the whole volume.

Sums are accumulated in float64 (exact for integer volumes). The official accumulates in float32 in the memory
order of the NIfTI array, which is rounding noise of about 1e-6 relative: it can only matter when a voxel value
lies within that noise of the mean.
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import numpy as np

from segvolgru.errors import InputError

DEFAULT_SPATIAL_SIZE = (32, 256, 256)
LOW_PERCENTILE = 0.05
HIGH_PERCENTILE = 99.95
SLAB_VOXELS = 1 << 18
SUBSAMPLE_VOXELS = 1 << 18
CHUNK_VOXELS = 1 << 18
_NATIVE_KINDS = ("i", "u")
_R = TypeVar("_R")
_T = TypeVar("_T")
_SAME_VALUE = ("After SegVol's foreground clipping every voxel has the same value (the 0.05th and 99.95th "
               "percentiles of the bright voxels are equal, as in a binary mask): give an intensity image, not a "
               "label map.")


@dataclass
class Preprocessed:
    """Result of `preprocess`; arrays in (K, J, I) order.

    image: float32 foreground crop after ForegroundNorm then MinMax, values in [0, 1].
    crop_start, crop_stop: inclusive start and exclusive stop of the crop in the input volume, in voxels.
    zoom_out: float32 `image` resized to the spatial size with torch 'nearest-exact' sampling, values in [0, 1].
    """

    image: np.ndarray
    crop_start: tuple[int, int, int]
    crop_stop: tuple[int, int, int]
    zoom_out: np.ndarray


@dataclass(frozen=True)
class _Chain:
    """The official float32 constants: clip bounds, z-score, then min-max."""

    lo: np.float32
    hi: np.float32
    mu: np.float32
    sigma: np.float32
    y_min: np.float32 = np.float32(0)
    z_den: np.float32 = np.float32(1)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Normalise float32 `x` in place with the official operations in the official order; returns `x`."""
        np.clip(x, self.lo, self.hi, out=x)
        np.subtract(x, self.mu, out=x)
        np.divide(x, self.sigma, out=x)
        np.subtract(x, self.y_min, out=x)
        np.divide(x, self.z_den, out=x)
        return x

    def write(self, source: np.ndarray, out: np.ndarray) -> None:
        np.copyto(out, source, casting="unsafe")
        self.apply(out)


@dataclass(frozen=True)
class _Affine:
    """The chain in exact arithmetic, (clip(x, lo, hi) - lo) / (hi - lo); the span is the float32 difference, so
    that lo maps to exactly 0 and hi to exactly 1."""

    lo: np.float32
    hi: np.float32

    def write(self, source: np.ndarray, out: np.ndarray) -> None:
        # clipping a float64 source before its cast to float32 equals clipping after it: lo and hi are float32
        np.clip(source, self.lo, self.hi, out=out, casting="unsafe")
        np.subtract(out, self.lo, out=out)
        np.divide(out, np.float32(self.hi - self.lo), out=out)


def preprocess(volume: np.ndarray, spatial_size: Sequence[int] = DEFAULT_SPATIAL_SIZE) -> Preprocessed:
    """Run SegVol's official preprocessing on a raw (K, J, I) volume of any integer or float dtype.

    `spatial_size` is the zoom-out size (K, J, I) in voxels. The input is never modified or permuted.
    Raises InputError for anything that the official chain cannot turn into a crop.
    """
    size = _check_input(volume, spatial_size)
    if not volume.flags.c_contiguous:
        # Slabs along axis 0 of an F-ordered or transposed array (nibabel's, say) are strided and several times
        # slower to stream than one contiguous copy.
        volume = np.ascontiguousarray(volume)
    domain = _domain_dtype(volume.dtype)
    with ThreadPoolExecutor(max_workers=_workers()) as pool:
        sample = _subsample(volume, domain)
        guess = _guess(sample, domain)
        scan = _scan(volume, domain, guess, pool)
        fast = _fast_bounds(scan, guess, domain)
        if fast is not None:
            transform: _Chain | _Affine = _Affine(fast[0], fast[1])
            cut = fast[2]
        else:
            transform = _chain_from_stats(volume, domain, sample, scan, pool)
            cut = _first_positive(transform, scan.maximum, domain)
        if cut is None:
            raise InputError(_SAME_VALUE)
        start, stop = _crop_box(scan, cut)
        image = _normalised_crop(volume, start, stop, transform, pool)
        zoom_out = _zoom(image, size, pool)
    return Preprocessed(image=image, crop_start=start, crop_stop=stop, zoom_out=zoom_out)


def nearest_exact_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index (int64, in [0, in_size)) of each output voxel of torch 'nearest-exact' on a float32 tensor.

    torch computes the scale in float32 for float32 tensors, so this is floor((o + 0.5) * float32(n / m)) rounded
    to float32 as torch does, which differs from the exact rational formula by one voxel for some size pairs.
    """
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    position = ((np.arange(out_size, dtype=np.float64) + 0.5) * scale).astype(np.float32)
    return np.minimum(np.floor(position).astype(np.int64), in_size - 1)


def check_volume(volume: object) -> None:
    """Raise InputError unless ``volume`` is a 3-D (K, J, I) numpy array of real numbers, each axis >= 2."""
    if not isinstance(volume, np.ndarray):
        raise InputError(f"The volume must be a numpy array, got {type(volume).__name__}: pass the voxel array "
                         "in (K, J, I) order, e.g. slicer.util.arrayFromVolume(node).")
    if volume.dtype.kind not in ("i", "u", "f"):
        raise InputError(f"The volume has dtype {volume.dtype}, which is not real-valued numbers: convert it to an "
                         "integer or float array.")
    if volume.ndim != 3:
        raise InputError(f"The volume has {volume.ndim} dimensions (shape {volume.shape}); expected a 3-D (K, J, I) "
                         "array: drop channel or time axes first.")
    if min(volume.shape) < 2:
        raise InputError(f"The volume has shape {volume.shape}; every axis needs at least 2 voxels: give a 3-D "
                         "volume, not a single slice or line.")


def _check_input(volume: object, spatial_size: object) -> tuple[int, int, int]:
    check_volume(volume)
    if (not isinstance(spatial_size, (tuple, list)) or len(spatial_size) != 3
            or not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0
                       for s in spatial_size)):
        raise InputError(f"spatial_size must be 3 positive integers (K, J, I), got {spatial_size!r}: use e.g. "
                         f"{DEFAULT_SPATIAL_SIZE}.")
    return (int(spatial_size[0]), int(spatial_size[1]), int(spatial_size[2]))


def _domain_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype the passes work in: small integers as they are (exact in float32), everything else as float32."""
    if dtype.kind in _NATIVE_KINDS and dtype.itemsize <= 2:
        return np.dtype(dtype.type)  # native byte order: NIfTI arrays may be big-endian
    return np.dtype(np.float32)


def _workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def _slabs(k_size: int, voxels_per_slice: int) -> list[slice]:
    step = max(1, SLAB_VOXELS // max(1, voxels_per_slice))
    return [slice(k, min(k + step, k_size)) for k in range(0, k_size, step)]


def _chunks(shape: tuple[int, ...]) -> list[tuple[slice, slice]]:
    """(K, J) index ranges of blocks of about CHUNK_VOXELS voxels: whole slices, or rows of one slice."""
    k_size, j_size, i_size = shape
    if j_size * i_size >= CHUNK_VOXELS:
        rows = max(1, CHUNK_VOXELS // i_size)
        return [(slice(k, k + 1), slice(j, min(j + rows, j_size)))
                for k in range(k_size) for j in range(0, j_size, rows)]
    return [(s, slice(0, j_size)) for s in _slabs(k_size, j_size * i_size)]


def _map_slabs(pool: ThreadPoolExecutor, task: Callable[[_T], _R], slabs: list[_T]) -> list[_R]:
    """Run `task` on every slab of `pool` (made with `_workers()` threads), each worker walking its own
    interleaved share: one pool task per worker keeps the scheduling cost out of the slab loop."""
    workers = _workers()
    shares = [slabs[w::workers] for w in range(min(workers, len(slabs)))]
    results = list(pool.map(lambda share: [task(s) for s in share], shares))
    return [results[i % len(shares)][i // len(shares)] for i in range(len(slabs))]


def _as_domain(block: np.ndarray, domain: np.dtype) -> np.ndarray:
    return block if block.dtype == domain else block.astype(domain)


def _subsample(volume: np.ndarray, domain: np.dtype) -> np.ndarray:
    """About SUBSAMPLE_VOXELS voxels on a regular grid, in the domain dtype."""
    step = max(1, round((volume.size / SUBSAMPLE_VOXELS) ** (1 / 3)))
    return _as_domain(volume[::step, ::step, ::step], domain).ravel()


@dataclass(frozen=True)
class _Guess:
    """Where the single pass looks for F's tails: the band (band_floor, low_top] must hold F's low tail and
    [high_bottom, max] its high tail; mu is the subsample's estimate of F's mean."""

    band_floor: np.generic
    low_top: np.generic
    high_bottom: np.generic
    mu: float


def _guess(sample: np.ndarray, domain: np.dtype) -> _Guess | None:
    values = sample.astype(np.float64)
    mean = float(values.mean())
    if not math.isfinite(mean):
        return None  # the scan counts the non-finite voxels and refuses the volume
    # ten standard errors of the sample mean: a strided sample is not random, and a miss only costs a second pass
    margin = 10 * float(values.std()) / math.sqrt(values.size) + 1e-6 * abs(mean)
    if domain.kind in _NATIVE_KINDS:
        info = np.iinfo(domain)
        band_floor = domain.type(max(info.min, math.floor(mean - margin) - 1))
        upper = domain.type(min(info.max, math.ceil(mean + margin)))
    else:
        band_floor, upper = _floor_in(mean - margin), np.float32(mean + margin)
    # the low end from the smallest F the mean allows, the high end from the largest: both err on the safe side
    low_top = _tail_bounds(sample, upper, domain)
    high_bottom = _tail_bounds(sample, band_floor, domain)
    foreground = values[values > mean]
    if low_top is None or high_bottom is None or foreground.size == 0:
        return None
    return _Guess(band_floor, low_top[0], high_bottom[1], float(foreground.mean()))


@dataclass
class _Scan:
    """Totals of the single pass, in the domain dtype."""

    count: int
    total: float | int
    maximum: np.generic
    slice_max: np.ndarray  # (K,) maximum of each slice
    row_max: np.ndarray    # (J,) maximum over K and I
    column_max: np.ndarray  # (I,) maximum over K and J
    above: int             # voxels above the band floor
    band: np.ndarray       # sorted values in (band_floor, low_top]
    high: np.ndarray       # sorted values >= high_bottom


def _scan(volume: np.ndarray, domain: np.dtype, guess: _Guess | None, pool: ThreadPoolExecutor) -> _Scan:
    exact = domain.kind in _NATIVE_KINDS
    chunks = _chunks(volume.shape)
    rows = np.empty(volume.shape[:2], dtype=domain)
    longest = max((k.stop - k.start) * (j.stop - j.start) for k, j in chunks) * volume.shape[2]
    # per-thread scratch: fresh chunk-sized arrays would cost page faults on every chunk
    scratch = threading.local()

    def task(chunk: tuple[slice, slice]) -> tuple:
        raw = volume[chunk]
        if not hasattr(scratch, "masks"):
            scratch.masks = np.empty((2, longest), dtype=bool)
            scratch.block = np.empty(longest, dtype=domain)
        if raw.dtype == domain:
            block = raw
        else:
            block = scratch.block[:raw.size].reshape(raw.shape)
            np.copyto(block, raw, casting="unsafe")
        np.max(block, axis=2, out=rows[chunk])
        result = [_sum(block, domain), block.max(axis=(0, 1))]
        if guess is not None:
            flat = block.reshape(-1)
            above, inside = scratch.masks[0, :flat.size], scratch.masks[1, :flat.size]
            np.greater(flat, guess.band_floor, out=above)
            np.less_equal(flat, guess.low_top, out=inside)
            np.logical_and(inside, above, out=inside)
            result += [int(np.count_nonzero(above)), flat[inside] if inside.any() else flat[:0]]
            if rows[chunk].max() >= guess.high_bottom:
                np.greater_equal(flat, guess.high_bottom, out=inside)
                result.append(flat[inside])
            else:
                result.append(flat[:0])
        return tuple(result)

    parts = _map_slabs(pool, task, chunks)
    total = sum(p[0] for p in parts) if exact else math.fsum(p[0] for p in parts)
    if not math.isfinite(total):
        bad = sum(int(np.count_nonzero(~np.isfinite(_as_domain(volume[s], domain))))
                  for s in _slabs(volume.shape[0], volume.shape[1] * volume.shape[2]))
        raise InputError(f"The volume has {bad} NaN or infinite voxels (as float32): replace them, e.g. with "
                         "np.nan_to_num, before segmenting.")
    slice_max = rows.max(axis=1)
    empty = np.empty(0, dtype=domain)
    scan = _Scan(volume.size, total, slice_max.max(), slice_max, rows.max(axis=0),
                 np.maximum.reduce([p[1] for p in parts]),
                 sum(p[2] for p in parts) if guess else 0,
                 np.sort(np.concatenate([p[3] for p in parts])) if guess else empty,
                 np.sort(np.concatenate([p[4] for p in parts])) if guess else empty)
    # no voxel above the mean means every voxel equals it
    if not scan.maximum > _threshold(scan, domain):
        raise InputError(f"The volume is constant (every voxel is {scan.maximum}): there is nothing to segment.")
    return scan


def _sum(block: np.ndarray, domain: np.dtype) -> int | float:
    """Exact sum of an integer block, float64 sum of a float32 one."""
    if domain.kind not in _NATIVE_KINDS:
        return float(block.sum(dtype=np.float64))
    rows = block.size // block.shape[-1]
    if (domain.itemsize == 1 and rows < 1 << 23) or (domain == np.int16 and rows < 1 << 16):
        # int32 column sums are faster than an int64 sum, and this few rows cannot overflow them
        return int(block.reshape(rows, -1).sum(axis=0, dtype=np.int32).sum(dtype=np.int64))
    return int(block.sum(dtype=np.int64))


def _threshold(scan: _Scan, domain: np.dtype) -> np.generic:
    """The largest domain value t' with x > mean iff x > t' (F's definition in the domain)."""
    if domain.kind in _NATIVE_KINDS:
        return domain.type(scan.total // scan.count)
    return _floor_in(scan.total / scan.count)


def _fast_bounds(scan: _Scan, guess: _Guess | None,
                 domain: np.dtype) -> tuple[np.float32, np.float32, np.generic | None] | None:
    """(lo, hi, the smallest voxel value above lo, or None when hi == lo) from the single pass, or None when the
    guesses missed or the official rounding could make a difference (then the exact path runs)."""
    if guess is None:
        return None
    threshold = _threshold(scan, domain)
    if not guess.band_floor <= threshold <= guess.low_top:
        return None
    below = int(np.searchsorted(scan.band, threshold, side="right"))
    low_tail = scan.band[below:]
    high_tail = scan.high[np.searchsorted(scan.high, threshold, side="right"):]
    count = scan.above - below
    lo = _percentile_from_tails(low_tail, high_tail, count, LOW_PERCENTILE)
    hi = _percentile_from_tails(low_tail, high_tail, count, HIGH_PERCENTILE)
    if lo is None or hi is None:
        return None
    if not hi > lo:
        return lo, hi, None
    next_index = int(np.searchsorted(low_tail, lo, side="right"))
    if next_index >= low_tail.size:
        return None
    cut = low_tail[next_index]
    lo64, hi64 = float(lo), float(hi)
    # |x - mu| for x in [lo, hi], with a whole (hi - lo) for the subsample's error in mu
    reach = max(abs(hi64 - guess.mu), abs(lo64 - guess.mu)) + (hi64 - lo64)
    # The official float32 steps round x - mu and the z-scores by 2**-24 relative each: a voxel more than
    # 2**-19 * reach above lo keeps a z-score above lo's; with reach <= 4 (hi - lo) the official result stays
    # within a few float32 ulps of the affine form; a span of at least 1e-5 keeps the 1e-8 floors out of play.
    if float(cut) - lo64 <= 2.0 ** -19 * reach or reach > 4 * (hi64 - lo64) or hi64 - lo64 < 1e-5:
        return None
    return lo, hi, cut


def _floor_in(value: float) -> np.float32:
    """The largest float32 <= `value`, so that x > value iff x > it for every float32 x."""
    floor = np.float32(value)
    return np.nextafter(floor, np.float32(-np.inf)) if floor > value else floor


def _chain_from_stats(volume: np.ndarray, domain: np.dtype, sample: np.ndarray, scan: _Scan,
                      pool: ThreadPoolExecutor) -> _Chain:
    """ForegroundNorm and MinMax constants of the whole volume (step 1 and 2 of the official chain)."""
    threshold = _threshold(scan, domain)
    bounds = _tail_bounds(sample, threshold, domain)
    low_tail_top, high_tail_bottom = bounds or (scan.maximum, _next_up(threshold, domain))
    count, sum_d, sum_d2, low_tail, high_tail = _foreground_pass(
        volume, domain, threshold, low_tail_top, high_tail_bottom, pool)
    lo = _percentile_from_tails(low_tail, high_tail, count, LOW_PERCENTILE)
    hi = _percentile_from_tails(low_tail, high_tail, count, HIGH_PERCENTILE)
    if lo is None or hi is None:
        _, _, _, low_tail, high_tail = _foreground_pass(
            volume, domain, threshold, scan.maximum, _next_up(threshold, domain), pool)
        lo = _percentile_from_tails(low_tail, high_tail, count, LOW_PERCENTILE)
        hi = _percentile_from_tails(low_tail, high_tail, count, HIGH_PERCENTILE)
    mean_d = sum_d / count
    variance = max(0.0, float(sum_d2 * count - sum_d * sum_d) / count / count)
    mu = np.float32(float(threshold) + float(mean_d))
    sigma = max(np.float32(math.sqrt(variance)), np.float32(1e-8))
    # with the MinMax constants at their neutral 0 and 1 the chain is exactly ForegroundNorm
    chain = _Chain(lo=lo, hi=hi, mu=mu, sigma=sigma)
    # the volume's minimum is <= lo (a value of F), so the clip sends it to lo
    y_min, y_max = chain.apply(np.array([lo, scan.maximum], dtype=np.float32))
    return _Chain(lo=lo, hi=hi, mu=mu, sigma=sigma, y_min=y_min,
                  z_den=max(np.float32(y_max - y_min), np.float32(1e-8)))


def _next_up(value: np.generic, domain: np.dtype) -> np.generic:
    if domain.kind in _NATIVE_KINDS:
        return domain.type(int(value) + 1)
    return np.nextafter(value, np.float32(np.inf))


def _tail_bounds(sample: np.ndarray, threshold: np.generic,
                 domain: np.dtype) -> tuple[np.generic, np.generic] | None:
    """Bounds that most likely enclose the two percentiles of {x > threshold}, from the subsample: (top of the low
    tail, bottom of the high tail), or None when no sampled voxel lies above the threshold. Callers verify them
    against exact counts."""
    above = sample[sample > threshold]
    m = above.size
    if m == 0:
        return None
    ranks = []
    for q in (LOW_PERCENTILE, HIGH_PERCENTILE):
        q = q / 100
        # six binomial standard deviations, plus a share for the sample's regularity, keep a miss rare
        margin = 6 * math.sqrt(m * q * (1 - q)) + 0.001 * m + 4
        centre = q * (m - 1)
        ranks.append(min(m - 1, math.ceil(centre + margin)) if q < 0.5 else max(0, math.floor(centre - margin)))
    above.partition(ranks)
    return domain.type(above[ranks[0]]), domain.type(above[ranks[1]])


def _foreground_pass(volume: np.ndarray, domain: np.dtype, threshold: np.generic, low_top: np.generic,
                     high_bottom: np.generic, pool: ThreadPoolExecutor) -> tuple:
    """Sums over F = {x > threshold} and its two tails.

    Returns (count of F, sum of d, sum of d**2, sorted F values <= low_top, sorted F values >= high_bottom), with
    d = x - threshold over F (exact integers for integer volumes).
    """
    exact = domain.kind in _NATIVE_KINDS
    slabs = _slabs(volume.shape[0], volume.shape[1] * volume.shape[2])
    longest = max(s.stop - s.start for s in slabs) * volume.shape[1] * volume.shape[2]
    # numpy's maximum against a scalar is not vectorised for small integers; against an array it is
    floor = np.full(longest, threshold, dtype=domain)
    ones = np.ones(longest)
    # one float64 scratch per thread: a fresh 2 MB array per slab would cost page faults on every slab
    scratch = threading.local()

    def task(s: slice) -> tuple:
        block = _as_domain(volume[s], domain).ravel()
        n = block.size
        if not hasattr(scratch, "d"):
            scratch.d = np.empty(longest)
        in_f = block > threshold
        d = np.subtract(np.maximum(block, floor[:n]), threshold, out=scratch.d[:n], dtype=np.float64)
        sum_d, sum_d2 = _dot(d, ones[:n]), _dot(d, d)
        if exact:
            sum_d, sum_d2 = int(sum_d), int(sum_d2)
        low_mask = in_f & (block <= low_top)
        high_mask = block >= high_bottom
        low = block[low_mask] if low_mask.any() else block[:0]
        high = block[high_mask] if high_mask.any() else block[:0]
        return int(np.count_nonzero(in_f)), sum_d, sum_d2, low, high

    parts = _map_slabs(pool, task, slabs)
    add = sum if exact else math.fsum
    return (sum(p[0] for p in parts), add(p[1] for p in parts), add(p[2] for p in parts),
            np.sort(np.concatenate([p[3] for p in parts])), np.sort(np.concatenate([p[4] for p in parts])))


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """np.dot of two float64 vectors in pieces that OpenBLAS keeps on the calling thread.

    Above 10000 elements OpenBLAS splits a dot product over its own threads, which fight the slab threads.
    """
    piece = 8192
    return sum(float(np.dot(a[i:i + piece], b[i:i + piece])) for i in range(0, a.size, piece))


def _percentile_from_tails(low_tail: np.ndarray, high_tail: np.ndarray, count: int,
                           percentile: float) -> np.float32 | None:
    """numpy's 'linear' percentile of F (float32, as np.percentile on the float32 F), or None if the tails miss it.

    `low_tail` holds the smallest values of F and `high_tail` the largest, both sorted.
    """
    virtual = (count - 1) * (percentile / 100)
    below = math.floor(virtual)
    previous, following = (count - 1, count - 1) if virtual >= count - 1 else (below, below + 1)
    gamma = virtual - (-1 if virtual >= count - 1 else below)
    values = []
    for rank in (previous, following):
        if rank < low_tail.size:
            values.append(np.float32(low_tail[rank]))
        elif rank >= count - high_tail.size:
            values.append(np.float32(high_tail[rank - (count - high_tail.size)]))
        else:
            return None
    a, b = values
    difference = b - a
    # numpy's _lerp: interpolate from the nearer end, in the array's dtype (float32)
    return np.float32(b - difference * (1 - gamma)) if gamma >= 0.5 else np.float32(a + difference * gamma)


def _crop_box(scan: _Scan, cut: np.generic) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """CropForeground of the normalised volume (step 4 of the official chain): the bounding box of the raw voxels
    >= `cut`, the smallest raw value whose normalised value is > 0."""
    bounds = []
    for profile in (scan.slice_max, scan.row_max, scan.column_max):
        inside = np.flatnonzero(profile >= cut)
        bounds.append((int(inside[0]), int(inside[-1]) + 1))
    return (bounds[0][0], bounds[1][0], bounds[2][0]), (bounds[0][1], bounds[1][1], bounds[2][1])


def _first_positive(chain: _Chain, maximum: np.generic, domain: np.dtype) -> np.generic | None:
    """The smallest domain value whose normalised value is > 0, or None when there is none.

    The chain is monotone non-decreasing, so a binary search over the domain's ordered values finds it exactly,
    including values just above lo that float32 rounding maps onto 0. Values <= lo are clipped to lo, hence 0.
    """
    to_key, from_key = _ordered_keys(domain)

    def positive(key: int) -> bool:
        return bool(chain.apply(np.array([from_key(key)], dtype=np.float32))[0] > 0)

    floor = max(math.floor(chain.lo), int(np.iinfo(domain).min)) if domain.kind in _NATIVE_KINDS else chain.lo
    low, high = to_key(domain.type(floor)), to_key(maximum)
    if not positive(high):
        return None
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if positive(middle) else (middle, high)
    return from_key(high)


def _ordered_keys(domain: np.dtype) -> tuple[Callable[[np.generic], int], Callable[[int], np.generic]]:
    """Maps between domain values and integers in the same order (float32 through its bit pattern)."""
    if domain.kind in _NATIVE_KINDS:
        return int, domain.type

    def to_key(value: np.generic) -> int:
        bits = int(np.float32(value).view(np.int32))
        return bits if bits >= 0 else -(bits & 0x7FFFFFFF)

    def from_key(key: int) -> np.generic:
        bits = key if key >= 0 else (-key) | -0x80000000
        return np.int32(bits).view(np.float32)

    return to_key, from_key


def _normalised_crop(volume: np.ndarray, start: tuple[int, int, int], stop: tuple[int, int, int],
                     transform: _Chain | _Affine, pool: ThreadPoolExecutor) -> np.ndarray:
    """The float32 crop after ForegroundNorm and MinMax; only the crop's voxels are read."""
    crop = volume[tuple(slice(a, b) for a, b in zip(start, stop))]
    image = np.empty(crop.shape, dtype=np.float32)

    def task(chunk: tuple[slice, slice]) -> None:
        transform.write(crop[chunk], image[chunk])

    _map_slabs(pool, task, _chunks(crop.shape))
    return image


def _zoom(image: np.ndarray, size: tuple[int, int, int], pool: ThreadPoolExecutor) -> np.ndarray:
    """torch 'nearest-exact' resize of `image` to `size`, reading only the sampled voxels."""
    k_index, j_index, i_index = (nearest_exact_indices(n, m) for n, m in zip(image.shape, size))
    zoom = np.empty(size, dtype=np.float32)

    def task(part: slice) -> None:
        zoom[part] = image[np.ix_(k_index[part], j_index, i_index)]

    _map_slabs(pool, task, _slabs(size[0], size[1] * size[2]))
    return zoom
