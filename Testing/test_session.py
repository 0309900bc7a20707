"""Interactive session and GRU correction mechanics (tiny model, live random correction head)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from engine_support import ct_like, tiny_model
from segvolgru import InteractiveSession, segment
from segvolgru import session as session_module
from segvolgru.cache import EmbeddingCache
from segvolgru.correction import (CorrectionConfig, apply_deltas, build_rows, click_depth, error_points, fuse,
                                  uncertain_points)
from segvolgru.errors import InputError
from segvolgru.inference import prompts_in_crop

BOX = (10, 30, 20, 29, 69, 59)
CORRECTION = {"k": 50, "hidden_size": 32, "row_dim": 16}


@pytest.fixture(scope="module")
def model():
    return tiny_model(CORRECTION)


@pytest.fixture()
def volume():
    return ct_like()


def _session(model, volume, **settings):
    return InteractiveSession(model, volume, cache=EmbeddingCache(), **settings)


def test_undo_redo_restore_the_exact_mask_and_gru_state(model, volume):
    # the random model's positive clicks write only with the plain radius: every step must change the mask
    s = _session(model, volume, positive_reach=None)
    s.set_box(BOX)
    masks, states = [s.mask.copy()], [s.hidden_state]
    for click, positive in [((20, 50, 40), True), ((12, 35, 30), False), ((25, 60, 50), True)]:
        s.add_click(click, positive)
        assert not np.array_equal(s.mask, masks[-1])
        masks.append(s.mask.copy())
        states.append(s.hidden_state)
    for n in (2, 1, 0):
        s.undo()
        np.testing.assert_array_equal(s.mask, masks[n])
        assert (s.hidden_state is None) == (states[n] is None)
        if states[n] is not None:
            assert torch.equal(s.hidden_state, states[n])
    for n in (1, 2, 3):
        s.redo()
        np.testing.assert_array_equal(s.mask, masks[n])
        assert torch.equal(s.hidden_state, states[n])


def test_replay_from_the_prompt_list_is_bit_identical(model, volume):
    s = _session(model, volume)
    s.set_box(BOX)
    s.add_click((20, 50, 40), True)
    s.add_click((35, 90, 85), False)
    again = InteractiveSession.replay(model, volume, s.prompts, cache=EmbeddingCache(), **s.settings())
    np.testing.assert_array_equal(again.mask, s.mask)
    assert torch.equal(again.hidden_state, s.hidden_state)
    np.testing.assert_array_equal(segment(model, volume, box=BOX, points=[(20, 50, 40), (35, 90, 85)],
                                          point_labels=[1, 0], mode="interactive").mask, s.mask)


def test_gru_state_is_carried_so_history_changes_the_correction(model, volume):
    """The same click after different histories: different hidden states, hence different deltas."""
    a, b = _session(model, volume), _session(model, volume)
    a.set_box(BOX)
    b.set_box(BOX)
    b.add_click((12, 35, 30), False)
    b.undo()
    b.add_click((25, 60, 50), True)
    a.add_click((22, 55, 45), True)
    assert not torch.equal(a.hidden_state, b.hidden_state)
    a.add_click((20, 50, 40), True)
    b.add_click((20, 50, 40), True)
    assert not torch.equal(a.hidden_state, b.hidden_state)
    prob = np.full((16, 40, 40), 0.5, np.float32)
    rows = build_rows(prob, np.array([[8, 20, 20]]), np.array([1]), model.correction.config)
    with torch.no_grad():
        delta_a, _ = model.correction(rows, a.hidden_state)
        delta_b, _ = model.correction(rows, b.hidden_state)
    assert (delta_a - delta_b).abs().max() > 0


def test_reset_clears_prompts_state_and_mask(model, volume):
    s = _session(model, volume)
    s.set_box(BOX)
    s.add_click((20, 50, 40), True)
    result = s.reset()
    assert s.prompts == [] and s.hidden_state is None and not result.mask.any()
    with pytest.raises(InputError, match="nothing to undo"):
        s.undo()


def test_sessions_on_one_volume_share_the_cache_and_keep_their_own_state(model, volume):
    cache = EmbeddingCache()
    first = InteractiveSession(model, volume, cache=cache)
    first.set_box(BOX)
    entries = len(cache)
    second = InteractiveSession(model, volume, cache=cache)
    second.set_box((12, 35, 25, 25, 60, 55))
    assert cache.hits > 0 and len(cache) > entries
    first.add_click((20, 50, 40), True)
    assert second.hidden_state is None and first.hidden_state is not None
    assert len(second.prompts) == 1


def test_a_box_can_be_required_before_clicks(model, volume):
    s = _session(model, volume, require_box=True)
    with pytest.raises(InputError, match="needs a box before clicks"):
        s.add_click((20, 50, 40), True)
    s.set_box(BOX)
    s.add_click((20, 50, 40), True)


def test_fusion_runs_without_the_gru(model, volume):
    fused, plain = _session(model, volume, gru=False), _session(model, volume, gru=False, fusion=False)
    for s in (fused, plain):
        s.set_box(BOX)
        s.add_click((20, 50, 40), False)
    assert not torch.equal(fused._state.logits, plain._state.logits)


def test_click_result_reports_the_extent_that_changed(model, volume):
    s = _session(model, volume)
    before = s.set_box(BOX).mask
    result = s.add_click((20, 50, 40), False)
    diff = np.argwhere(before != result.mask)
    if len(diff):
        assert result.changed_extent == (*diff.min(0), *diff.max(0))
    else:
        assert result.changed_extent is None


def test_gru_off_equals_plain_segvol_and_gru_on_differs(model, volume):
    off, on = _session(model, volume, gru=False, fusion=False), _session(model, volume, fusion=False)
    for s in (off, on):
        s.set_box(BOX)
        s.add_click((20, 50, 40), True)
    plain = tiny_model()
    reference = _session(plain, volume, fusion=False)
    reference.set_box(BOX)
    reference.add_click((20, 50, 40), True)
    np.testing.assert_array_equal(off.mask, reference.mask)
    assert not torch.equal(on._state.logits, off._state.logits)


def _background_model(correction: dict | None = None):
    """A decoder that predicts background everywhere, so that the ROI is the box's alone."""
    background = tiny_model(correction)
    with torch.no_grad():
        background.mask_decoder.output_upscaling[3].bias.fill_(3.0)
        background.mask_decoder.output_hypernetworks_mlps[0].layers[2].weight.zero_()
        background.mask_decoder.output_hypernetworks_mlps[0].layers[2].bias.fill_(-5.0)
    return background


def test_a_click_outside_the_roi_adds_a_window_around_it():
    background = _background_model()
    volume = ct_like(shape=(40, 200, 190))
    s = _session(background, volume, gru=False)
    s.set_box((12, 20, 20, 20, 50, 50))
    regions = len(s._state.regions)
    roi = s._state.regions[0].box
    far = (30, 190, 180)
    assert not all(roi[a] <= far[a] - s._prepared.pre.crop_start[a] <= roi[a + 3] for a in range(3))
    runs = s.engine.cache.misses
    s.add_click(far, True)
    assert len(s._state.regions) == regions + 1
    assert s.engine.cache.misses > runs  # the zoom-out pass ran again with the new click
    s.undo()
    assert len(s._state.regions) == regions


def test_session_may_start_from_clicks_alone(model, volume):
    s = _session(model, volume)
    result = s.add_click((20, 50, 40), True)
    assert result.mask.shape == volume.shape and s.prompts[0]["type"] == "click"


def test_same_click_twice_is_accepted(model, volume):
    s = _session(model, volume)
    s.set_box(BOX)
    s.add_click((20, 50, 40), True)
    s.add_click((20, 50, 40), True)
    assert len(s.prompts) == 3


def test_bad_input_leaves_the_session_unchanged(model, volume):
    s = _session(model, volume)
    with pytest.raises(InputError, match="nothing to undo"):
        s.undo()
    s.set_box(BOX)
    mask, prompts = s.mask.copy(), list(s.prompts)
    with pytest.raises(InputError, match="outside the volume"):
        s.add_click((40, 0, 0), True)
    with pytest.raises(InputError, match="nothing to redo"):
        s.redo()
    volume[0, 0, 0] += 1
    with pytest.raises(InputError, match="volume changed"):
        s.add_click((20, 50, 40), True)
    np.testing.assert_array_equal(s.mask, mask)
    assert s.prompts == prompts


def test_rows_pad_when_a_region_has_fewer_candidates_than_k():
    prob = np.full((4, 5, 6), 0.99, np.float32)
    prob[1, 2, 3] = 0.5
    rows = build_rows(prob, np.array([[1, 2, 3]]), np.array([0]), CorrectionConfig(k=30))
    assert rows.features.shape == (60, 10)
    assert int(rows.valid[:30].sum()) == 1
    assert int(rows.valid[30:].sum()) == 30  # 120 voxels wrongly foreground near a negative click, K kept
    assert float(rows.features[~rows.valid].abs().sum()) == 0.0
    assert rows.features[:, 1:4].max() <= 1.0


def test_uncertain_and_error_sets_follow_their_rules():
    prob = np.linspace(0, 1, 1000, dtype=np.float32).reshape(10, 10, 10)
    coords, values = uncertain_points(prob, 5, 0.1)
    assert np.all(np.abs(values - 0.5) <= np.abs(prob[(prob > 0.1) & (prob < 0.9)] - 0.5).min() + 0.003)
    pred = np.zeros((9, 9, 9), bool)
    found, labels = error_points(pred, np.array([[4, 4, 4]]), np.array([1]), 7, radius=1.0)
    assert len(found) == 7 and tuple(found[0]) == (4, 4, 4) and set(labels) == {1.0}


@pytest.mark.parametrize("wrong_share", [0.0, 0.02, 0.5, 1.0])
def test_error_rows_are_the_k_nearest_disagreeing_pairs_of_every_click(wrong_share):
    """Whatever ball the search stops at, the rows are those of scanning every click's whole radius: (voxel, click)
    pairs within the radius whose prediction disagrees with the click, by distance, then raster order, then click
    order, the first k."""
    rng = np.random.default_rng(5)
    shape, radius = (12, 30, 26), 9.0
    k_, j_, i_ = np.ogrid[:12, :30, :26]
    blob = (k_ - 6) ** 2 + (j_ - 14) ** 2 + (i_ - 12) ** 2 < 49
    pred = blob ^ (rng.random(shape) < wrong_share)
    clicks = np.array([[6, 14, 12], [0, 0, 0], [11, 29, 25], [6, 20, 12], [-3, 14, 12], [6, 14, 12]])
    labels = np.array([1, 0, 1, 0, 1, 0])
    grid = np.indices(shape).reshape(3, -1).T
    for chosen in [[n] for n in range(len(clicks))] + [list(range(len(clicks)))]:
        pairs = []
        for n in chosen:
            dist = np.sqrt(((grid - clicks[n]) ** 2).sum(axis=1))
            for index in np.flatnonzero((dist <= radius) & (pred.reshape(-1) != bool(labels[n]))):
                pairs.append((dist[index], index, n, labels[n]))
        pairs.sort()
        for k in (1, 30, 200, 5000):
            coords, found = error_points(pred, clicks[chosen], labels[chosen], k, radius)
            np.testing.assert_array_equal(coords, grid[[p[1] for p in pairs[:k]]].reshape(-1, 3))
            np.testing.assert_array_equal(found, [float(p[3]) for p in pairs[:k]])


def test_padding_rows_are_never_written_and_sparse_writes_only_at_rows():
    logits = torch.zeros(10, 10, 10)
    prob = np.full((10, 10, 10), 0.5, np.float32)
    config = CorrectionConfig(k=4, write_back="sparse")
    rows = build_rows(prob, np.array([[5, 5, 5]]), np.array([1]), config)
    rows.valid[1] = False
    delta = torch.ones(8)
    out = apply_deltas(logits, rows, delta * rows.valid, np.array([5, 5, 5]), config)
    written = torch.nonzero(out).tolist()
    valid_coords = {tuple(c) for c in rows.coords[rows.valid].tolist()}
    assert {tuple(c) for c in written} <= valid_coords and len(written) > 0


def test_uncertain_points_break_ties_in_raster_order():
    prob = np.full((6, 7, 8), 0.3, np.float32)
    prob[5, 6, 7] = 0.5
    coords, values = uncertain_points(prob, 4, 0.1)
    assert coords.tolist() == [[5, 6, 7], [0, 0, 0], [0, 0, 1], [0, 0, 2]]
    assert values.tolist() == pytest.approx([0.5, 0.3, 0.3, 0.3])


def test_spread_write_back_moves_the_mask_around_the_click():
    # confident background: no uncertain rows, only the error rows around the click
    logits = torch.full((30, 30, 30), -4.0)
    prob = torch.sigmoid(logits).numpy()
    config = CorrectionConfig(k=20, error_radius=6, spread_sigma=2)
    rows = build_rows(prob, np.array([[15, 15, 15]]), np.array([1]), config)
    out = apply_deltas(logits, rows, torch.full((40,), 6.0) * rows.valid, np.array([15, 15, 15]), config)
    changed = (out > 0).sum().item()
    assert changed > 40  # far more voxels than the 20 written rows
    assert (out[:, :, :5] == -4.0).all()  # nothing beyond the error radius


def test_fusion_keeps_previous_values_beyond_radius_unless_confident():
    config = CorrectionConfig(fusion_radius=5)
    prev = torch.full((1, 1, 30), -3.0)
    new = torch.tensor([[[0.5] * 10 + [4.0] * 10 + [0.2] * 10]])
    fused = fuse(prev, new, (0, 0, 0), np.array([0, 0, 2]), config)
    assert torch.equal(fused[0, 0, :8], new[0, 0, :8])       # within R of the click: new values
    assert (fused[0, 0, 8:10] == -3.0).all()                  # beyond R, unsure: previous
    assert torch.equal(fused[0, 0, 10:20], new[0, 0, 10:20])  # beyond R, confident: new
    assert (fused[0, 0, 20:] == -3.0).all()


def test_fusion_keeping_accepted_values_lets_a_confident_value_replace_only_an_unsure_one():
    config = CorrectionConfig(fusion_radius=5, fusion_keep_accepted=True)
    prev = torch.tensor([[[-3.0] * 10 + [0.3] * 10 + [3.0] * 10]])
    new = torch.tensor([[[4.0] * 30]])
    new[0, 0, 25:] = -4.0
    fused = fuse(prev, new, (0, 0, 0), np.array([0, 0, 2]), config)
    assert torch.equal(fused[0, 0, :8], new[0, 0, :8])         # within R of the click: new values
    assert (fused[0, 0, 8:10] == -3.0).all()                    # beyond R, accepted background stays
    assert torch.equal(fused[0, 0, 10:20], new[0, 0, 10:20])    # beyond R, unsure before: the confident new value
    assert (fused[0, 0, 20:] == 3.0).all()                      # accepted foreground stays, even against -4
    assert (fuse(prev, torch.full_like(new, 0.1), (0, 0, 0), np.array([0, 0, 2]), config)[0, 0, 8:] ==
            prev[0, 0, 8:]).all()                               # unsure new values never replace anything


def test_untrained_head_leaves_segvol_unchanged():
    from segvolgru.correction import ClickCorrector

    module = ClickCorrector(CorrectionConfig(k=5, hidden_size=8, row_dim=4))
    rows = build_rows(np.full((6, 6, 6), 0.5, np.float32), np.array([[2, 2, 2]]), np.array([1]), module.config)
    with torch.no_grad():
        delta, hidden = module(rows, module.initial_state())
    assert float(delta.abs().sum()) == 0.0 and hidden.shape == (1, 8)


def test_fusion_with_an_origin_equals_the_rule_on_every_voxel():
    """The fast fusion (distances only inside the ball's box) against the rule evaluated everywhere."""
    config = CorrectionConfig(fusion_radius=4)
    rng = np.random.default_rng(5)
    prev, new = (torch.from_numpy(rng.normal(0, 3, (12, 14, 16)).astype(np.float32)) for _ in range(2))
    origin, click = (3, -2, 5), np.array([9, 4, 6])
    fused = fuse(prev, new, origin, click, config)
    k, j, i = np.meshgrid(*(np.arange(n) + o for n, o in zip(new.shape, origin)), indexing="ij")
    near = torch.from_numpy((k - 9) ** 2 + (j - 4) ** 2 + (i - 6) ** 2 <= 16)
    confident = (torch.sigmoid(new) < 0.1) | (torch.sigmoid(new) > 0.9)
    assert torch.equal(fused, torch.where(near | confident, new, prev))


def test_results_are_read_only_snapshots_that_later_steps_leave_alone(model, volume):
    # the click lies in a one-voxel hole of the random model's mask: the plain radius makes it change the mask
    s = _session(model, volume, positive_reach=None)
    first = s.set_box(BOX)
    kept = first.mask.copy()
    second = s.add_click((20, 50, 40), True)
    assert not first.mask.flags.writeable and not second.mask.flags.writeable
    np.testing.assert_array_equal(first.mask, kept)
    assert not np.array_equal(second.mask, kept)
    np.testing.assert_array_equal(second.mask, s.mask)


def test_a_click_re_stitches_only_its_windows_and_equals_a_full_stitch(model):
    """ROI longer than one window along K: the click re-decodes two of the windows, and the region's logits equal
    stitching every window again."""
    volume = ct_like(shape=(90, 128, 120))
    s = _session(model, volume, gru=False, fusion=False)
    s.set_box((5, 30, 20, 80, 90, 90))
    region = s._state.regions[0]
    assert len(region.grid.starts) > 2
    s.add_click((40, 60, 50), True)
    pts, labels = s._clicks(s.prompts)
    crop_box, crop_pts = prompts_in_crop(s._prepared, s._box(s.prompts), pts)
    _, full = s._decode_region(region, crop_box, crop_pts, labels)
    assert torch.equal(s._state.logits[tuple(slice(a, b + 1) for a, b in zip(region.box[:3], region.box[3:]))],
                       full)


def test_polarity_fusion_never_lowers_after_a_positive_click_nor_raises_after_a_negative_one():
    config = CorrectionConfig(fusion_radius=3, polarity_fusion=True, negative_reach=None, positive_reach=None)
    rng = np.random.default_rng(8)
    prev, new = (torch.from_numpy(rng.normal(0, 4, (6, 8, 10)).astype(np.float32)) for _ in range(2))
    plain = fuse(prev, new, (0, 0, 0), np.array([3, 4, 5]),
                 CorrectionConfig(fusion_radius=3, negative_reach=None, positive_reach=None))
    up = fuse(prev, new, (0, 0, 0), np.array([3, 4, 5]), config, positive=True)
    down = fuse(prev, new, (0, 0, 0), np.array([3, 4, 5]), config, positive=False)
    assert torch.equal(up, torch.maximum(prev, plain)) and torch.equal(down, torch.minimum(prev, plain))
    assert torch.equal(fuse(prev, new, (0, 0, 0), np.array([3, 4, 5]), config), plain)  # polarity unknown


def _rim(click_i: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Previous logits: a mask filling i < 20 of a 21x21x40 region; new logits: background everywhere, as a
    decoder that drops the whole structure after a negative click at (10, 10, click_i)."""
    prev = torch.full((21, 21, 40), -3.0)
    prev[:, :, :20] = 3.0
    return prev, torch.full_like(prev, -3.0), np.array([10, 10, click_i])


def _distance_to(click: np.ndarray, shape) -> torch.Tensor:
    grid = np.indices(shape).reshape(3, -1).T
    return torch.from_numpy(np.sqrt(((grid - click) ** 2).sum(1)).reshape(shape))


def test_a_negative_click_on_a_thin_rim_removes_only_a_ball_as_deep_as_the_click():
    prev, new, click = _rim(17)  # 3 voxels from the mask's edge at i = 20
    assert click_depth(prev, click.astype(float), 20.0, positive=False) == 3.0
    fused = fuse(prev, new, (0, 0, 0), click, CorrectionConfig(fusion_radius=20, negative_reach=1.5), False)
    near = _distance_to(click, prev.shape) <= 4.5
    assert (fused[near] == -3.0).all()
    assert torch.equal(fused[~near], prev[~near])  # the structure behind the rim stays
    # the fixed radius (and the confident new values beyond it) would have removed the whole structure
    fixed = fuse(prev, new, (0, 0, 0), click, CorrectionConfig(fusion_radius=20, negative_reach=None), False)
    assert not (fixed > 0).any()


def test_a_negative_click_deep_inside_a_false_blob_reaches_across_it_up_to_the_fusion_radius():
    prev, new, click = _rim(2)
    prev[:, :, :] = 3.0  # no edge within the fusion radius
    fused = fuse(prev, new, (0, 0, 0), click, CorrectionConfig(fusion_radius=6, negative_reach=1.5), False)
    near = _distance_to(click, prev.shape) <= 6
    assert (fused[near] == -3.0).all() and torch.equal(fused[~near], prev[~near])


def test_a_positive_reach_measures_the_depth_outside_the_mask():
    prev, _, click = _rim(26)  # 7 voxels from the nearest mask voxel at i = 19
    new = torch.full_like(prev, 3.0)
    assert click_depth(prev, click.astype(float), 20.0, positive=True) == 7.0
    fused = fuse(prev, new, (0, 0, 0), click, CorrectionConfig(fusion_radius=20, positive_reach=1.0), True)
    near = _distance_to(click, prev.shape) <= 7
    assert (fused[near] == 3.0).all() and torch.equal(fused[~near], prev[~near])
    assert click_depth(torch.full((5, 5, 5), -1.0), np.array([2.0, 2, 2]), 3.0, positive=True) == 3.0


@pytest.mark.parametrize("gru", [True, False])
def test_a_negative_click_in_a_session_changes_only_the_ball_its_depth_allows(model, volume, gru):
    from scipy import ndimage

    s = _session(model, volume, gru=gru)
    before = s.set_box(BOX).mask.astype(bool)
    depth = ndimage.distance_transform_edt(before)  # distance to the nearest voxel outside the mask
    inner = depth * (depth < 0.5 * s.correction_config.fusion_radius)
    click = np.unravel_index(int(np.argmax(inner)), before.shape)
    assert before[click] and 1 < depth[click]
    after = s.add_click(tuple(int(c) for c in click), False).mask.astype(bool)
    changed = np.argwhere(before != after)
    reach = s.correction_config.negative_reach * depth[click]
    assert len(changed) > 0 and not (after & ~before).any()
    assert np.sqrt(((changed - np.array(click)) ** 2).sum(1)).max() <= reach


def test_a_click_outside_every_region_fuses_both_passes_with_the_radius_measured_before_it(monkeypatch):
    """The zoom-out pass writes first; the window's fusion must not measure the click's depth on that write."""
    import segvolgru.session as session_module
    from segvolgru.correction import click_radius

    volume = ct_like(shape=(40, 200, 190))
    s = _session(_background_model(CORRECTION), volume, positive_reach=1.0)
    s.set_box((12, 20, 20, 20, 50, 50))
    far = (30, 190, 180)
    crop_click = np.asarray(far) - np.asarray(s._prepared.pre.crop_start)
    assert not any(all(r.box[a] <= crop_click[a] <= r.box[a + 3] for a in range(3)) for r in s._state.regions)
    expected = click_radius(s._state.logits.clone(), crop_click, s.correction_config, True)
    import segvolgru.click_step as click_step_module

    radii, fuse = [], session_module.fuse
    for module in (session_module, click_step_module):  # the zoom-out pass, then the click step's fusion
        monkeypatch.setattr(module, "fuse", lambda *args: radii.append(args[6]) or fuse(*args))
    s.add_click(far, True)
    assert radii == [expected, expected]


def test_a_click_on_a_voxel_that_already_has_its_label_gets_the_plain_fusion_radius():
    from segvolgru.correction import click_radius

    prev, _, click = _rim(17)
    config = CorrectionConfig(fusion_radius=20, positive_reach=1.0, negative_reach=1.5)
    assert click_radius(prev, click, config, True) == 20.0  # positive inside the mask
    assert click_radius(prev, click, config, False) == 4.5  # negative inside: 1.5 x depth 3
    outside = np.array([10, 10, 30])
    assert click_radius(prev, outside, config, False) == 20.0  # negative outside the mask
    assert click_radius(prev, outside, config, True) == 11.0  # positive outside: depth 11 (to i = 19)


def test_reach_must_be_positive():
    with pytest.raises(ValueError, match="negative_reach"):
        CorrectionConfig(negative_reach=0)
    with pytest.raises(ValueError, match="positive_reach"):
        CorrectionConfig(positive_reach=-1.0)


def test_intensity_aware_spread_stays_in_the_clicked_structure():
    """A bright half and a dark half: a positive delta spread from a click in the bright half reaches the dark
    half only with the image ignored."""
    config = CorrectionConfig(k=40, error_radius=8, spread_sigma=2)
    image = torch.zeros(16, 16, 16)
    image[:, :, 8:] = 1.0
    logits = torch.full((16, 16, 16), -5.0)
    rows = build_rows(torch.sigmoid(logits).numpy(), np.array([[8, 8, 10]]), np.array([1]), config)
    delta = torch.full((80,), 4.0) * rows.valid
    plain = apply_deltas(logits, rows, delta, np.array([8, 8, 10]), config)
    aware = apply_deltas(logits, rows, delta, np.array([8, 8, 10]), replace(config, spread_intensity_sigma=0.1),
                         image)
    assert (plain[:, :, :8] > -5).any()                       # the plain field crosses into the dark half
    assert torch.allclose(aware[:, :, :8], logits[:, :, :8])  # the intensity-aware one does not
    assert torch.equal(aware[:, :, 8:], plain[:, :, 8:])      # and is unchanged where the intensity matches


def _long_session(model, clicks: int):
    """A one-window volume and box, and clicks of alternating polarity in a block inside the box."""
    volume = ct_like(shape=(16, 64, 64))
    s = _session(model, volume)
    rng = np.random.default_rng(3)
    return s, (2, 10, 10, 13, 50, 50), [(tuple(int(v) for v in rng.integers((4, 20, 20), (12, 40, 40))), n % 2 == 0)
                                        for n in range(clicks)]


def test_past_the_recent_clicks_the_decoder_and_the_error_rows_see_only_the_newest(model, monkeypatch):
    """A click's cost stops growing with the session: each decoder run gets at most RECENT_CLICKS points, the
    newest in its window, and the error rows scan at most RECENT_CLICKS clicks, the newest in the region."""
    cap = session_module.RECENT_CLICKS
    s, box, clicks = _long_session(model, cap + 10)
    decoded, scanned = [], []
    import segvolgru.click_step as click_step_module

    decode, rows = s.engine.decode, click_step_module.build_rows

    def counting_decode(embedding, key, box, points, *args, **kwargs):
        decoded.append(np.zeros((0, 3)) if points is None else np.asarray(points).copy())
        return decode(embedding, key, box, points, *args, **kwargs)

    def counting_rows(prob, clicks, labels, config, image=None):
        scanned.append(clicks.copy())
        return rows(prob, clicks, labels, config, image)

    monkeypatch.setattr(s.engine, "decode", counting_decode)
    monkeypatch.setattr(click_step_module, "build_rows", counting_rows)  # the click step builds the rows
    s.set_box(box)
    for voxel, positive in clicks:
        s.add_click(voxel, positive)
    assert len(s._state.regions) == 1 and len(s._state.regions[0].grid.starts) == 1
    assert max(len(p) for p in decoded) == cap and len(decoded[-1]) == cap
    assert max(len(c) for c in scanned) == cap
    newest = np.asarray([v for v, _ in clicks[-cap:]]) - s._prepared.pre.crop_start - s._state.regions[0].start
    np.testing.assert_array_equal(scanned[-1], newest)


def test_sessions_shorter_than_the_recent_clicks_equal_those_with_every_click(model, monkeypatch):
    s, box, clicks = _long_session(model, 30)
    s.set_box(box)
    for voxel, positive in clicks:
        s.add_click(voxel, positive)
    volume = s._volume
    monkeypatch.setattr(session_module, "RECENT_CLICKS", 10 ** 9)
    every = InteractiveSession.replay(model, volume, s.prompts, cache=EmbeddingCache(), **s.settings())
    np.testing.assert_array_equal(every.mask, s.mask)
    assert torch.equal(every._state.logits, s._state.logits)
    assert torch.equal(every.hidden_state, s.hidden_state)
    # the comparison can tell: with fewer recent clicks than the session has, the result differs
    monkeypatch.setattr(session_module, "RECENT_CLICKS", 5)
    fewer = InteractiveSession.replay(model, volume, s.prompts, cache=EmbeddingCache(), **s.settings())
    assert not torch.equal(fewer._state.logits, s._state.logits)


def test_the_correctors_network_shape_is_no_session_setting_and_replays_leave_it_out():
    model = tiny_model(CORRECTION)
    volume = ct_like(shape=(20, 48, 48))
    with pytest.raises(InputError, match="not a session setting"):
        InteractiveSession(model, volume, hidden_size=12345)
    session = InteractiveSession(model, volume)
    assert not {"hidden_size", "row_dim", "patch_radius"} & set(session.settings())
    session.set_box((4, 10, 10, 14, 30, 30))
    session.add_click((9, 20, 20), True)
    again = InteractiveSession.replay(model, volume, session.prompts, **session.settings())
    np.testing.assert_array_equal(again.mask, session.mask)
