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

How it is made fast without changing the result:
- The statistics need only two streaming passes over cache-sized slabs, run on a few threads (numpy releases the
  GIL): the sum, extrema and max-projections first, then the sums over F and the two tails of F that hold the
  percentiles (chosen from a strided subsample and verified, with an exact fallback when a guess misses).
- The whole chain is monotone non-decreasing in the raw value, so the crop is the bounding box of raw voxels
  >= one threshold, found by binary search on the exact float32 chain and read off the max-projections.
- Only the crop is normalised, with the official float32 operations in the official order; the zoom-out reads
  only its sampled voxels.
Integer volumes of up to 16 bits are processed in their own dtype (exact in float32); every other dtype is
converted slab by slab to float32, as the official does with the whole volume.

The statistics t, mu and sigma are accumulated in float64 (exact for integer volumes). The official accumulates in
float32 in the memory order of the NIfTI array, which is rounding noise of about 1e-6 relative: it can only matter
when a voxel value lies within that noise of the mean.
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
_NATIVE_KINDS = ("i", "u")
_R = TypeVar("_R")


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
        first = _first_pass(volume, domain, pool)
        chain = _chain_from_stats(volume, domain, first, pool)
        start, stop = _crop_box(first, chain, domain)
        image = _normalised_crop(volume, start, stop, chain, pool)
    zoom_out = image[np.ix_(*(nearest_exact_indices(n, m) for n, m in zip(image.shape, size)))]
    return Preprocessed(image=image, crop_start=start, crop_stop=stop, zoom_out=zoom_out)


def nearest_exact_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index (int64, in [0, in_size)) of each output voxel of torch 'nearest-exact' on a float32 tensor.

    torch computes the scale in float32 for float32 tensors, so this is floor((o + 0.5) * float32(n / m)) rounded
    to float32 as torch does, which differs from the exact rational formula by one voxel for some size pairs.
    """
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    position = ((np.arange(out_size, dtype=np.float64) + 0.5) * scale).astype(np.float32)
    return np.minimum(np.floor(position).astype(np.int64), in_size - 1)


def _check_input(volume: object, spatial_size: object) -> tuple[int, int, int]:
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


def _map_slabs(pool: ThreadPoolExecutor, task: Callable[[slice], _R], slabs: list[slice]) -> list[_R]:
    """Run `task` on every slab of `pool` (made with `_workers()` threads), each worker walking its own
    interleaved share: one pool task per worker keeps the scheduling cost out of the slab loop."""
    workers = _workers()
    shares = [slabs[w::workers] for w in range(min(workers, len(slabs)))]
    results = list(pool.map(lambda share: [task(s) for s in share], shares))
    return [results[i % len(shares)][i // len(shares)] for i in range(len(slabs))]


def _as_domain(block: np.ndarray, domain: np.dtype) -> np.ndarray:
    return block if block.dtype == domain else block.astype(domain)


@dataclass
class _FirstPass:
    """Totals of the first pass, in the domain dtype: voxel count and sum, extrema, and max-projections."""

    count: int
    total: float | int
    minimum: np.generic
    maximum: np.generic
    slice_max: np.ndarray   # (K,) maximum of each slice
    projection: np.ndarray  # (J, I) maximum over K


def _first_pass(volume: np.ndarray, domain: np.dtype, pool: ThreadPoolExecutor) -> _FirstPass:
    exact = domain.kind in _NATIVE_KINDS

    def task(s: slice) -> tuple:
        block = _as_domain(volume[s], domain)
        total = int(block.sum(dtype=np.int64)) if exact else float(block.sum(dtype=np.float64))
        return total, block.min(), block.max(axis=(1, 2)), block.max(axis=0)

    parts = _map_slabs(pool, task, _slabs(volume.shape[0], volume.shape[1] * volume.shape[2]))
    total = sum(p[0] for p in parts) if exact else math.fsum(p[0] for p in parts)
    if not math.isfinite(total):
        bad = sum(int(np.count_nonzero(~np.isfinite(_as_domain(volume[s], domain))))
                  for s in _slabs(volume.shape[0], volume.shape[1] * volume.shape[2]))
        raise InputError(f"The volume has {bad} NaN or infinite voxels (as float32): replace them, e.g. with "
                         "np.nan_to_num, before segmenting.")
    slice_max = np.concatenate([p[2] for p in parts])
    projection = parts[0][3]
    for p in parts[1:]:
        np.maximum(projection, p[3], out=projection)
    minimum = min(p[1] for p in parts)
    maximum = slice_max.max()
    if minimum == maximum:
        raise InputError(f"The volume is constant (every voxel is {maximum}): there is nothing to segment.")
    return _FirstPass(volume.size, total, minimum, maximum, slice_max, projection)


def _floor_in(value: float) -> np.float32:
    """The largest float32 <= `value`, so that x > value iff x > it for every float32 x."""
    floor = np.float32(value)
    return np.nextafter(floor, np.float32(-np.inf)) if floor > value else floor


def _chain_from_stats(volume: np.ndarray, domain: np.dtype, first: _FirstPass,
                      pool: ThreadPoolExecutor) -> _Chain:
    """ForegroundNorm and MinMax constants of the whole volume (step 1 and 2 of the official chain)."""
    if domain.kind in _NATIVE_KINDS:
        threshold = domain.type(first.total // first.count)  # x > exact mean iff x > its floor
    else:
        threshold = _floor_in(first.total / first.count)
    low_tail_top, high_tail_bottom = _tail_guesses(volume, domain, threshold, first.maximum)
    count, sum_d, sum_d2, low_tail, high_tail = _foreground_pass(
        volume, domain, threshold, low_tail_top, high_tail_bottom, pool)
    lo = _percentile_from_tails(low_tail, high_tail, count, LOW_PERCENTILE)
    hi = _percentile_from_tails(low_tail, high_tail, count, HIGH_PERCENTILE)
    if lo is None or hi is None:
        _, _, _, low_tail, high_tail = _foreground_pass(
            volume, domain, threshold, first.maximum, _next_up(threshold, domain), pool)
        lo = _percentile_from_tails(low_tail, high_tail, count, LOW_PERCENTILE)
        hi = _percentile_from_tails(low_tail, high_tail, count, HIGH_PERCENTILE)
    mean_d = sum_d / count
    variance = max(0.0, float(sum_d2 * count - sum_d * sum_d) / count / count)
    mu = np.float32(float(threshold) + float(mean_d))
    sigma = max(np.float32(math.sqrt(variance)), np.float32(1e-8))
    # with the MinMax constants at their neutral 0 and 1 the chain is exactly ForegroundNorm
    chain = _Chain(lo=lo, hi=hi, mu=mu, sigma=sigma)
    y_min, y_max = chain.apply(np.array([first.minimum, first.maximum], dtype=np.float32))
    return _Chain(lo=lo, hi=hi, mu=mu, sigma=sigma, y_min=y_min,
                  z_den=max(np.float32(y_max - y_min), np.float32(1e-8)))


def _next_up(value: np.generic, domain: np.dtype) -> np.generic:
    if domain.kind in _NATIVE_KINDS:
        return domain.type(int(value) + 1)
    return np.nextafter(value, np.float32(np.inf))


def _tail_guesses(volume: np.ndarray, domain: np.dtype, threshold: np.generic,
                  maximum: np.generic) -> tuple[np.generic, np.generic]:
    """Bounds that most likely enclose the two percentiles of F, from a strided subsample.

    Returns (top of the low tail, bottom of the high tail); the caller verifies them against exact counts.
    """
    step = max(1, round((volume.size / SUBSAMPLE_VOXELS) ** (1 / 3)))
    sample = _as_domain(volume[::step, ::step, ::step], domain).ravel()
    sample = sample[sample > threshold]
    m = sample.size
    if m == 0:
        return maximum, _next_up(threshold, domain)
    ranks = []
    for q in (LOW_PERCENTILE, HIGH_PERCENTILE):
        q = q / 100
        # six binomial standard deviations, plus a share for the sample's regularity, keep a miss rare
        margin = 6 * math.sqrt(m * q * (1 - q)) + 0.001 * m + 4
        centre = q * (m - 1)
        ranks.append(min(m - 1, math.ceil(centre + margin)) if q < 0.5 else max(0, math.floor(centre - margin)))
    sample.partition(ranks)
    return sample[ranks[0]], sample[ranks[1]]


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


def _crop_box(first: _FirstPass, chain: _Chain, domain: np.dtype) -> tuple[tuple[int, int, int],
                                                                         tuple[int, int, int]]:
    """CropForeground of the normalised volume, from the raw max-projections (step 4 of the official chain)."""
    cut = _first_positive(first.minimum, first.maximum, chain, domain)
    if cut is None:
        raise InputError("After SegVol's foreground clipping every voxel has the same value (the 0.05th and "
                         "99.95th percentiles of the bright voxels are equal, as in a binary mask): give an "
                         "intensity image, not a label map.")
    bounds = []
    for profile in (first.slice_max, first.projection.max(axis=1), first.projection.max(axis=0)):
        inside = np.flatnonzero(profile >= cut)
        bounds.append((int(inside[0]), int(inside[-1]) + 1))
    return (bounds[0][0], bounds[1][0], bounds[2][0]), (bounds[0][1], bounds[1][1], bounds[2][1])


def _first_positive(minimum: np.generic, maximum: np.generic, chain: _Chain,
                    domain: np.dtype) -> np.generic | None:
    """The smallest domain value whose normalised value is > 0, or None when there is none.

    The chain is monotone non-decreasing, so a binary search over the domain's ordered values finds it exactly,
    including values that float32 rounding maps onto the minimum.
    """
    to_key, from_key = _ordered_keys(domain)

    def positive(key: int) -> bool:
        return bool(chain.apply(np.array([from_key(key)], dtype=np.float32))[0] > 0)

    low, high = to_key(minimum), to_key(maximum)
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


def _normalised_crop(volume: np.ndarray, start: tuple[int, int, int], stop: tuple[int, int, int], chain: _Chain,
                     pool: ThreadPoolExecutor) -> np.ndarray:
    """The float32 crop after ForegroundNorm and MinMax; only the crop's voxels are read."""
    region = (slice(start[0], stop[0]), slice(start[1], stop[1]), slice(start[2], stop[2]))
    crop = volume[region]
    image = np.empty(crop.shape, dtype=np.float32)

    def task(s: slice) -> None:
        np.copyto(image[s], crop[s], casting="unsafe")
        chain.apply(image[s])

    _map_slabs(pool, task, _slabs(crop.shape[0], crop.shape[1] * crop.shape[2]))
    return image
