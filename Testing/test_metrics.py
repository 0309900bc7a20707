"""The challenge's scores (segvolgru.metrics): Dice, surface Dice, click AUC and per-case scoring.

Arrays are (K, J, I); spacing is in mm per axis (K, J, I).
"""
from __future__ import annotations

import numpy as np
import pytest

from segvolgru.errors import InputError
from segvolgru.metrics import case_scores, challenge_auc, dice, surface_dice


def _cube(shape, start, stop, value=1) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[tuple(slice(a, b) for a, b in zip(start, stop))] = value
    return mask


def _slab(first: int, stop: int) -> np.ndarray:
    """Slices first..stop-1 of a (20, 5, 5) volume, filling each slice."""
    return _cube((20, 5, 5), (first, 0, 0), (stop, 5, 5))


def test_dice_of_known_overlaps():
    a = _cube((4, 4, 10), (0, 0, 0), (1, 1, 10))
    b = _cube((4, 4, 10), (0, 0, 5), (1, 1, 10))
    assert dice(a, b) == pytest.approx(2 * 5 / (10 + 5))
    assert dice(a, a) == 1.0
    assert dice(a, np.zeros_like(a)) == 0.0
    assert dice(_cube((4, 4, 10), (0, 0, 0), (1, 1, 4)), _cube((4, 4, 10), (0, 0, 6), (1, 1, 10))) == 0.0


def test_dice_of_two_empty_masks_is_one():
    assert dice(np.zeros((2, 3, 4)), np.zeros((2, 3, 4))) == 1.0


def test_dice_of_masks_of_different_shapes_is_rejected_with_a_message():
    with pytest.raises(InputError, match="one shape"):
        dice(np.zeros((2, 3, 4)), np.zeros((2, 3, 5)))


def test_surface_dice_of_identical_masks_is_one():
    mask = _cube((16, 16, 16), (3, 4, 5), (12, 10, 9))
    assert surface_dice(mask, mask, (1.0, 1.0, 1.0)) == 1.0
    assert surface_dice(mask, mask, (3.0, 0.7, 0.7)) == 1.0


def test_surface_dice_of_a_one_voxel_shift_at_1_mm_is_one_within_2_mm():
    mask = _cube((20, 20, 20), (4, 4, 4), (14, 14, 14))
    shifted = np.roll(mask, 1, axis=2)
    assert surface_dice(mask, shifted, (1.0, 1.0, 1.0), tolerance_mm=2.0) == 1.0


def test_surface_dice_of_a_slab_shifted_by_five_voxels_matches_the_hand_count():
    # A = slices 2..11, B = slices 7..16, each filling the 5x5 slice, so the array edge makes side walls.
    # Face areas (1 mm spacing): 2 caps x 25 + 4 walls x 5 x 10 slices = 250 mm2 per mask.
    # A's top slice 2 is 5 mm from B's nearest surface voxels (slice 7): its 25 cap + 20 wall faces fail.
    # The walls of slices 3 and 4 are 4 and 3 mm from slice 7: 2 x 20 faces fail. Slices 5..11 are within
    # 2 mm (8..11 lie on B's walls; no voxel of a 5x5 slice is more than 2 from its rim): they pass.
    # A fails 85 mm2, B 85 by symmetry: NSD = (250 - 85 + 250 - 85) / 500 = 0.66.
    assert surface_dice(_slab(2, 12), _slab(7, 17), (1.0, 1.0, 1.0)) == pytest.approx(0.66)


def test_surface_dice_uses_the_spacing_for_areas_and_distances():
    # At 0.5 mm slices, caps are 1 mm2 and wall faces 0.5 mm2: 2 x 25 + 200 x 0.5 = 150 mm2 per mask.
    # Only slice 2 is beyond 2 mm (5 x 0.5 = 2.5): 25 x 1 + 20 x 0.5 = 35 mm2 fail; slice 3 is at 2.0 mm.
    assert surface_dice(_slab(2, 12), _slab(7, 17), (0.5, 1.0, 1.0)) == pytest.approx(115 / 150)
    mask = _cube((20, 20, 20), (4, 4, 4), (14, 14, 14))
    assert surface_dice(mask, np.roll(mask, 1, axis=0), (3.0, 1.0, 1.0)) < 1.0


def test_surface_dice_of_empty_masks_is_one_and_of_one_empty_mask_is_zero():
    empty = np.zeros((6, 6, 6), dtype=np.uint8)
    assert surface_dice(empty, empty, (1, 1, 1)) == 1.0
    assert surface_dice(_cube(empty.shape, (1, 1, 1), (3, 3, 3)), empty, (1, 1, 1)) == 0.0
    assert surface_dice(empty, _cube(empty.shape, (1, 1, 1), (3, 3, 3)), (1, 1, 1)) == 0.0


def test_surface_dice_rejects_a_bad_spacing_with_a_message():
    mask = _cube((6, 6, 6), (1, 1, 1), (3, 3, 3))
    with pytest.raises(InputError, match="spacing"):
        surface_dice(mask, mask, (1.0, 0.0, 1.0))
    with pytest.raises(InputError, match="spacing"):
        surface_dice(mask, mask, (1.0, 1.0))


def test_challenge_auc_uses_the_last_five_values_only():
    assert challenge_auc([0, 1, 2, 3, 4, 5]) == 0.5 * 1 + 2 + 3 + 4 + 0.5 * 5 == 12
    assert challenge_auc([1, 1, 1, 1, 1]) == 4.0


def test_challenge_auc_of_fewer_than_five_values_is_rejected_with_a_message():
    with pytest.raises(InputError, match="5 click steps"):
        challenge_auc([0.5, 0.6, 0.7, 0.8])


def _two_class_gt() -> np.ndarray:
    gt = _cube((16, 16, 16), (2, 2, 2), (8, 8, 8), value=1)
    gt[10:14, 10:14, 10:14] = 2
    return gt


def test_case_scores_average_over_classes_and_keep_the_box_step_out_of_the_auc():
    gt = _two_class_gt()
    only_first = np.where(gt == 1, 1, 0)
    preds = [np.zeros_like(gt), only_first, only_first, gt, gt, gt]
    scores = case_scores(preds, gt, (1.0, 1.0, 1.0), has_box=True)
    # Class 2 missing: DSC = (1 + 0) / 2, NSD = (1 + 0) / 2; an empty prediction scores 0 and skips NSD.
    assert scores["dsc_per_step"] == [0.0, 0.5, 0.5, 1.0, 1.0, 1.0]
    assert scores["nsd_per_step"] == [0.0, 0.5, 0.5, 1.0, 1.0, 1.0]
    assert scores["dsc_auc"] == pytest.approx(0.5 * 0.5 + 0.5 + 1 + 1 + 0.5 * 1)
    assert scores["nsd_auc"] == pytest.approx(3.25)
    assert scores["dsc_final"] == scores["nsd_final"] == 1.0


def test_case_scores_skip_nsd_when_dsc_is_at_most_0_2():
    gt = _cube((16, 16, 16), (2, 2, 2), (12, 12, 12))
    sliver = _cube(gt.shape, (2, 2, 2), (4, 4, 4))  # DSC = 2 * 8 / (1000 + 8) ~ 0.016
    good = _cube(gt.shape, (2, 2, 2), (12, 12, 11))
    scores = case_scores([gt, sliver, sliver, good, good, good], gt, (1, 1, 1), classes=[1], has_box=True)
    assert 0 < scores["dsc_per_step"][1] < 0.2
    assert scores["nsd_per_step"][1] == 0.0
    assert surface_dice(sliver, gt, (1, 1, 1)) > 0  # NSD itself would not be 0: the rule zeroes it
    assert scores["nsd_per_step"][3] == pytest.approx(surface_dice(good, gt, (1, 1, 1)))
    assert scores["nsd_per_step"][3] > 0


def test_a_case_without_a_box_scores_zero_at_the_box_step():
    gt = _two_class_gt()
    scores = case_scores([gt] * 5, gt, (1.0, 1.0, 1.0), has_box=False)
    assert scores["dsc_per_step"] == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert scores["nsd_per_step"] == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert scores["dsc_auc"] == scores["nsd_auc"] == 4.0


def test_case_scores_reject_too_few_steps_and_absent_classes_with_a_message():
    gt = _two_class_gt()
    with pytest.raises(InputError, match="5 clicks"):
        case_scores([gt] * 5, gt, (1, 1, 1), has_box=True)
    with pytest.raises(InputError, match="do not occur"):
        case_scores([gt] * 6, gt, (1, 1, 1), classes=[1, 3], has_box=True)
    with pytest.raises(InputError, match="no foreground"):
        case_scores([gt] * 6, np.zeros_like(gt), (1, 1, 1), has_box=True)
