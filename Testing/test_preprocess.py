"""SegVol's official preprocessing: the fast `segvolgru.preprocess` against a literal reference and MONAI."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from segvolgru.errors import InputError
from segvolgru.preprocessing import nearest_exact_indices, preprocess


def reference_indices(n: int, m: int) -> np.ndarray:
    """torch 'nearest-exact' on a float32 tensor: float32 scale n / m, float32 position (o + 0.5) * scale."""
    scale = np.float64(np.float32(n) / np.float32(m))
    return np.array([min(int(np.floor(np.float32((o + 0.5) * scale))), n - 1) for o in range(m)])


def reference(volume: np.ndarray, spatial_size=(32, 256, 256)):
    """The official steps as they read, on a float32 copy, statistics accumulated in float64."""
    x = volume.astype(np.float32)
    t = x.mean(dtype=np.float64)
    foreground = x[x > t]
    lo = np.percentile(foreground, 0.05)
    hi = np.percentile(foreground, 99.95)
    mu = np.float32(foreground.mean(dtype=np.float64))
    sigma = np.float32(foreground.std(dtype=np.float64))
    y = (np.clip(x, lo, hi) - mu) / max(sigma, np.float32(1e-8))
    z = y - y.min()
    z = z / max(z.max(), np.float32(1e-8))
    positive = np.argwhere(z > 0)
    start, stop = positive.min(axis=0), positive.max(axis=0) + 1
    image = z[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]]
    zoom = image[np.ix_(*(reference_indices(n, m) for n, m in zip(image.shape, spatial_size)))]
    return image, tuple(int(s) for s in start), tuple(int(s) for s in stop), zoom


def ct_like(shape, seed=0, border=False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    volume = np.full(shape, -1000, dtype=np.int16)
    k, j, i = shape
    body = (slice(0, k), slice(0, j), slice(0, i)) if border else \
        (slice(k // 6, k - k // 5), slice(j // 7, j - j // 8), slice(i // 5, i - i // 9))
    volume[body] = rng.normal(50, 30, size=volume[body].shape).astype(np.int16)
    volume[k // 3:k // 2, j // 3:j // 2, i // 3:i // 2] = 1300
    return volume + rng.integers(-15, 15, size=shape).astype(np.int16)


def mr_like(shape, dtype, seed=1) -> np.ndarray:
    """Noise-floor background (gamma) around a bright tissue box (~600 +- 120)."""
    rng = np.random.default_rng(seed)
    volume = rng.gamma(1.5, 8.0, size=shape)
    k, j, i = shape
    tissue = (slice(k // 4, k - k // 4), slice(j // 5, j - j // 6), slice(i // 6, i - i // 5))
    volume[tissue] += rng.normal(600, 120, size=volume[tissue].shape)
    return volume.astype(dtype)


def assert_matches_reference(volume, spatial_size=(32, 256, 256)):
    before = volume.copy()
    result = preprocess(volume, spatial_size)
    image, start, stop, zoom = reference(volume, spatial_size)
    assert np.array_equal(volume, before) and volume.dtype == before.dtype
    assert (result.crop_start, result.crop_stop) == (start, stop)
    assert result.image.dtype == np.float32 and result.zoom_out.dtype == np.float32
    assert result.image.shape == image.shape and result.zoom_out.shape == tuple(spatial_size)
    assert np.abs(result.image - image).max() <= 1e-6
    assert np.abs(result.zoom_out - zoom).max() <= 1e-6
    assert result.image.min() >= 0 and result.image.max() <= 1
    return result


def test_int16_ct_volume_matches_reference():
    result = assert_matches_reference(ct_like((40, 90, 70)))
    assert result.image.max() == 1


def test_int16_ct_volume_with_odd_shape_and_upsampled_axes_matches_reference():
    assert_matches_reference(ct_like((23, 51, 37), seed=3), spatial_size=(32, 64, 16))


def test_int16_extreme_values_do_not_overflow():
    volume = ct_like((20, 40, 30), seed=4)
    volume[2, 3, 4], volume[5, 6, 7] = 32767, -32768
    assert_matches_reference(volume, spatial_size=(8, 16, 16))


def test_foreground_touching_every_border_keeps_the_whole_volume():
    result = assert_matches_reference(ct_like((17, 33, 29), seed=5, border=True), spatial_size=(8, 8, 8))
    assert result.crop_start == (0, 0, 0) and result.crop_stop == (17, 33, 29)


def test_uint8_challenge_volume_matches_reference():
    rng = np.random.default_rng(6)
    volume = np.zeros((30, 64, 48), dtype=np.uint8)
    volume[4:25, 10:60, 5:40] = rng.integers(20, 256, size=(21, 50, 35))
    assert_matches_reference(volume, spatial_size=(32, 32, 32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_mr_volume_matches_reference(dtype):
    assert_matches_reference(mr_like((26, 70, 61), dtype), spatial_size=(32, 48, 80))


def test_big_endian_int16_matches_reference():
    assert_matches_reference(ct_like((12, 40, 30), seed=7).astype(">i2"), spatial_size=(8, 16, 16))


def test_matches_the_literal_float32_official_chain_and_monai():
    """Official statistics accumulated in float32; crop and resize with MONAI's own transforms."""
    from monai.transforms import CropForeground, Resize

    volume = ct_like((24, 60, 50), seed=8)
    x = volume.astype(np.float32)
    foreground = x[x > np.mean(x)]
    lo, hi = np.percentile(foreground, 0.05), np.percentile(foreground, 99.95)
    y = (np.clip(x, lo, hi) - np.mean(foreground)) / max(np.std(foreground), 1e-8)
    y = y - y.min()
    y = y / np.clip(y.max(), a_min=1e-8, a_max=None)
    cropper = CropForeground(margin=0)
    crop = cropper(torch.from_numpy(y[None]))
    start, stop = cropper.compute_bounding_box(torch.from_numpy(y[None]))
    zoom = Resize((32, 64, 64), mode="nearest-exact")(crop)
    result = preprocess(volume, (32, 64, 64))
    assert (result.crop_start, result.crop_stop) == (tuple(int(s) for s in start), tuple(int(s) for s in stop))
    assert np.abs(result.image - np.asarray(crop[0])).max() <= 1e-6
    assert np.abs(result.zoom_out - np.asarray(zoom[0])).max() <= 1e-6


def test_nearest_exact_indices_equal_torch_on_float32_tensors():
    rng = np.random.default_rng(9)
    pairs = [(n, m) for n, m in zip(rng.integers(2, 700, 150), rng.integers(1, 300, 150))] + [(3, 256), (511, 256)]
    for n, m in pairs:
        source = torch.arange(int(n), dtype=torch.float32).view(1, 1, -1, 1, 1)
        resized = torch.nn.functional.interpolate(source, size=(int(m), 1, 1), mode="nearest-exact")
        assert np.array_equal(nearest_exact_indices(int(n), int(m)), resized.view(-1).long().numpy()), (n, m)


def test_tail_guess_miss_falls_back_to_exact_percentiles(monkeypatch):
    """Bright voxels only on the strided subsample's grid: over-represented there, so the high-tail guess misses."""
    import segvolgru.preprocessing as module

    rng = np.random.default_rng(10)
    volume = rng.normal(100, 10, size=(32, 256, 256)).astype(np.int16)
    even = np.argwhere(np.ones((16, 128, 128), dtype=bool))[rng.choice(16 * 128 * 128, 400, replace=False)] * 2
    volume[tuple(even.T)] = rng.integers(3000, 4000, size=400)
    calls = []
    original = module._foreground_pass
    monkeypatch.setattr(module, "_foreground_pass", lambda *args: calls.append(args[3:5]) or original(*args))
    assert_matches_reference(volume, spatial_size=(8, 8, 8))
    assert len(calls) == 2


@pytest.mark.parametrize("bad, words", [
    ([[[1, 2], [3, 4]]], "numpy array"),
    (np.ones((4, 4, 4), dtype=np.complex64), "real-valued"),
    (np.ones((4, 4), dtype=np.float32), "3-D (K, J, I)"),
    (np.ones((1, 4, 4, 4), dtype=np.float32), "3-D (K, J, I)"),
    (np.ones((4, 1, 4), dtype=np.float32), "at least 2 voxels"),
    (np.full((4, 4, 4), 7, dtype=np.int16), "constant"),
    (np.eye(4, dtype=np.uint8)[None].repeat(3, axis=0), "same value"),
])
def test_bad_volume_is_rejected_with_message(bad, words):
    before = np.array(bad, copy=True)
    with pytest.raises(InputError, match=words.replace("(", r"\(").replace(")", r"\)")):
        preprocess(bad)
    assert np.array_equal(np.asarray(bad), before)


def test_nan_and_inf_voxels_are_counted_in_the_message():
    volume = mr_like((6, 10, 12), np.float32)
    volume[1, 2, 3], volume[2, 3, 4], volume[3, 4, 5] = np.nan, np.inf, -np.inf
    before = volume.copy()
    with pytest.raises(InputError, match="3 NaN or infinite"):
        preprocess(volume)
    assert np.array_equal(volume, before, equal_nan=True)


@pytest.mark.parametrize("size", [(32, 256), (32, 0, 256), (32.0, 256, 256), (True, 2, 2), "32x256x256", None])
def test_spatial_size_must_be_three_positive_ints(size):
    with pytest.raises(InputError, match="3 positive integers"):
        preprocess(ct_like((8, 16, 16)), size)


def _count_exact_passes(monkeypatch) -> list:
    """Calls of the exact second pass, which only runs when the single pass cannot decide."""
    import segvolgru.preprocessing as module

    calls = []
    original = module._foreground_pass
    monkeypatch.setattr(module, "_foreground_pass", lambda *args: calls.append(1) or original(*args))
    return calls


def test_a_ct_volume_takes_the_single_pass(monkeypatch):
    calls = _count_exact_passes(monkeypatch)
    assert_matches_reference(ct_like((30, 120, 110), seed=11), spatial_size=(16, 32, 32))
    assert calls == []


def test_a_voxel_just_above_lo_goes_to_the_official_float32_chain(monkeypatch):
    """lo interpolated to 0.999 of the way from 100 to 101: the official rounding, not the affine form, decides
    whether the voxels at 101 are above lo."""
    rng = np.random.default_rng(12)
    foreground = np.concatenate([np.full(11, 100), rng.integers(101, 1101, size=21988)])  # 21999 = 2000 * 10 + 1999
    volume = np.zeros(20 * 100 * 111, dtype=np.int16)
    volume[rng.choice(volume.size, foreground.size, replace=False)] = foreground
    volume = volume.reshape(20, 100, 111)
    calls = _count_exact_passes(monkeypatch)
    assert_matches_reference(volume, spatial_size=(8, 16, 16))
    assert calls


def test_a_mean_far_outside_the_clip_range_uses_the_official_operations(monkeypatch):
    """0.04 % of the bright voxels at 1e7 drag mu far above hi, where the affine form would drift from the
    official float32 rounding."""
    volume = mr_like((20, 60, 50), np.float32, seed=13)
    bright = np.argwhere(volume > 300)
    chosen = bright[np.random.default_rng(13).choice(len(bright), int(0.0004 * len(bright)), replace=False)]
    volume[tuple(chosen.T)] = 1e7
    calls = _count_exact_passes(monkeypatch)
    assert_matches_reference(volume, spatial_size=(8, 16, 16))
    assert calls


def test_int16_sums_do_not_overflow_on_a_two_voxel_last_axis():
    """Chunks of 2**18 voxels in rows of 2: more rows than int32 column sums can hold at these values."""
    rng = np.random.default_rng(14)
    volume = rng.integers(20000, 30000, (64, 4096, 2)).astype(np.int16)
    volume[:5] = 100
    assert_matches_reference(volume, spatial_size=(8, 8, 2))
