"""The challenge's click simulator and box rule (segvolgru.clicks), on hand-checked masks.

Arrays are (K, J, I); a cube [a, b) on an axis has voxel centres a..b-1, and its EDT "centre" is the voxel
farthest from the first non-error voxel on each side, a-1 and b.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from segvolgru import clicks
from segvolgru.clicks import Click, box_dict_to_kji, challenge_box, mask_to_box_kji, simulate_click
from segvolgru.errors import InputError


def _cube(shape, start, stop) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(start, stop))] = True
    return mask


class _FixedShift:
    """A stand-in generator whose every draw is ``value``; it records the bounds it was asked for."""

    def __init__(self, value: int) -> None:
        self.value = value
        self.calls: list[tuple[int, int]] = []

    def integers(self, low: int, high: int) -> int:
        self.calls.append((low, high))
        return self.value


def test_missing_corner_of_a_cube_is_clicked_positive_at_the_centre_of_the_missing_part():
    gt = _cube((48, 48, 48), (10, 10, 10), (40, 40, 40))
    pred = gt.copy()
    pred[10:21, 10:21, 10:21] = False  # 11 voxels a side: distance min(k - 9, 21 - k) peaks only at 15
    assert simulate_click(pred, gt) == Click(15, 15, 15, True)


def test_over_segmentation_gives_a_negative_click_at_its_centre():
    gt = _cube((48, 32, 32), (5, 5, 5), (20, 20, 20))
    pred = gt | _cube(gt.shape, (30, 5, 5), (39, 14, 14))
    assert simulate_click(pred, gt) == Click(34, 9, 9, False)


def test_of_two_error_components_the_larger_is_clicked():
    gt = _cube((40, 40, 40), (2, 2, 2), (38, 38, 38))
    pred = gt.copy()
    pred[4:9, 4:9, 4:9] = False      # 125 voxels, centre (6, 6, 6)
    pred[20:29, 20:29, 20:29] = False  # 729 voxels, centre (24, 24, 24)
    assert simulate_click(pred, gt) == Click(24, 24, 24, True)


def test_an_over_segmentation_larger_than_the_under_segmentation_wins():
    gt = _cube((40, 40, 40), (0, 0, 0), (10, 10, 10))
    pred = gt.copy()
    pred[0:3, 0:3, 0:3] = False
    pred |= _cube(gt.shape, (25, 25, 25), (32, 32, 32))
    assert simulate_click(pred, gt) == Click(28, 28, 28, False)


def test_equal_size_components_go_to_the_one_first_in_raster_order():
    gt = np.zeros((30, 30, 30), dtype=bool)
    pred = _cube(gt.shape, (20, 2, 2), (25, 7, 7)) | _cube(gt.shape, (2, 20, 20), (7, 25, 25))
    # Both are 5-voxel cubes; the second starts at k = 2, before the first's k = 20.
    assert simulate_click(pred, gt) == Click(4, 22, 22, False)


def test_a_perfect_prediction_gives_no_click():
    gt = _cube((16, 16, 16), (3, 3, 3), (9, 9, 9))
    assert simulate_click(gt.copy(), gt) is None
    assert simulate_click(np.zeros_like(gt), np.zeros_like(gt)) is None


def test_tied_maxima_are_broken_uniformly_and_reproducibly_by_the_seed():
    gt = _cube((20, 20, 20), (4, 4, 4), (16, 16, 16))
    pred = gt.copy()
    pred[6:10, 6:10, 6:10] = False  # 4 voxels a side: the 8 voxels at 7..8 tie at distance 2
    centres = [(k, j, i) for k in (7, 8) for j in (7, 8) for i in (7, 8)]
    for seed in (0, 42, 7):
        click = simulate_click(pred, gt, seed=seed)
        assert click == simulate_click(pred, gt, seed=seed)
        # The challenge's np.random.seed(seed); choice(n) over the maxima in C order.
        assert (click.k, click.j, click.i) == centres[np.random.RandomState(seed).choice(8)]
        assert click.positive
    assert len({simulate_click(pred, gt, seed=s) for s in range(20)}) > 1


def test_simulate_click_leaves_global_numpy_random_state_alone():
    gt = _cube((12, 12, 12), (2, 2, 2), (10, 10, 10))
    before = np.random.get_state()[1].copy()
    simulate_click(np.zeros_like(gt), gt)
    assert np.array_equal(np.random.get_state()[1], before)


def test_anisotropic_arrays_keep_their_axis_order():
    gt = np.zeros((12, 30, 50), dtype=bool)
    pred = _cube(gt.shape, (3, 20, 40), (8, 25, 45))
    assert simulate_click(pred, gt) == Click(5, 22, 42, False)
    thin = np.zeros((3, 9, 40), dtype=bool)
    thin[1, 4, 10:31] = True  # a rod along I: every voxel is 1 from the outside, ties broken by the seed
    click = simulate_click(np.zeros_like(thin), thin)
    assert (click.k, click.j) == (1, 4) and 10 <= click.i <= 30 and click.positive


def test_voxels_beyond_the_volume_count_as_outside_the_error():
    gt = _cube((20, 20, 20), (0, 0, 0), (5, 5, 5))
    # Against the array edge at k = -1 the distance is min(k + 1, 5 - k), which peaks at 2, not at 0.
    assert simulate_click(np.zeros_like(gt), gt) == Click(2, 2, 2, True)


def test_click_matches_the_challenge_procedure_on_the_whole_volume():
    """The cropped EDT equals the challenge's EDT of the zero-padded largest component, on random errors."""
    rng = np.random.default_rng(3)
    for _ in range(6):
        gt = ndimage.binary_dilation(rng.random((18, 22, 26)) > 0.97, iterations=2)
        pred = ndimage.binary_dilation(rng.random(gt.shape) > 0.97, iterations=2)
        error = pred != gt
        labels, _ = ndimage.label(error, structure=np.ones((3, 3, 3)))
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        component = labels == np.argmax(sizes)
        distance = ndimage.distance_transform_edt(np.pad(component, 1))[1:-1, 1:-1, 1:-1]
        maxima = np.argwhere(distance == distance.max())
        np.random.seed(42)
        k, j, i = maxima[np.random.choice(len(maxima))]
        assert simulate_click(pred, gt) == Click(int(k), int(j), int(i), bool(gt[k, j, i]))


def test_large_crops_are_downsampled_and_still_clicked_near_the_centre(monkeypatch):
    monkeypatch.setattr(clicks, "EDT_DOWNSAMPLE_VOXELS", 0)
    gt = _cube((48, 48, 48), (10, 10, 10), (40, 40, 40))
    pred = gt.copy()
    pred[10:21, 10:21, 10:21] = False
    click = simulate_click(pred, gt)
    assert click.positive and not pred[click.k, click.j, click.i]
    # The 11-voxel crop becomes 6 blocks of 2 whose distance peaks at blocks 2..3, fine voxels 14..17.
    assert all(14 <= c <= 17 for c in (click.k, click.j, click.i))


def test_a_click_on_a_128_cube_volume_is_fast():
    import time

    gt = _cube((128, 128, 128), (14, 14, 14), (114, 114, 114))
    pred = gt.copy()
    pred[14:64, 14:64, 14:64] = False
    start = time.perf_counter()
    click = simulate_click(pred, gt)
    assert time.perf_counter() - start < 0.6  # ~0.1 s measured; the margin absorbs a busy shared machine
    assert click.positive


def test_masks_of_different_shapes_are_rejected_with_a_message():
    with pytest.raises(InputError, match="one shape"):
        simulate_click(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))
    with pytest.raises(InputError, match="3-D"):
        simulate_click(np.zeros((4, 4)), np.zeros((4, 4)))


def _box_mask() -> np.ndarray:
    gt = np.zeros((12, 512, 300), dtype=np.uint8)
    gt[3, 100:120, 50:70] = 1
    gt[4, 90:130, 40:80] = 1
    gt[5, 100:201, 30:61] = 1   # the slice z_mid picks: unique slices [3, 4, 5, 9], entry 4 // 2 = 2
    gt[9, 0:511, 0:299] = 1
    return gt


def test_challenge_box_without_enlargement_is_the_2d_box_of_the_middle_slice():
    shift = _FixedShift(0)
    assert challenge_box(_box_mask(), shift) == {
        "z_min": 3, "z_max": 9, "z_mid": 5,
        "z_mid_x_min": 30, "z_mid_x_max": 60, "z_mid_y_min": 100, "z_mid_y_max": 200,
    }
    assert shift.calls == [(0, 6)]  # s ~ U{0, ..., 5}


def test_challenge_box_enlargement_scales_with_the_slice_size():
    box = challenge_box(_box_mask(), _FixedShift(5))
    # J = 512 rows: int(5 * 512 / 256) = 10; I = 300 columns: int(5 * 300 / 256) = int(5.86) = 5.
    assert (box["z_mid_y_min"], box["z_mid_y_max"]) == (90, 210)
    assert (box["z_mid_x_min"], box["z_mid_x_max"]) == (25, 65)
    assert (box["z_min"], box["z_max"], box["z_mid"]) == (3, 9, 5)


def test_challenge_box_is_clipped_to_the_image():
    gt = np.zeros((4, 256, 256), dtype=bool)
    gt[1, 2:254, 0:3] = True
    box = challenge_box(gt, _FixedShift(5))
    assert (box["z_mid_y_min"], box["z_mid_y_max"], box["z_mid_x_min"], box["z_mid_x_max"]) == (0, 255, 0, 7)


def test_challenge_box_seeds_are_reproducible_and_enlarge_by_at_most_five_steps():
    gt = _box_mask()
    boxes = [challenge_box(gt, seed) for seed in range(30)]
    assert boxes == [challenge_box(gt, seed) for seed in range(30)]
    shifts = {100 - b["z_mid_y_min"] for b in boxes}
    assert shifts <= {0, 2, 4, 6, 8, 10} and len(shifts) > 1  # int(s * 512 / 256) = 2 s
    assert challenge_box(gt, np.random.default_rng(1)) == challenge_box(gt, 1)


def test_challenge_box_of_an_empty_mask_is_none():
    assert challenge_box(np.zeros((3, 8, 8)), 0) is None


def test_box_dict_maps_to_the_inclusive_kji_box():
    box = challenge_box(_box_mask(), _FixedShift(0))
    assert box_dict_to_kji(box) == (3, 100, 30, 9, 200, 60)
    assert all(type(v) is int for v in box_dict_to_kji(box))


def test_box_dict_without_its_keys_is_rejected_with_a_message():
    with pytest.raises(InputError, match="z_mid_x_max"):
        box_dict_to_kji({"z_min": 0, "z_max": 3})
    bad = dict(challenge_box(_box_mask(), _FixedShift(0)), z_min=10)
    with pytest.raises(InputError, match="minimum above its maximum"):
        box_dict_to_kji(bad)


def test_mask_to_box_is_the_tight_inclusive_box_and_none_when_empty():
    mask = np.zeros((10, 20, 30), dtype=bool)
    mask[2, 5, 7] = True
    mask[6, 15, 3] = True
    assert mask_to_box_kji(mask) == (2, 5, 3, 6, 15, 7)
    assert mask_to_box_kji(np.zeros((2, 2, 2))) is None
