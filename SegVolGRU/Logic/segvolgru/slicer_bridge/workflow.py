"""The Qt-free segmentation workflow: markups in, interactive sessions per segment, results into segments.

``SegmentationWorkflow`` is what the Slicer module's Logic, the tests and the headless demo drive. It is handed
the scene, the volume, the segmentation, a segment editor logic (``create_segment_editor``) and a model, and never
touches Qt, ``slicer.app`` or ``slicer.util``.

Every action is a :class:`Step` in three phases, so that inference can run off the main thread:
``*_step(...)`` reads MRML (main thread) and fixes the prompts; ``Step.compute()`` runs torch only (any thread);
``apply(step)`` writes the segment and moves markups (main thread). The one-call methods (``set_box_from_roi``,
``sync_clicks``, ``undo``, ...) do all three in a row. Prepare a step only after the previous one was applied.

Invariants:
- One ``InteractiveSession`` per segment; the segment holds that session's mask (wherever the segment editor's
  masking allows). The first result of a new or replayed session is written over every voxel where it differs
  from the segment; later ones over the session's changed extent only. Every write goes through
  ``write_segment_mask`` with the editor logic, so it is one entry of Slicer's undo and obeys masking.
- The source volume is copied once and never written; other segments change only as the editor's overwrite
  mode says.
- Each click remembers the markups control point it came from (node ID, point ID). A session undo removes the
  undone click's point from its list and redo puts it back, so the lists always show the active clicks.
- After each step the prompts, the click sources and the session settings are stored as JSON in the segment's
  tag ``SegVolGRU.Prompts``: saved with the scene and the ``.seg.nrrd``, and replayed by a new workflow.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import slicer
from vtkmodules.vtkCommonCore import reference

from segvolgru.errors import InputError, SegVolGRUError

from .geometry import node_to_world_matrix, points_to_voxels_kji, roi_to_box_kji
from .segment_writer import ensure_segment, read_segment_mask, write_segment_mask
from .volumes import volume_array_kji, volume_spacing_kji

PROMPTS_TAG = "SegVolGRU.Prompts"
_TAG_VERSION = 1
Extent = tuple[int, int, int, int, int, int]


class PredictionError(SegVolGRUError, RuntimeError):
    """The model failed on a step (out of memory, bad weights, a bug); the segment was left as it was."""


@dataclass
class ClickSource:
    """The markups control point a click came from, with what is needed to put the point back after an undo.

    ``position_world`` is RAS in mm (parent transforms included), as last seen.
    """

    node_id: str
    point_id: str
    position_world: tuple[float, float, float]
    label: str

    def to_dict(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "point_id": self.point_id,
                "position_world": list(self.position_world), "label": self.label}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ClickSource":
        return cls(str(data["node_id"]), str(data["point_id"]),
                   tuple(float(v) for v in data["position_world"]), str(data.get("label", "")))


@dataclass
class StepStatus:
    """What a step did, for the status line. Seconds are wall time; ``changed_extent`` is the inclusive
    (k0, j0, i0, k1, j1, i1) box written, None when the segment did not change."""

    action: str
    segment_id: str
    segment_name: str
    predict_seconds: float
    write_seconds: float
    changed_extent: Extent | None
    prompt_count: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def message(self) -> str:
        change = "no voxel changed" if self.changed_extent is None else "segment updated"
        return (f"{self.action} on '{self.segment_name}': {change}; prediction {self.predict_seconds:.2f} s, "
                f"write {self.write_seconds:.2f} s, {self.prompt_count} prompt(s)")


@dataclass
class _Outcome:
    session: Any
    mask: np.ndarray
    changed_extent: Extent | None
    fresh: bool
    timings: dict[str, float]
    sources: list[ClickSource | None] | None  # the new click sources, or None to follow the session's count


@dataclass
class _SegmentState:
    session: Any = None
    prompts: list[dict] = field(default_factory=list)  # the prompts of the last applied step
    # Aligned with the click prompts; entries past the current click count belong to undone clicks (redo).
    sources: list[ClickSource | None] = field(default_factory=list)


class Step:
    """One prediction: prepared on the main thread, ``compute()`` anywhere (torch only), then ``apply``-ed."""

    def __init__(self, action: str, segment_id: str, run: Callable[[], _Outcome]) -> None:
        self.action = action
        self.segment_id = segment_id
        self._run = run
        self.outcome: _Outcome | None = None
        self.error: BaseException | None = None
        self.compute_seconds = 0.0
        self.computed = False

    def compute(self) -> "Step":
        """Run the model; an exception is kept for ``apply`` to report on the main thread. Returns self."""
        started = time.perf_counter()
        try:
            self.outcome = self._run()
        except Exception as error:  # reported by apply(), which knows how to leave the segment unchanged
            self.error = error
        self.compute_seconds = time.perf_counter() - started
        self.computed = True
        return self


def _click_count(prompts: Sequence[dict]) -> int:
    return sum(1 for p in prompts if p.get("type") == "click")


def _extent_of(changed: np.ndarray) -> Extent | None:
    """Inclusive bounding box (k0, j0, i0, k1, j1, i1) of the True voxels, None when there are none."""
    if not changed.any():
        return None
    low, high = [], []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(changed.any(axis=others))
        low.append(int(hits[0]))
        high.append(int(hits[-1]))
    return low[0], low[1], low[2], high[0], high[1], high[2]


def _union(a: Extent | None, b: Extent | None) -> Extent | None:
    if a is None or b is None:
        return a if b is None else b
    return (*(min(x, y) for x, y in zip(a[:3], b[:3])), *(max(x, y) for x, y in zip(a[3:], b[3:])))


def _defined_points(points_node, volume_node) -> list[tuple[str, tuple[int, int, int], tuple[float, float, float], str]]:
    """(point ID, voxel (k, j, i), world RAS mm, label) of every placed control point, in list order.

    Points still being placed (preview) are left out: they follow the mouse. The voxel rule is
    ``points_to_voxels_kji``'s; with a preview point present it is applied to a scene-less copy of the placed
    points (same name and labels, so its messages still name the point).
    """
    node_to_world_matrix(points_node, "points")
    count = points_node.GetNumberOfControlPoints()
    placed = [i for i in range(count)
              if points_node.GetNthControlPointPositionStatus(i) == points_node.PositionDefined]
    positions = []
    for index in placed:
        position = [0.0, 0.0, 0.0]
        points_node.GetNthControlPointPositionWorld(index, position)
        positions.append(tuple(position))
    if len(placed) == count:
        voxels = points_to_voxels_kji(points_node, volume_node)
    else:
        copy = slicer.vtkMRMLMarkupsFiducialNode()
        copy.SetName(points_node.GetName())
        for index, position in zip(placed, positions):
            copy.AddControlPointWorld(list(position), points_node.GetNthControlPointLabel(index))
        voxels = points_to_voxels_kji(copy, volume_node)
    return [(points_node.GetNthControlPointID(index), voxel, position, points_node.GetNthControlPointLabel(index))
            for index, voxel, position in zip(placed, voxels, positions)]


class SegmentationWorkflow:
    """Interactive SegVol segmentation of one volume into the segments of one segmentation node.

    Args:
        scene: the ``vtkMRMLScene`` holding every node.
        volume_node: the scalar source volume (3-D, one component, linear transforms only); copied once.
        segmentation_node: where results go; segments are created on demand.
        editor_logic: a ``vtkSlicerSegmentEditorLogic`` for this segmentation and volume (``create_segment_editor``);
            its editor node's masking applies and it keeps Slicer's undo history. None writes unmasked, no undo.
        model: a SegVol model, or a callable returning one (called once, on the first prediction, in the
            thread that computes), so that weights load lazily.
        settings: ``InteractiveSession`` settings (``gru``, ``overlap``, ``text``, correction switches).
        cache: the embedding cache shared by the sessions (the process-wide one when None).
    Raises InputError when there is no volume or segmentation, the volume is 4-D, vector or empty, or a
    transform on it is non-linear.
    """

    def __init__(self, scene, volume_node, segmentation_node, editor_logic, model,
                 settings: dict[str, Any] | None = None, cache=None) -> None:
        if volume_node is None:
            raise InputError("No input volume: select the volume to segment (or load one) first.")
        if segmentation_node is None:
            raise InputError("No output segmentation: select or create a segmentation node first.")
        node_to_world_matrix(volume_node, "volume")
        self.scene = scene
        self.volume_node = volume_node
        self.segmentation_node = segmentation_node
        self.editor_logic = editor_logic
        self._model_source = model
        self._model = model if hasattr(model, "parameters") else None
        self.settings = dict(settings or {})
        self.cache = cache
        self._volume = np.array(volume_array_kji(volume_node), copy=True)
        self._volume.setflags(write=False)
        self._spacing = volume_spacing_kji(volume_node)
        self._states: dict[str, _SegmentState] = {}
        self.segment_id: str | None = None
        self.restore_sessions()
        ids = list(segmentation_node.GetSegmentation().GetSegmentIDs())
        if ids:
            self.segment_id = ids[0]

    # ----------------------------------------------------------------- segments
    def select_segment(self, segment: str) -> str:
        """Make the segment with this ID or name the one prompts go to; returns its ID."""
        segmentation = self.segmentation_node.GetSegmentation()
        segment_id = segment if segmentation.GetSegment(segment) is not None else \
            segmentation.GetSegmentIdBySegmentName(segment)
        if not segment_id:
            names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
            raise InputError(f"Segmentation '{self.segmentation_node.GetName()}' has no segment '{segment}' "
                             f"(it has {names}); pick one of those or create a new segment.")
        self.segment_id = segment_id
        return segment_id

    def new_segment(self, name: str | None = None) -> str:
        """Add an empty segment (named ``name``, or "Segment N"), select it and return its ID."""
        segmentation = self.segmentation_node.GetSegmentation()
        if name is None:
            number = segmentation.GetNumberOfSegments() + 1
            while segmentation.GetSegmentIdBySegmentName(f"Segment {number}"):
                number += 1
            name = f"Segment {number}"
        elif segmentation.GetSegmentIdBySegmentName(name):
            raise InputError(f"A segment named '{name}' already exists; select it, or choose another name.")
        self.segment_id = ensure_segment(self.segmentation_node, name)
        return self.segment_id

    def _current_segment(self) -> str:
        if self.segment_id is None:
            self.new_segment()
        elif self.segmentation_node.GetSegmentation().GetSegment(self.segment_id) is None:
            raise InputError(f"The selected segment '{self.segment_id}' was deleted; select or create a segment.")
        return self.segment_id

    def _state(self, segment_id: str) -> _SegmentState:
        return self._states.setdefault(segment_id, _SegmentState())

    def prompts(self, segment_id: str | None = None) -> list[dict]:
        """The prompts of the segment's session (plain data; a copy)."""
        state = self._states.get(segment_id or self.segment_id or "")
        return [] if state is None else json.loads(json.dumps(state.prompts))

    def mask(self, segment_id: str | None = None) -> np.ndarray | None:
        """The segment's session mask (uint8, (K, J, I)), or None before its session has run in this process."""
        state = self._states.get(segment_id or self.segment_id or "")
        return None if state is None or state.session is None else state.session.mask.copy()

    # ----------------------------------------------------------------- model and sessions (compute phase)
    def model(self):
        """The model, loading it through the provider on first use."""
        if self._model is None:
            self._model = self._model_source()
        return self._model

    def set_settings(self, settings: dict[str, Any]) -> None:
        """Change the session settings; each segment's session is replayed with them at its next step."""
        self.settings = dict(settings)
        for state in self._states.values():
            state.session = None

    def _open_session(self, state: _SegmentState, prompts: list[dict] | None = None) -> tuple[Any, bool]:
        """The segment's live session (not fresh), or one replayed from ``prompts`` / the stored prompts (fresh)."""
        from segvolgru.session import InteractiveSession

        if prompts is None and state.session is not None:
            return state.session, False
        replayed = InteractiveSession.replay(self.model(), self._volume, state.prompts if prompts is None else prompts,
                                             spacing=self._spacing, cache=self.cache, **self.settings)
        return replayed, True

    def _session_step(self, action: str, segment_id: str, operate, sources=None,
                      prompts: list[dict] | None = None) -> Step:
        state = self._state(segment_id)

        def run() -> _Outcome:
            session, fresh = self._open_session(state, prompts)
            extent, timings, mask = None, {}, None
            for result in operate(session):
                extent = _union(extent, result.changed_extent)
                mask = result.mask  # a read-only snapshot: later steps of the session copy before writing
                for stage, seconds in result.timings.items():
                    timings[stage] = timings.get(stage, 0.0) + seconds
            return _Outcome(session, session.mask.copy() if mask is None else mask, extent, fresh, timings, sources)

        return Step(action, segment_id, run)

    # ----------------------------------------------------------------- prepare phase (main thread)
    def box_step(self, roi_node) -> Step:
        """Set the box of the selected segment from an ROI markup (rotated and transformed ROIs work)."""
        if roi_node is None:
            raise InputError("No ROI: place an ROI markup around the structure (the 'Place' button), then Segment.")
        box = roi_to_box_kji(roi_node, self.volume_node)
        return self._session_step("Box", self._current_segment(), lambda s: [s.set_box(box)])

    def click_step(self, points_node, index: int, positive: bool) -> Step:
        """Add control point ``index`` of ``points_node`` as a click of the given polarity."""
        if points_node is None:
            raise InputError("No point list: select or create a markups point list for the clicks.")
        if not 0 <= index < points_node.GetNumberOfControlPoints():
            raise InputError(f"Point list '{points_node.GetName()}' has no point {index} "
                             f"(it has {points_node.GetNumberOfControlPoints()}); place the point first.")
        point_id = points_node.GetNthControlPointID(index)
        found = [p for p in _defined_points(points_node, self.volume_node) if p[0] == point_id]
        if not found:
            raise InputError(f"Point {index} of '{points_node.GetName()}' is still being placed; click in a view to "
                             "place it first.")
        _, voxel, position, label = found[0]
        segment_id = self._current_segment()
        state = self._state(segment_id)
        sources = state.sources[:_click_count(state.prompts)] + [
            ClickSource(points_node.GetID(), point_id, position, label)]
        return self._session_step("Positive click" if positive else "Negative click", segment_id,
                                  lambda s: [s.add_click(voxel, positive)], sources)

    def sync_step(self, positive_node, negative_node) -> Step | None:
        """Bring the session in line with the two point lists; None when it already is.

        New placed points become clicks (added incrementally, positive list first); when a known point was
        moved to another voxel or deleted, the session is replayed with every click at its current place.
        Clicks whose points are in neither list count as deleted.
        """
        segment_id = self._current_segment()
        state = self._state(segment_id)
        current: dict[tuple[str, str], tuple[tuple[int, int, int], bool, ClickSource]] = {}
        for node, positive in ((positive_node, True), (negative_node, False)):
            if node is None:
                continue
            for point_id, voxel, position, label in _defined_points(node, self.volume_node):
                current[(node.GetID(), point_id)] = (voxel, positive, ClickSource(node.GetID(), point_id, position, label))
        count = _click_count(state.prompts)
        known = state.sources[:count]
        known_keys = {(s.node_id, s.point_id) for s in known if s is not None}
        clicks = iter([p for p in state.prompts if p["type"] == "click"])
        moved = False
        for source in known:
            click = next(clicks)
            if source is None:
                continue
            now = current.get((source.node_id, source.point_id))
            if now is None or list(now[0]) != list(click["voxel"]) or now[1] != bool(click["positive"]):
                moved = True
        new = [value for key, value in current.items() if key not in known_keys]
        if not moved and not new:
            return None
        if not moved:
            sources = known + [source for _, _, source in new]
            return self._session_step("Clicks", segment_id,
                                      lambda s: [s.add_click(voxel, positive) for voxel, positive, _ in new], sources)
        prompts, sources = [], []
        known_iter = iter(known)
        for prompt in state.prompts:
            if prompt["type"] != "click":
                prompts.append(prompt)
                continue
            source = next(known_iter)
            if source is None:
                prompts.append(prompt)
                sources.append(None)
                continue
            now = current.get((source.node_id, source.point_id))
            if now is not None:
                prompts.append({"type": "click", "voxel": list(now[0]), "positive": now[1]})
                sources.append(now[2])
        for voxel, positive, source in new:
            prompts.append({"type": "click", "voxel": list(voxel), "positive": positive})
            sources.append(source)
        return self._session_step("Moved clicks", segment_id, lambda s: [], sources, prompts)

    def undo_step(self) -> Step:
        """Undo the selected segment's last prompt (its click point leaves the point list until redo)."""
        return self._session_step("Undo", self._current_segment(), lambda s: [s.undo()])

    def redo_step(self) -> Step:
        """Redo the selected segment's last undone prompt."""
        return self._session_step("Redo", self._current_segment(), lambda s: [s.redo()])

    def replay_step(self, segment_id: str | None = None) -> Step:
        """Rebuild a segment's session from its stored prompts (after reopening a scene, or to check it)."""
        segment_id = segment_id or self._current_segment()
        return self._session_step("Replay", segment_id, lambda s: [], prompts=list(self._state(segment_id).prompts))

    # ----------------------------------------------------------------- apply phase (main thread)
    def apply(self, step: Step) -> StepStatus:
        """Write a computed step into its segment and the point lists; computes it first if needed.

        Raises the step's InputError as is, and PredictionError for any other failure; in both cases the
        segment keeps its voxels and the session falls back to the last applied prompts.
        """
        if not step.computed:
            step.compute()
        state = self._state(step.segment_id)
        if step.error is not None:
            if isinstance(step.error, InputError):
                raise step.error
            state.session = None
            raise PredictionError(
                f"{step.action} failed: {type(step.error).__name__}: {step.error}. The segment was left as it was. "
                "Try the CPU device or a smaller ROI; if it persists, check the model weights.") from step.error
        outcome = step.outcome
        started = time.perf_counter()
        if outcome.fresh:
            current = read_segment_mask(self.segmentation_node, step.segment_id, self.volume_node)
            extent = _extent_of(current != outcome.mask)
        else:
            extent = outcome.changed_extent
        try:
            if extent is not None:
                write_segment_mask(self.segmentation_node, step.segment_id, outcome.mask, self.volume_node,
                                   extent, self.editor_logic)
        except Exception:
            state.session = None
            raise
        old_count = _click_count(state.prompts)
        state.session = outcome.session
        state.prompts = json.loads(json.dumps(outcome.session.prompts))
        if outcome.sources is not None:
            state.sources = list(outcome.sources)
        else:
            self._follow_click_count(state, old_count, _click_count(state.prompts))
        self._store(step.segment_id)
        return StepStatus(step.action, step.segment_id, self._segment_name(step.segment_id), step.compute_seconds,
                          time.perf_counter() - started, extent, len(state.prompts), outcome.timings)

    def _follow_click_count(self, state: _SegmentState, old_count: int, new_count: int) -> None:
        """Remove the points of undone clicks from their lists and put back those of redone ones."""
        for index in range(new_count, old_count):
            source = state.sources[index]
            node = None if source is None else self.scene.GetNodeByID(source.node_id)
            point = -1 if node is None else node.GetControlPointIndexByID(source.point_id)
            if point >= 0:
                position = [0.0, 0.0, 0.0]
                node.GetNthControlPointPositionWorld(point, position)
                source.position_world = tuple(position)
                node.RemoveNthControlPoint(point)
        for index in range(old_count, new_count):
            if index >= len(state.sources):
                state.sources.append(None)
                continue
            source = state.sources[index]
            node = None if source is None else self.scene.GetNodeByID(source.node_id)
            if node is None:
                state.sources[index] = None
                continue
            point = node.AddControlPointWorld(list(source.position_world), source.label)
            source.point_id = node.GetNthControlPointID(point)

    def _segment_name(self, segment_id: str) -> str:
        segment = self.segmentation_node.GetSegmentation().GetSegment(segment_id)
        return segment_id if segment is None else segment.GetName()

    # ----------------------------------------------------------------- one-call actions
    def set_box_from_roi(self, roi_node) -> StepStatus:
        """Box from the ROI, predicted and written at once."""
        return self.apply(self.box_step(roi_node))

    def add_click_from_point(self, points_node, index: int, positive: bool) -> StepStatus:
        """Control point ``index`` as a click, predicted and written at once."""
        return self.apply(self.click_step(points_node, index, positive))

    def sync_clicks(self, positive_node, negative_node) -> StepStatus | None:
        """Follow the point lists (see ``sync_step``); None when nothing changed."""
        step = self.sync_step(positive_node, negative_node)
        return None if step is None else self.apply(step)

    def undo(self) -> StepStatus:
        return self.apply(self.undo_step())

    def redo(self) -> StepStatus:
        return self.apply(self.redo_step())

    def reset_prompts(self) -> None:
        """Forget the selected segment's prompts and remove their points from the lists; the voxels stay.

        The next prediction starts a new session, whose first result replaces the segment's content.
        """
        segment_id = self._current_segment()
        state = self._state(segment_id)
        self._follow_click_count(state, _click_count(state.prompts), 0)
        self._states[segment_id] = _SegmentState()
        self._store(segment_id)

    def clear_segment(self) -> StepStatus:
        """Empty the selected segment (one undoable write, masking applies) and reset its prompts."""
        segment_id = self._current_segment()
        started = time.perf_counter()
        current = read_segment_mask(self.segmentation_node, segment_id, self.volume_node)
        extent = _extent_of(current != 0)
        if extent is not None:
            write_segment_mask(self.segmentation_node, segment_id, np.zeros_like(current), self.volume_node,
                               extent, self.editor_logic)
        self.reset_prompts()
        return StepStatus("Clear", segment_id, self._segment_name(segment_id), 0.0,
                          time.perf_counter() - started, extent, 0)

    # ----------------------------------------------------------------- stored with the scene
    def save_prompts(self) -> None:
        """Store every segment's prompts in its tag (``apply`` already does this after each step)."""
        for segment_id in self._states:
            self._store(segment_id)

    def _store(self, segment_id: str) -> None:
        segment = self.segmentation_node.GetSegmentation().GetSegment(segment_id)
        if segment is None:
            return
        state = self._states[segment_id]
        if not state.prompts:
            segment.RemoveTag(PROMPTS_TAG)
            return
        sources = state.sources[:_click_count(state.prompts)]
        segment.SetTag(PROMPTS_TAG, json.dumps({
            "version": _TAG_VERSION,
            "prompts": state.prompts,
            "clicks": [None if s is None else s.to_dict() for s in sources],
            "settings": self.settings,
        }))

    def restore_sessions(self) -> list[str]:
        """Read every segment's stored prompts; returns the IDs of segments that have some.

        Sessions are not run here: each is replayed (with the current settings) at its segment's next step,
        or at once with ``apply(replay_step(id))``. In-memory sessions are dropped.
        """
        self._states = {}
        segmentation = self.segmentation_node.GetSegmentation()
        restored = []
        for segment_id in segmentation.GetSegmentIDs():
            value = reference("")
            if not segmentation.GetSegment(segment_id).GetTag(PROMPTS_TAG, value):
                continue
            try:
                data = json.loads(str(value))
                prompts = list(data["prompts"])
                sources = [None if s is None else ClickSource.from_dict(s) for s in data.get("clicks", [])]
            except (ValueError, KeyError, TypeError) as error:
                raise InputError(f"The stored prompts of segment '{self._segment_name(segment_id)}' are unreadable "
                                 f"({error}); clear the segment's prompts to start again.") from None
            clicks = _click_count(prompts)
            sources = (sources + [None] * clicks)[:clicks]
            self._states[segment_id] = _SegmentState(None, prompts, sources)
            restored.append(segment_id)
        return restored
