"""Interactive sessions: one structure of one volume, refined click by click (``mode="interactive"``).

Only the user's prompts reach SegVol: the box (clipped to each window) and the clicks with their true polarity, in
the zoom-out pass and in every window that contains them, the newest :data:`RECENT_CLICKS` of them in each, so that
a click costs the same however long the session is (an older click keeps what it already wrote). The zoom-in ROI
(zoom-out mask ∪ box ∪ clicks, padded the official way) is frozen after the first prompt; a click inside it
re-decodes only the windows that contain it, a click outside it adds a window around it. After SegVol, the stateful
GRU correction and the multi-round fusion run (see :mod:`segvolgru.correction`). Every step can be undone and redone
exactly; replaying the prompt list rebuilds a bit-identical session. Prompts are (K, J, I) voxel indices of the volume.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .cache import EmbeddingCache, content_key
from .click_step import refine_step
from .correction import CorrectionConfig, ball_box, click_radius, fuse
from .engine import Engine, PreparedVolume, Roi
from .errors import InputError
from .inference import SegmentResult, engine_for, official_roi, prompts_in_crop, roi_slices
from .network import SegVol
from .preprocessing import check_volume
from .prompts import EMPTY_BOX, box_cube, box_to_zoom_out, clip_box, points_to_zoom_out, upsample_nearest
from .prompts import validate_box, validate_points
from .validation import as_polarity, check_setting, validate_spacing
from .windows import WindowGrid, bounding_box, window_grid

_FLOOR_LOGIT = -20.0
MAX_HISTORY = 50
# the session's own settings and their types (the correction's are CorrectionConfig's fields)
# The corrector's network shape: fixed by the model's corrector, never a session's choice.
ARCHITECTURE_KEYS = ("hidden_size", "row_dim", "patch_radius")
_SESSION_SETTINGS = {"overlap": "float", "gru": "bool", "text": "str | None", "require_box": "bool"}
# what a stored prompt holds, by type
_PROMPT_KEYS = {"box": {"type", "box"}, "click": {"type", "voxel", "positive"}}
# The most clicks one decoder run sees (the newest in its window, or in the volume for the zoom-out pass) and the
# correction's error rows look around (the newest in the region): the decoder's cost grows with its prompt count and
# the error rows' with the clicks they scan. Sessions with fewer clicks are unaffected.
RECENT_CLICKS = 50


@dataclass
class SessionResult:
    """The mask after a step (a read-only snapshot: later steps never change it), the inclusive
    (k0, j0, i0, k1, j1, i1) volume extent that changed (None: nothing did) and seconds per stage."""

    mask: np.ndarray
    changed_extent: tuple[int, int, int, int, int, int] | None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Region:
    """A zoom-in region: inclusive crop box, its window grid and the padded image under it."""

    box: Roi
    grid: WindowGrid
    padded_image: torch.Tensor

    @property
    def start(self) -> np.ndarray:
        return np.asarray(self.box[:3])


@dataclass
class _State:
    logits: torch.Tensor
    regions: list[_Region]
    hidden: torch.Tensor | None


@dataclass
class _Step:
    prompt: dict
    hidden_before: torch.Tensor | None = None
    hidden_after: torch.Tensor | None = None
    writes: list[tuple[tuple[slice, ...], torch.Tensor, torch.Tensor]] = field(default_factory=list)
    regions_before: int = 0
    new_regions: list[_Region] = field(default_factory=list)
    record: bool = True
    before: _State | None = None  # set for steps that rebuild the whole state
    after: _State | None = None


def _contains(outer: tuple[slice, ...], inner: tuple[slice, ...]) -> bool:
    """Whether the region of ``inner`` lies inside ``outer`` (both with explicit starts and stops)."""
    return all(o.start <= i.start and i.stop <= o.stop for o, i in zip(outer, inner))


def fingerprint(volume: np.ndarray) -> tuple:
    """Shape, dtype and 4096 fixed voxels: a cheap check that the caller's array did not change."""
    flat = volume.reshape(-1)
    index = np.linspace(0, flat.size - 1, num=min(4096, flat.size)).astype(np.int64)
    return volume.shape, volume.dtype.str, flat[index].tobytes()


class InteractiveSession:
    """Box and clicks on one structure, with undo/redo, exact replay and a GRU state carried across clicks.

    Settings: ``overlap`` (0.5), ``gru`` (True; the correction runs when the model has a correction module),
    ``text`` (None), ``require_box`` (False: a session may start from clicks alone, as the challenge allows),
    ``fusion`` (True, with or without the GRU), and the correction switches of :class:`CorrectionConfig`
    (``write_back``, ``k``, ``tau``, ``error_radius``, ``fusion_radius``, ``fusion_band``, ``spread_sigma``,
    ``spread_intensity_sigma``, ``polarity_fusion``, ``fusion_keep_accepted``, ``negative_reach``,
    ``positive_reach``)
    overriding the model's.
    """

    def __init__(self, model: SegVol, volume: np.ndarray, spacing=None, cache: EmbeddingCache | None = None,
                 **settings) -> None:
        check_volume(volume)
        self.engine: Engine = engine_for(model, cache)
        self.model = model
        self.spacing = None if spacing is None else validate_spacing(spacing, "session spacing")
        architecture = sorted(set(settings) & set(ARCHITECTURE_KEYS))
        if architecture:
            raise InputError(f"{', '.join(architecture)} describe the corrector's network, which comes with the model "
                             "(load_model(..., correction=FILE)), not a session setting: leave them out")
        known = {**_SESSION_SETTINGS, **{f.name: str(f.type) for f in dataclasses.fields(CorrectionConfig)
                                         if f.name not in ARCHITECTURE_KEYS}}
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise InputError(f"unknown session settings {unknown}: the known ones are {', '.join(known)}")
        for name, value in settings.items():
            check_setting(name, value, known[name])
        self.overlap = float(settings.pop("overlap", 0.5))
        if not 0 <= self.overlap < 1:
            raise InputError(f"invalid session setting overlap={self.overlap}: it must be in [0, 1)")
        self.gru = bool(settings.pop("gru", True))
        self.text = settings.pop("text", None)
        self.require_box = bool(settings.pop("require_box", False))
        base = model.correction.config if model.correction is not None else CorrectionConfig()
        try:
            self.correction_config = dataclasses.replace(base, **settings)
        except ValueError as exc:
            raise InputError(f"invalid session setting: {exc}") from None
        self._caller = volume
        self._fingerprint = fingerprint(volume)
        self._volume = np.array(volume, copy=True)
        self._volume.setflags(write=False)
        self._prepared: PreparedVolume = self.engine.prepare(self._volume, content_key(self._volume))
        self._text_emb = self.engine.text_embedding(self.text)
        self._window_logits: dict[tuple, torch.Tensor] = {}
        self.prompts: list[dict] = []
        self._history: list[_Step] = []
        self._redo: list[_Step] = []
        self._state = self._empty_state()
        self.mask = np.zeros(self._volume.shape, np.uint8)

    # ----------------------------------------------------------------- public API
    @property
    def correction_active(self) -> bool:
        return self.gru and self.model.correction is not None

    @property
    def corrector(self) -> str:
        """Which click corrector the session runs: the model's (``corrector_source``: its own, a file) or "off"."""
        return getattr(self.model, "corrector_source", "own") if self.correction_active else "off"

    @property
    def hidden_state(self) -> torch.Tensor | None:
        return None if self._state.hidden is None else self._state.hidden.clone()

    def set_box(self, box_kji) -> SessionResult:
        """Set (or replace) the box; replacing it rebuilds the session with the existing clicks."""
        self._check_volume()
        box = validate_box(box_kji, self._volume.shape)
        return self._push({"type": "box", "box": list(box)})

    def add_click(self, voxel_kji, positive: bool) -> SessionResult:
        """Add one click at a (k, j, i) voxel; ``positive`` True (or 1) adds, False (or 0) removes; anything
        else, such as the string "false", raises InputError."""
        self._check_volume()
        positive = as_polarity(positive, f"the click at {voxel_kji!r}")
        pts, _ = validate_points([voxel_kji], [int(positive)], self._volume.shape)
        if self.require_box and self._box(self.prompts) is None:
            raise InputError("this session needs a box before clicks (require_box=True): place the box first")
        return self._push({"type": "click", "voxel": [int(v) for v in pts[0]], "positive": bool(positive)})

    def undo(self) -> SessionResult:
        if not self._history:
            if self.prompts:
                raise InputError(f"nothing more to undo: the undo history holds the last {MAX_HISTORY} steps and "
                                 "they are all undone; reset clears the session")
            raise InputError("nothing to undo: this session has no prompts yet")
        step = self._history.pop()
        if step.before is not None:
            self._state = step.before
        else:
            for sl, old, _ in reversed(step.writes):
                self._state.logits[sl] = old
            del self._state.regions[step.regions_before:]
            self._state.hidden = step.hidden_before
        self.prompts.pop()
        self._redo.append(step)
        return self._result(step)

    def redo(self) -> SessionResult:
        if not self._redo:
            raise InputError("nothing to redo")
        step = self._redo.pop()
        if step.after is not None:
            self._state = step.after
        else:
            for sl, _, new in step.writes:
                self._state.logits[sl] = new
            self._state.regions.extend(step.new_regions)
            self._state.hidden = step.hidden_after
        self.prompts.append(step.prompt)
        self._history.append(step)
        return self._result(step)

    def reset(self) -> SessionResult:
        """Forget every prompt and the GRU state (not undoable); the mask becomes empty."""
        old_mask = self.mask
        self.prompts, self._history, self._redo = [], [], []
        self._state = self._empty_state()
        self.mask = np.zeros(self._volume.shape, np.uint8)
        return SessionResult(self._snapshot(), bounding_box(old_mask != self.mask))

    def settings(self) -> dict:
        """Plain data that, with the prompts, reproduces this session exactly."""
        correction = {k: v for k, v in self.correction_config.to_dict().items() if k not in ARCHITECTURE_KEYS}
        return {"overlap": self.overlap, "gru": self.gru, "text": self.text, "require_box": self.require_box,
                **correction}

    @classmethod
    def replay(cls, model: SegVol, volume: np.ndarray, prompts: list[dict], spacing=None,
               cache: EmbeddingCache | None = None, **settings) -> "InteractiveSession":
        """A new session with ``prompts`` applied in order: bit-identical to the session that recorded them.

        Each prompt is ``{"type": "box", "box": [k0, j0, i0, k1, j1, i1]}`` or ``{"type": "click", "voxel": [k, j, i],
        "positive": true}``, as :attr:`prompts` records them; anything else raises InputError naming the prompt.
        """
        if not isinstance(prompts, (list, tuple)):
            raise InputError(f"prompts must be a list of stored prompts, got {type(prompts).__name__}")
        session = cls(model, volume, spacing=spacing, cache=cache, **settings)
        for n, prompt in enumerate(prompts):
            kind = prompt.get("type") if isinstance(prompt, dict) else None
            if not isinstance(kind, str) or _PROMPT_KEYS.get(kind) != set(prompt):
                raise InputError(f"stored prompt {n} {prompt!r} is not a prompt: expected {{'type': 'box', 'box': "
                                 "[k0, j0, i0, k1, j1, i1]} or {'type': 'click', 'voxel': [k, j, i], 'positive': "
                                 "true or false}")
            try:
                if kind == "box":
                    session.set_box(prompt["box"])
                else:
                    session.add_click(prompt["voxel"], prompt["positive"])
            except InputError as exc:
                raise InputError(f"stored prompt {n}: {exc}") from None
        return session

    # ----------------------------------------------------------------- steps
    def _push(self, prompt: dict) -> SessionResult:
        started = time.perf_counter()
        incremental = prompt["type"] == "click" and self._state.regions
        if incremental:
            step = self._click_step(prompt)
        else:
            before = self._state
            after = self._compute(self.prompts + [prompt])
            step = _Step(prompt, before=before, after=after)
            self._state = after
        self.prompts.append(prompt)
        self._history.append(step)
        self._history = self._history[-MAX_HISTORY:]
        self._redo.clear()
        result = self._result(step)
        result.timings["total_s"] = time.perf_counter() - started
        return result

    def _result(self, step: _Step) -> SessionResult:
        """Bring the mask up to date with the logits a step wrote (all of it after a rebuild, else only the
        bounding box of its writes) and report the extent that changed."""
        crop_start = np.asarray(self._prepared.pre.crop_start)
        shape = np.asarray(self._prepared.crop_shape)
        if step.before is not None or step.after is not None:
            lo, hi = np.zeros(3, int), shape
        elif step.writes:
            starts = np.array([[sl[a].start or 0 for a in range(3)] for sl, _, _ in step.writes])
            stops = np.array([[shape[a] if sl[a].stop is None else sl[a].stop for a in range(3)]
                              for sl, _, _ in step.writes])
            lo, hi = starts.min(axis=0), stops.max(axis=0)
        else:
            return SessionResult(self._snapshot(), None)
        crop_sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        vol_sl = tuple(slice(int(a + o), int(b + o)) for a, b, o in zip(lo, hi, crop_start))
        new = (torch.sigmoid(self._state.logits[crop_sl]) > 0.5).numpy().astype(np.uint8)
        changed = bounding_box(self.mask[vol_sl] != new)
        if changed is not None:
            if sys.getrefcount(self.mask) > 2:
                # an earlier snapshot (or a caller) still holds this array: write into a copy (copy on write,
                # instead of a full-volume copy for every result)
                self.mask = self.mask.copy()
            self.mask[vol_sl] = new
            offset = np.concatenate([lo + crop_start, lo + crop_start])
            changed = tuple(int(v) for v in np.asarray(changed) + offset)
        return SessionResult(self._snapshot(), changed)

    def _snapshot(self) -> np.ndarray:
        view = self.mask.view()
        view.setflags(write=False)
        return view

    def _empty_state(self) -> _State:
        return _State(torch.full(self._prepared.crop_shape, _FLOOR_LOGIT), [], None)

    def _clicks(self, prompts: list[dict]) -> tuple[np.ndarray, np.ndarray]:
        clicks = [p for p in prompts if p["type"] == "click"]
        if not clicks:
            return np.zeros((0, 3), np.int64), np.zeros((0,), np.int64)
        pts = np.asarray([c["voxel"] for c in clicks], np.int64)
        return pts, np.asarray([int(c["positive"]) for c in clicks], np.int64)

    def _box(self, prompts: list[dict]):
        boxes = [p["box"] for p in prompts if p["type"] == "box"]
        return tuple(boxes[-1]) if boxes else None

    def _compute(self, prompts: list[dict]) -> _State:
        """A fresh state from the first prompt, then each later click incrementally (no history kept)."""
        box = self._box(prompts)
        clicks = [p for p in prompts if p["type"] == "click"]
        first = [] if box is not None else clicks[:1]
        state = self._start(box, first)
        saved, self._state = self._state, state
        try:
            done = list(first) + ([{"type": "box", "box": list(box)}] if box is not None else [])
            for click in clicks[len(first):]:
                self._click_step(click, done)
                done.append(click)
        finally:
            self._state = saved
        return state

    def _zoom_out_logits(self, crop_box, crop_pts, labels) -> torch.Tensor:
        """The zoom-out pass with the box and the newest clicks (true polarity), nearest-upsampled to the crop."""
        prepared, spatial = self._prepared, self.engine.window
        zoom_box = box_to_zoom_out(crop_box, prepared.crop_shape, spatial) if crop_box is not None else None
        crop_pts, labels = crop_pts[-RECENT_CLICKS:], labels[-RECENT_CLICKS:]
        zoom_pts = points_to_zoom_out(crop_pts, prepared.crop_shape, spatial) if len(crop_pts) else crop_pts
        low = self.engine.decode(self.engine.zoom_out_embedding(prepared), ("zoom_out", prepared.key), zoom_box,
                                 zoom_pts, labels, self._text_emb, self.text)
        return upsample_nearest(self.engine.upsample(low), prepared.crop_shape)

    def _start(self, box, first_clicks: list[dict]) -> _State:
        prepared = self._prepared
        pts, labels = self._clicks(first_clicks)
        crop_box, crop_pts = prompts_in_crop(prepared, box, pts)
        logits = self._zoom_out_logits(crop_box, crop_pts, labels)
        seed = torch.sigmoid(logits) > 0.5
        if crop_box is not None:
            seed |= box_cube(crop_box, prepared.crop_shape).bool()
        for p in crop_pts:
            seed[tuple(p)] = True
        state = _State(logits, [], None)
        roi = official_roi(seed, self.engine.window)
        saved, self._state = self._state, state
        try:
            region = self._new_region(roi)
            state.regions.append(region)
            _, new = self._decode_region(region, crop_box, crop_pts, labels)
            logits[roi_slices(roi)] = new
            if len(crop_pts) and self.correction_active:
                self._refine(state, roi_slices(roi), crop_pts, labels)
        finally:
            self._state = saved
        return state

    def _new_region(self, box: Roi) -> _Region:
        shape = tuple(b - a + 1 for a, b in zip(box[:3], box[3:]))
        grid = window_grid(shape, self.engine.window, self.overlap)
        return _Region(box, grid, grid.pad(self._prepared.image[roi_slices(box)]))

    def _window_prompts(self, region: _Region, index: int, crop_box, crop_pts, labels):
        offset = region.start - np.asarray(region.grid.pad_before) + np.asarray(region.grid.starts[index])
        window = region.grid.window
        box = EMPTY_BOX
        if crop_box is not None:
            local = (*(np.asarray(crop_box[:3]) - offset), *(np.asarray(crop_box[3:]) - offset))
            box = clip_box(tuple(int(v) for v in local), window) or EMPTY_BOX
        pts = lab = None
        if len(crop_pts):
            local_pts = crop_pts - offset
            inside = np.all((local_pts >= 0) & (local_pts < np.asarray(window)), axis=1)
            if inside.any():
                pts, lab = local_pts[inside][-RECENT_CLICKS:], labels[inside][-RECENT_CLICKS:]
        return box, pts, lab

    def _window_logits_for(self, region: _Region, index: int, crop_box, crop_pts, labels):
        box, pts, lab = self._window_prompts(region, index, crop_box, crop_pts, labels)
        key = (region.box, index, box, None if pts is None else (pts.tobytes(), lab.tobytes()))
        cached = self._window_logits.get(key)
        if cached is None:
            emb = self.engine.window_embedding(self._prepared, region.box, region.grid, index, region.padded_image)
            low = self.engine.decode(emb, ("window", self._prepared.key, region.box, region.grid.starts[index]),
                                     box, pts, lab, self._text_emb, self.text)
            cached = self.engine.upsample(low)
            if len(self._window_logits) > 4 * len(region.grid.starts) + 64:
                self._window_logits.clear()
            self._window_logits[key] = cached
        return cached

    def _decode_region(self, region: _Region, crop_box, crop_pts, labels, changed: list[int] | None = None,
                       extra: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[tuple[slice, ...], torch.Tensor]:
        """Stitched SegVol logits from the windows' current prompts, over the whole region or, with ``changed``
        (the windows whose prompts changed), over the part those windows cover (where the stitched values can
        differ) joined with the ``extra`` box (region voxels, exclusive stop). Returns (slices in the region,
        logits). Windows whose prompts did not change come from the cache."""
        grid = region.grid
        padded = np.asarray(grid.padded_shape)
        before = np.asarray(grid.pad_before)
        lo, hi = np.zeros(3, int), padded
        if changed is not None:
            spans = np.array([[(s.start, s.stop) for s in grid.window_slices(i)] for i in changed])
            lo, hi = spans[:, :, 0].min(axis=0), spans[:, :, 1].max(axis=0)
            if extra is not None:
                lo, hi = np.minimum(lo, extra[0] + before), np.maximum(hi, extra[1] + before)
        # the part inside the unpadded region, in padded coordinates
        lo, hi = np.maximum(lo, before), np.minimum(hi, before + np.asarray(grid.crop_shape))
        shape = tuple(int(v) for v in hi - lo)
        total, count = torch.zeros(shape), torch.zeros(shape)
        for index in range(len(grid.starts)):
            window = grid.window_slices(index)
            a = np.maximum(lo, [s.start for s in window])
            b = np.minimum(hi, [s.stop for s in window])
            if np.any(a >= b):
                continue
            target = tuple(slice(int(x - o), int(y - o)) for x, y, o in zip(a, b, lo))
            source = tuple(slice(int(x - s.start), int(y - s.start)) for x, y, s in zip(a, b, window))
            total[target] += self._window_logits_for(region, index, crop_box, crop_pts, labels)[source]
            count[target] += 1
        return tuple(slice(int(x - o), int(y - o)) for x, y, o in zip(lo, hi, before)), total / count

    def _click_step(self, prompt: dict, done: list[dict] | None = None) -> _Step:
        """One click: SegVol in the region holding it (a new window around it when it lies outside every region,
        after a zoom-out pass with all prompts for the voxels outside the regions), then the GRU correction, then
        the fusion with the previous logits. A click inside the frozen ROI skips the zoom-out pass: inside the ROI
        its logits are replaced by the windows'."""
        prompts = (self.prompts if done is None else done) + [prompt]
        # Clicks replayed inside a rebuild are undone with the rebuild as a whole: they keep no copies.
        step = _Step(prompt, hidden_before=self._state.hidden, regions_before=len(self._state.regions),
                     record=done is None)
        pts, labels = self._clicks(prompts)
        crop_box, crop_pts = prompts_in_crop(self._prepared, self._box(prompts), pts)
        click = crop_pts[-1]
        region = next((r for r in reversed(self._state.regions)
                       if all(r.box[a] <= click[a] <= r.box[a + 3] for a in range(3))), None)
        config = self.correction_config
        # the ball the click may change is measured once, on the mask before the click: a first write of the
        # same click (the zoom-out pass below) must not move it
        radius = click_radius(self._state.logits, click, config, bool(labels[-1])) if config.fusion else None
        if region is None:
            zoom = self._zoom_out_logits(crop_box, crop_pts, labels)
            outside = torch.ones(self._prepared.crop_shape, dtype=torch.bool)
            for r in self._state.regions:
                outside[roi_slices(r.box)] = False
            whole = tuple(slice(0, n) for n in self._prepared.crop_shape)
            updated = torch.where(outside, zoom, self._state.logits)
            if config.fusion:
                updated = fuse(self._state.logits, updated, (0, 0, 0), click, config, bool(labels[-1]), radius)
            self._write(step, whole, updated)
            region = self._new_region(self._window_around(click))
            self._state.regions.append(region)
            step.new_regions.append(region)
        sl = roi_slices(region.box)
        local_click = click - region.start
        # Without the correction only the windows holding the click (and the fusion ball, where the new values
        # stand) need stitching again, and nothing outside that part changes, so the fusion keeps it as is; the
        # correction reads and writes the whole region, so it gets it all.
        changed = ball = None
        if not self.correction_active:
            changed = region.grid.windows_containing(tuple(int(v) for v in local_click))
            # the click's own ball when the fusion measured one: nothing beyond it can change
            box = ball_box(local_click, config.fusion_radius if radius is None else radius,
                           region.grid.crop_shape)  # the click is inside
            ball = (np.array([b.start for b in box]), np.array([b.stop for b in box]))
        part, new = self._decode_region(region, crop_box, crop_pts, labels, changed, ball)
        part_sl = tuple(slice(r.start + p.start, r.start + p.stop) for r, p in zip(sl, part))
        if not self.correction_active:
            sl, local_click = part_sl, local_click - np.array([p.start for p in part])
        previous = self._state.logits[sl].clone()
        self._write(step, part_sl, new)
        self._refine(self._state, sl, crop_pts, labels, step, previous, radius)
        step.hidden_after = self._state.hidden
        return step

    def _window_around(self, click: np.ndarray) -> Roi:
        shape = np.asarray(self._prepared.crop_shape)
        size = np.minimum(np.asarray(self.engine.window), shape)
        lo = np.clip(click - size // 2, 0, shape - size)
        return (*map(int, lo), *map(int, lo + size - 1))  # type: ignore[return-value]

    def _refine(self, state: _State, sl: tuple[slice, ...], crop_pts, labels, step: _Step | None = None,
                previous: torch.Tensor | None = None, radius: float | None = None) -> None:
        """The click step (:func:`~segvolgru.click_step.refine_step`) on the part ``sl`` of the logits, which holds
        the base's new values: the correction (error rows around the newest clicks in it; the hidden state moves on
        by one click) and, given the logits before the click (``previous``), the fusion."""
        new = state.logits[sl]
        local_clicks = crop_pts - np.array([s.start for s in sl])
        inside = np.all((local_clicks >= 0) & (local_clicks < np.asarray(new.shape)), axis=1)
        config = self.correction_config
        if previous is None:
            config, previous = dataclasses.replace(config, fusion=False), new
        corrector = self.model.correction if self.correction_active else None
        with torch.inference_mode():
            result = refine_step(previous, new, local_clicks[inside][-RECENT_CLICKS:], labels[inside][-RECENT_CLICKS:],
                                 config, corrector=corrector, hidden=state.hidden, image=self._prepared.image[sl],
                                 radius=radius)
        if corrector is not None:
            state.hidden = result.hidden.clone()
        self._write(step, sl, result.logits, state)

    def _write(self, step: _Step | None, sl: tuple[slice, ...], new: torch.Tensor,
               state: _State | None = None) -> None:
        """Write logits; only steps that can be undone keep copies of the old and new values."""
        state = state or self._state
        if step is not None and step.record:
            inner = step.writes[-1] if step.writes and _contains(step.writes[-1][0], sl) else None
            if inner is None:
                step.writes.append((sl, state.logits[sl].clone(), new.clone()))
            else:
                # a write inside the step's previous one: that one's copy of the old values still restores
                # them, and only the newest values need keeping
                outer_sl, _, outer_new = inner
                outer_new[tuple(slice(a.start - b.start, a.stop - b.start) for a, b in zip(sl, outer_sl))] = new
        state.logits[sl] = new

    def _check_volume(self) -> None:
        if fingerprint(self._caller) != self._fingerprint:
            raise InputError("the volume changed since this session started (its shape, type or voxels differ): "
                             "start a new session on the new volume; prompts can be replayed with "
                             "InteractiveSession.replay")


def replay_segment(engine: Engine, volume: np.ndarray, *, box=None, points=None, point_labels=None, text=None,
                   trace: bool = False, overlap: float = 0.5, zoom_in: bool = True) -> SegmentResult:
    """``segment(mode="interactive")``: a fresh session, the box, then the points in array order."""
    pts, labels = validate_points(points, point_labels, volume.shape)
    box = validate_box(box, volume.shape)
    if box is None and not len(pts):
        raise InputError("interactive mode needs a box or at least one click")
    session = InteractiveSession(engine.model, volume, cache=engine.cache, overlap=overlap, text=text)
    started = time.perf_counter()
    if box is not None:
        session.set_box(box)
    for p, lab in zip(pts, labels):
        session.add_click(tuple(p), bool(lab))
    logits = session._state.logits.numpy().copy()
    roi = session._state.regions[0].box if session._state.regions else None
    result = SegmentResult(session.mask.copy(), logits, tuple(session._prepared.pre.crop_start),
                           {"total_s": time.perf_counter() - started})
    if trace:
        result.roi = roi
    return result
