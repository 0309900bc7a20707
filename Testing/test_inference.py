"""Whole-volume official inference: prompts mapping, ROI rule, windows, caching, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_support import ct_like, tiny_model
from segvolgru import segment
from segvolgru.cache import EmbeddingCache, content_key
from segvolgru.errors import InputError
from segvolgru.inference import official_roi
from segvolgru.prompts import box_to_zoom_out, points_to_zoom_out
from segvolgru.windows import window_grid

BOX = (10, 30, 20, 29, 69, 59)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_box_maps_to_zoom_out_like_rasterise_resize_bbox():
    rng = np.random.default_rng(3)
    for trial in range(150):
        crop = [int(v) for v in rng.integers(2, 12, 3)]
        crop[trial % 3] = int(rng.integers(5, 600))
        crop = tuple(crop)
        out = (16, 64, 64)
        lo = [int(rng.integers(0, c)) for c in crop]
        hi = [int(rng.integers(l, c)) for l, c in zip(lo, crop)]
        cube = torch.zeros(crop)
        cube[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = 1
        resized = torch.nn.functional.interpolate(cube[None, None], size=out, mode="nearest-exact")[0, 0]
        nz = torch.nonzero(resized)
        if len(nz) == 0:
            continue
        want = (*nz.min(0).values.tolist(), *nz.max(0).values.tolist())
        assert box_to_zoom_out((*lo, *hi), crop, out) == want


def test_point_maps_to_floor_of_scaled_centre():
    got = points_to_zoom_out(np.array([[0, 0, 0], [99, 49, 10]]), (100, 50, 20), (32, 256, 256))
    np.testing.assert_array_equal(got, [[0, 2, 6], [31, 253, 134]])
    # exact ties: (24 + 0.5) * 32 / 49 = 16 exactly, (73 + 0.5) * 256 / 98 = 192 exactly
    np.testing.assert_array_equal(points_to_zoom_out(np.array([[24, 73, 0]]), (49, 98, 10), (32, 256, 256)),
                                  [[16, 192, 12]])


def test_official_roi_pads_half_the_shortfall_and_clamps():
    pred = torch.zeros(40, 300, 300, dtype=torch.bool)
    pred[10:20, 100:150, 5:10] = True
    assert official_roi(pred, (32, 256, 256)) == (0, 0, 0, 30, 252, 134)
    assert official_roi(torch.zeros(4, 4, 4, dtype=torch.bool), (2, 2, 2)) is None


def test_window_grid_follows_monai_order_and_pads_small_crops():
    grid = window_grid((150, 250, 300), (32, 256, 256), 0.5)
    assert grid.pad_before == (0, 3, 0) and grid.pad_after == (0, 3, 0)
    ks = sorted({s[0] for s in grid.starts})
    assert ks == [0, 16, 32, 48, 64, 80, 96, 112, 118]
    assert sorted({s[2] for s in grid.starts}) == [0, 44]
    assert grid.starts[:3] == ((0, 0, 0), (0, 0, 44), (16, 0, 0))


def test_official_box_result_is_consistent_with_its_trace(model):
    volume = ct_like()
    result = segment(model, volume, box=BOX, trace=True)
    assert result.mask.shape == volume.shape and result.mask.dtype == np.uint8
    assert result.crop_start == (0, 5, 0)
    assert result.logits.shape == (40, 95, 90)
    assert result.zoom_out_low_res_logits.shape == (16, 16, 16)
    assert result.zoom_out_logits.shape == (16, 64, 64)
    up = model.upsample(torch.from_numpy(result.zoom_out_low_res_logits)[None, None])[0, 0].numpy()
    np.testing.assert_array_equal(up, result.zoom_out_logits)
    assert result.roi is not None and len(result.windows) > 1
    crop_mask = result.mask[:, 5:, :]
    np.testing.assert_array_equal(crop_mask, (torch.sigmoid(torch.from_numpy(result.logits)) > 0.5).numpy())
    assert all(w.low_res_logits.shape == (16, 16, 16) for w in result.windows)


def test_cached_and_uncached_results_are_identical_and_cache_skips_encoders(model):
    volume = ct_like()
    cold = segment(model, volume, box=BOX, points=[(20, 50, 40)], point_labels=[1], cache=EmbeddingCache())
    cache = EmbeddingCache()
    segment(model, volume, box=BOX, cache=cache)
    warm = segment(model, volume, box=BOX, points=[(20, 50, 40)], point_labels=[1], cache=cache)
    np.testing.assert_array_equal(cold.logits, warm.logits)
    assert warm.timings["encoder_runs"] == 0 and cold.timings["encoder_runs"] > 0


def test_a_changed_voxel_never_hits_a_stale_cache_entry(model):
    cache = EmbeddingCache()
    volume = ct_like()
    first = segment(model, volume, box=BOX, cache=cache)
    changed = volume.copy()
    changed[20, 50, 40] += 500
    assert content_key(changed) != content_key(volume)
    second = segment(model, changed, box=BOX, cache=cache)
    fresh = segment(model, changed, box=BOX, cache=EmbeddingCache())
    np.testing.assert_array_equal(second.logits, fresh.logits)
    assert second.timings["encoder_runs"] > 0
    assert not np.array_equal(first.logits, second.logits)


def test_point_mode_windows_are_seeded_and_zoom_out_keeps_only_user_points(model):
    volume = ct_like()
    pts = [(20, 50, 40), (12, 35, 30)]
    a = segment(model, volume, points=pts, point_labels=[1, 0], seed=5, trace=True)
    b = segment(model, volume, points=pts, point_labels=[1, 0], seed=5, trace=True)
    np.testing.assert_array_equal(a.logits, b.logits)
    assert a.zoom_out_points.shape == (2, 3) and list(a.zoom_out_point_labels) == [1, 0]
    assert all(w.box is not None and len(w.points) == 5 or w.points.shape == (1, 3) for w in a.windows)


def test_cache_is_bounded_in_bytes():
    cache = EmbeddingCache(max_bytes=3 * 4000)
    for n in range(5):
        cache.put(n, torch.zeros(1000))
    assert len(cache) == 3 and cache.get(0) is None and cache.get(4) is not None


def test_cache_evicts_cheap_entries_before_embeddings():
    cache = EmbeddingCache(max_bytes=4 * 4000)
    cache.put("embedding 0", torch.zeros(1000))
    cache.put("side 0", torch.zeros(1000), cheap=True)
    cache.put("side 1", torch.zeros(1000), cheap=True)
    cache.put("embedding 1", torch.zeros(1000))
    assert cache.get("side 0") is not None  # now the more recently used cheap entry
    cache.put("embedding 2", torch.zeros(1000))  # over budget: the least recent cheap entry goes
    assert cache.get("side 1") is None and cache.get("embedding 0") is not None
    cache.put("embedding 3", torch.zeros(1000))
    cache.put("embedding 4", torch.zeros(1000))  # no cheap entry left: plain LRU (0 was read after 1)
    assert cache.get("side 0") is None and cache.get("embedding 1") is None
    assert [cache.get(f"embedding {n}") is not None for n in (0, 2, 3, 4)] == [True] * 4
    assert cache.nbytes == 4 * 4000


@pytest.mark.parametrize("kwargs, message", [
    ({"box": (0, 0, 0, 50, 10, 10)}, "outside the volume"),
    ({"box": (10, 10, 10, 5, 20, 20)}, "inverted"),
    ({"box": []}, "box is empty"),
    ({"points": [(100, 0, 0)], "point_labels": [1]}, "point 0 .* outside the volume"),
    ({"points": [(1, 1, 1)], "point_labels": [2]}, "must be 1 \\(positive\\) or 0"),
    ({"points": [(1, 1, 1)]}, "point_labels are required"),
    ({"text": "liver"}, "no text tower"),
    ({}, "no prompt given"),
])
def test_bad_prompts_are_refused_with_a_message_and_the_volume_is_untouched(model, kwargs, message):
    volume = ct_like()
    before = volume.copy()
    with pytest.raises(InputError, match=message):
        segment(model, volume, **kwargs)
    np.testing.assert_array_equal(volume, before)


@pytest.mark.parametrize("volume, message", [
    (np.zeros((10, 10)), "3-D"),
    (np.zeros((2, 10, 10, 10)), "3-D"),
    (np.zeros((1, 10, 10)), "at least 2 voxels"),
    (np.full((5, 10, 10), np.nan), "NaN"),
    (np.full((5, 10, 10), 7.0), "constant|same value"),
])
def test_bad_volumes_are_refused(model, volume, message):
    before = volume.copy()
    with pytest.raises(InputError, match=message):
        segment(model, volume, box=(0, 0, 0, 0, 1, 1))
    np.testing.assert_array_equal(volume, before)


def test_new_weights_in_the_same_model_never_reuse_cached_results():
    model = tiny_model()
    volume = ct_like()
    cache = EmbeddingCache()
    before = segment(model, volume, box=BOX, cache=cache)
    with torch.no_grad():
        model.mask_decoder.iou_token.weight.add_(0.0)  # an in-place write, values unchanged
        model.image_encoder.norm.bias.add_(0.5)
    after = segment(model, volume, box=BOX, cache=cache)
    fresh = segment(model, volume, box=BOX, cache=EmbeddingCache())
    np.testing.assert_array_equal(after.logits, fresh.logits)
    assert not np.array_equal(before.logits, after.logits)


def test_a_cache_too_small_for_the_decoder_side_gives_bit_identical_logits(model):
    """The decoder path never depends on the cache's state (session replay must stay bit-exact)."""
    from segvolgru.cache import value_nbytes
    from segvolgru.engine import Engine

    embedding = torch.randn(1, model.config.hidden_size, *model.config.embedding_grid)
    with torch.inference_mode():
        side_bytes = value_nbytes(model.decoder_image_side(embedding))
    small, large = Engine(model, EmbeddingCache(max_bytes=side_bytes - 1)), Engine(model, EmbeddingCache())
    for n, box in enumerate([(1, 2, 3, 10, 20, 25), (0, 0, 0, 5, 5, 5)]):
        narrow = small.decode(embedding, ("window", n), box, None, None, None, None)
        wide = large.decode(embedding, ("window", n), box, None, None, None, None)
        assert torch.equal(narrow, wide)
    assert not [k for k in small.cache._items if k[0] == "decoder_image"]
    assert len([k for k in large.cache._items if k[0] == "decoder_image"]) == 2


def test_a_submodule_set_to_none_does_not_break_the_model_tag():
    model = tiny_model()
    model.correction = None
    from segvolgru.engine import Engine

    segment(model, ct_like(), box=BOX, cache=EmbeddingCache())  # every engine step computes the tag

    tag = Engine(model, EmbeddingCache())._model_tag()
    with torch.no_grad():
        model.mask_decoder.iou_token.weight.add_(1.0)
    assert Engine(model, EmbeddingCache())._model_tag() != tag


def test_public_preprocess_is_the_function_even_after_segment_ran(model):
    import segvolgru

    segment(model, ct_like(), box=BOX)
    result = segvolgru.preprocess(ct_like(), spatial_size=(16, 64, 64))
    assert result.zoom_out.shape == (16, 64, 64) and result.crop_start == (0, 5, 0)


def test_region_upsampling_equals_slicing_the_full_upsampling():
    from segvolgru.prompts import upsample_nearest, upsample_nearest_region

    grid_map = torch.rand(16, 64, 64)
    for shape, region in [((37, 301, 211), (slice(3, 30), slice(100, 290), slice(0, 211))),
                          ((16, 64, 64), (slice(0, 16), slice(5, 6), slice(10, 60))),
                          ((120, 70, 500), (slice(119, 120), slice(0, 70), slice(250, 499)))]:
        full = upsample_nearest(grid_map, shape)[region]
        assert torch.equal(upsample_nearest_region(grid_map, shape, region), full)


def test_preprocess_of_a_fortran_ordered_volume_is_identical():
    import segvolgru

    volume = ct_like()
    a = segvolgru.preprocess(volume, spatial_size=(16, 64, 64))
    b = segvolgru.preprocess(np.asfortranarray(volume), spatial_size=(16, 64, 64))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.zoom_out, b.zoom_out)
    assert a.crop_start == b.crop_start and a.crop_stop == b.crop_stop
