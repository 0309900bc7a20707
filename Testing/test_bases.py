"""Click-blind base predictions for measuring and training the corrector on bases other than SegVol."""
from __future__ import annotations

import numpy as np
import pytest

from segvolgru.bases import BASE_FAMILIES, base_logits, soften
from segvolgru.metrics import dice
from segvolgru.phantoms import make_phantom


def test_soften_is_positive_inside_negative_outside_and_unsure_at_the_edge():
    mask = np.zeros((9, 9, 9), bool)
    mask[2:7, 2:7, 2:7] = True
    logits = soften(mask, 1.0)
    assert np.array_equal(logits > 0, mask) and abs(logits[2, 4, 4]) < 1 < logits[4, 4, 4]


@pytest.mark.parametrize("family", BASE_FAMILIES)
def test_every_family_gives_an_imperfect_but_related_prediction(family):
    volume, labels, _ = make_phantom(900_000_321, shape=(24, 64, 64))
    gt = labels == 1
    where = np.argwhere(gt)
    box = (*where.min(axis=0), *where.max(axis=0))
    scores = [dice(base_logits(family, gt, volume, box, np.random.default_rng(seed), labels > 1) > 0, gt)
              for seed in range(4)]
    assert max(scores) < 1.0 and (family == "threshold" or np.mean(scores) > 0.3)
    if family == "threshold":  # the box bounds it
        logits = base_logits(family, gt, volume, box, np.random.default_rng(0))
        outside = np.ones(gt.shape, bool)
        outside[box[0]:box[3] + 1, box[1]:box[4] + 1, box[2]:box[5] + 1] = False
        assert not (logits[outside] > 0).any()


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="unknown base family"):
        base_logits("oracle", np.ones((2, 2, 2), bool), np.zeros((2, 2, 2)), (0, 0, 0, 1, 1, 1),
                    np.random.default_rng(0))
