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
  ``write_segment_mask`` with the editor logic, so it obeys masking (copied from ``masking_from`` first).
- Undo is the workflow's own (``undo_step`` / ``redo_step``): one linear history of every step (box, clicks,
  clear, prompt reset) that restores the segment's prompts, its click points and the voxels of every segment the
  step wrote, exactly, masking or not. The editor logic keeps no undo states of its own.
- The source volume is copied once and never written; other segments change only as the editor's overwrite
  mode says.
- Each click remembers the markups control point it came from (node ID, point ID) and where it was. Undo and
  redo remove, put back or move the points, so the lists always show the active clicks.
- After each step the prompts, the click sources and the session settings are stored as JSON in the segment's
  tag ``SegVolGRU.Prompts``: saved with the scene and the ``.seg.nrrd``, and replayed by a new workflow.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from vtkmodules.vtkCommonCore import reference

from segvolgru.errors import InputError

from .click_points import defined_points, place_points
from .geometry import node_to_world_matrix, roi_to_box_kji
from .history import History, HistoryEntry, PromptState, VoxelPatch
from .segment_writer import (
    copy_masking,
    create_segment_editor,
    ensure_segment,
    read_segment_mask,
    restore_segment_voxels,
    write_segment_mask,
)
from .steps import ClickSource, PredictionError, Step, StepStatus, click_count, extent_of, Outcome, union_extent
from .volumes import volume_array_kji, volume_spacing_kji

PROMPTS_TAG = "SegVolGRU.Prompts"
# 2: the stored settings never hold the corrector's network shape (hidden_size, row_dim), which version 1 could;
# stored settings are informative only (a workflow replays with its own), so both versions read the same.
_TAG_VERSION = 2
Extent = tuple[int, int, int, int, int, int]


class SegmentationWorkflow:
    """Interactive SegVol segmentation of one volume into the segments of one segmentation node.

    Args:
        scene: the ``vtkMRMLScene`` holding every node.
        volume_node: the scalar source volume (3-D, one component, linear transforms only); copied once.
        segmentation_node: where results go; segments are created on demand.
        editor_logic: a ``vtkSlicerSegmentEditorLogic`` for this segmentation and volume (``create_segment_editor``);
            its editor node's masking applies. None writes unmasked. Undo is the workflow's own either way.
        model: a SegVol model, or a callable returning one (called once, on the first prediction, in the
            thread that computes), so that weights load lazily.
        masking_from: a callable returning the ``vtkMRMLSegmentEditorNode`` whose masking settings apply (in
            Slicer, the Segment Editor module's node), or None; they are copied into ``editor_logic``'s own
            editor node before each write, so the user's masking applies while their Segment Editor keeps
            editing whatever it edits.
        settings: ``InteractiveSession`` settings (``gru``, ``overlap``, ``text``, correction switches).
        cache: the embedding cache shared by the sessions (the process-wide one when None).
    Raises InputError when there is no volume or segmentation, the volume is 4-D, vector or empty, or a
    transform on it is non-linear.
    """

    def __init__(self, scene, volume_node, segmentation_node, editor_logic, model,
                 settings: dict[str, Any] | None = None, cache=None,
                 masking_from: Callable[[], Any] | None = None) -> None:
        if volume_node is None:
            raise InputError("No input volume: select the volume to segment (or load one) first.")
        if segmentation_node is None:
            raise InputError("No output segmentation: select or create a segmentation node first.")
        node_to_world_matrix(volume_node, "volume")
        self.scene = scene
        self.volume_node = volume_node
        self.segmentation_node = segmentation_node
        self.editor_logic = editor_logic
        self.masking_from = masking_from
        self._model_source = model
        self._model = model if hasattr(model, "parameters") else None
        self.settings = dict(settings or {})
        self.cache = cache
        self._volume = np.array(volume_array_kji(volume_node), copy=True)
        self._volume.setflags(write=False)
        self._spacing = volume_spacing_kji(volume_node)
        self._states: dict[str, PromptState] = {}
        self.history = History()
        self.segment_id: str | None = None
        self.restore_sessions()
        ids = list(segmentation_node.GetSegmentation().GetSegmentIDs())
        if ids:
            self.segment_id = ids[0]

    @classmethod
    def open(cls, scene, volume_node, segmentation_node, model, *, app_logic=None, settings=None, cache=None,
             masking_from: Callable[[], Any] | None = None) -> "SegmentationWorkflow":
        """A workflow that writes through a private segment editor node of its own (``create_segment_editor``):
        in Slicer, pass the Segment Editor module's node as ``masking_from``, never as the editor node, so the
        user's Segment Editor keeps editing what they chose. ``close()`` removes the private node. With
        ``segmentation_node`` None a segmentation named after the volume, under its transform, is added."""
        if volume_node is None:
            raise InputError("No input volume: select the volume to segment (or load one) first.")
        if segmentation_node is None:
            segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume_node.GetName()} SegVolGRU")
            segmentation_node.CreateDefaultDisplayNodes()
            segmentation_node.SetAndObserveTransformNodeID(volume_node.GetTransformNodeID())
        editor = create_segment_editor(scene, segmentation_node, volume_node, None, app_logic)
        try:
            return cls(scene, volume_node, segmentation_node, editor, model, settings, cache, masking_from)
        except Exception:
            if editor is not None:
                scene.RemoveNode(editor.GetSegmentEditorNode())
            raise

    def close(self) -> None:
        """Remove the private segment editor node that ``open`` added to the scene (nothing else is touched)."""
        editor_node = None if self.editor_logic is None else self.editor_logic.GetSegmentEditorNode()
        if editor_node is not None and editor_node.GetHideFromEditors() and self.scene.IsNodePresent(editor_node):
            self.scene.RemoveNode(editor_node)

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
        self._switch_to(segment_id)
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
        self._switch_to(ensure_segment(self.segmentation_node, name))
        return self.segment_id

    def _switch_to(self, segment_id: str) -> None:
        """Select a segment. Every segment's clicks live in the same point lists, so the lists stop showing the
        previous segment's clicks (they come back when it is selected again) and show this one's."""
        if segment_id != self.segment_id:
            shown, wanted = self._states.get(self.segment_id or ""), self._states.get(segment_id)
            place_points(self.scene, [] if shown is None else shown.sources[:click_count(shown.prompts)],
                         [] if wanted is None else wanted.sources[:click_count(wanted.prompts)])
        self.segment_id = segment_id

    def _current_segment(self) -> str:
        if self.segment_id is None:
            self.new_segment()
        elif self.segmentation_node.GetSegmentation().GetSegment(self.segment_id) is None:
            raise InputError(f"The selected segment '{self.segment_id}' was deleted; select or create a segment.")
        return self.segment_id

    def _state(self, segment_id: str) -> PromptState:
        return self._states.setdefault(segment_id, PromptState())

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

    def set_model(self, model) -> None:
        """Use another model (or model provider): every session is replayed with it at its segment's next step."""
        self._model_source = model
        self._model = model if hasattr(model, "parameters") else None
        for state in self._states.values():
            state.session = None
        self.history.drop_sessions()

    def set_settings(self, settings: dict[str, Any]) -> None:
        """Change the session settings; each segment's session is replayed with them at its next step."""
        self.settings = dict(settings)
        for state in self._states.values():
            state.session = None
        self.history.drop_sessions()

    def _open_session(self, state: PromptState, prompts: list[dict] | None = None) -> tuple[Any, bool]:
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

        def run() -> Outcome:
            session, fresh = self._open_session(state, prompts)
            extent, timings, mask = None, {}, None
            for result in operate(session):
                extent = union_extent(extent, result.changed_extent)
                mask = result.mask  # a read-only snapshot: later steps of the session copy before writing
                for stage, seconds in result.timings.items():
                    timings[stage] = timings.get(stage, 0.0) + seconds
            return Outcome(session, session.mask.copy() if mask is None else mask, extent, fresh, timings, sources)

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
        found = [p for p in defined_points(points_node, self.volume_node) if p[0] == point_id]
        if not found:
            raise InputError(f"Point {index} of '{points_node.GetName()}' is still being placed; click in a view to "
                             "place it first.")
        _, voxel, position, label = found[0]
        segment_id = self._current_segment()
        state = self._state(segment_id)
        sources = state.sources[:click_count(state.prompts)] + [
            ClickSource(points_node.GetID(), point_id, position, label)]
        return self._session_step("Positive click" if positive else "Negative click", segment_id,
                                  lambda s: [s.add_click(voxel, positive)], sources)

    def sync_step(self, positive_node, negative_node) -> Step | None:
        """Bring the session in line with the two point lists; None when it already is.

        New placed points become clicks (added incrementally, positive list first); when a known point was
        moved to another voxel or deleted, the session is replayed with every click at its current place.
        Clicks whose points are in neither list count as deleted.
        """
        if positive_node is not None and positive_node is negative_node:
            raise InputError(f"'{positive_node.GetName()}' is selected as both the positive and the negative point "
                             "list; pick a different list for one of them.")
        segment_id = self._current_segment()
        state = self._state(segment_id)
        current: dict[tuple[str, str], tuple[tuple[int, int, int], bool, ClickSource]] = {}
        for node, positive in ((positive_node, True), (negative_node, False)):
            if node is None:
                continue
            for point_id, voxel, position, label in defined_points(node, self.volume_node):
                source = ClickSource(node.GetID(), point_id, position, label)
                current[(node.GetID(), point_id)] = (voxel, positive, source)
        count = click_count(state.prompts)
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

    def segment_step(self, roi_node, positive_node, negative_node) -> Step | None:
        """The panel's Segment: the box when the ROI moved (or no box ran yet), else the clicks not applied yet,
        else, when the session is not in memory (settings changed, scene reopened), a replay of the stored
        prompts. None when there is nothing to do."""
        self._current_segment()
        boxes = [prompt["box"] for prompt in self.prompts() if prompt["type"] == "box"]
        if roi_node is None or not boxes or list(roi_to_box_kji(roi_node, self.volume_node)) != list(boxes[-1]):
            return self.box_step(roi_node)
        step = self.sync_step(positive_node, negative_node)
        if step is None and self.mask() is None:
            step = self.replay_step()
        return step

    def undo_step(self) -> Step:
        """Undo the last step of this workflow, whichever segment it was on (that segment becomes the selected
        one): its voxels, prompts and click points come back exactly as they were before it."""
        return self._history_step("Undo", self.history.next_undo(), undo=True)

    def redo_step(self) -> Step:
        """Redo the last undone step."""
        return self._history_step("Redo", self.history.next_redo(), undo=False)

    def _history_step(self, action: str, entry: HistoryEntry, undo: bool) -> Step:
        segmentation = self.segmentation_node.GetSegmentation()
        for segment_id in {entry.segment_id, *(patch.segment_id for patch in entry.patches)}:
            if segmentation.GetSegment(segment_id) is None:
                raise InputError(f"Segment '{segment_id}', which that step changed, was deleted; the step cannot be "
                                 f"{'undone' if undo else 'redone'}.")
        source, target = (entry.after, entry.before) if undo else (entry.before, entry.after)
        state = self._state(entry.segment_id)

        def run() -> Outcome:
            # The live session steps back (or forward) in place when it is the one the entry knew; otherwise the
            # target state's own session, or a replay of its prompts at the next step.
            session = target.session
            if entry.pushes >= 0 and state.session is not None and state.session.prompts == source.prompts:
                session = state.session
                try:
                    for _ in range(entry.pushes):
                        session.undo() if undo else session.redo()
                except InputError:  # the session's own history is shorter than the workflow's
                    session = None
            if session is not None and session.prompts != target.prompts:
                session = None
            return Outcome(session, None, None, False, {}, list(target.sources))

        step = Step(action, entry.segment_id, run)
        step.history = (entry, undo)
        return step

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
        started = time.perf_counter()
        if step.history is not None:
            extent = self._apply_history(step)
        else:
            extent = self._apply_prediction(step, state)
        return StepStatus(step.action, step.segment_id, self._segment_name(step.segment_id), step.compute_seconds,
                          time.perf_counter() - started, extent, len(state.prompts), step.outcome.timings)

    def _apply_prediction(self, step: Step, state: PromptState) -> Extent | None:
        outcome = step.outcome
        if outcome.fresh:
            current = read_segment_mask(self.segmentation_node, step.segment_id, self.volume_node)
            extent = extent_of(current != outcome.mask)
        else:
            extent = outcome.changed_extent
        before = state.snapshot()
        try:
            patches = self._write(step.segment_id, outcome.mask, extent)
        except Exception:
            state.session = None
            raise
        state.session = outcome.session
        state.prompts = json.loads(json.dumps(outcome.session.prompts))
        if outcome.sources is not None:
            place_points(self.scene, state.sources, outcome.sources)
            state.sources = list(outcome.sources)
        same_session = before.session is outcome.session
        pushes = len(state.prompts) - len(before.prompts) if same_session else -1
        if patches or state.prompts != before.prompts or state.sources != before.sources:
            # A replay that changed nothing is not a step the user could want to undo.
            self.history.record(HistoryEntry(step.action, step.segment_id, before, state.snapshot(), pushes, patches))
        self._store(step.segment_id)
        return extent

    def _apply_history(self, step: Step) -> Extent | None:
        entry, undo = step.history
        target = entry.before if undo else entry.after
        restore_segment_voxels(self.segmentation_node, self.volume_node,
                               [(p.segment_id, p.extent, p.values(after=not undo)) for p in entry.patches])
        self._switch_to(entry.segment_id)
        state = self._state(entry.segment_id)
        place_points(self.scene, state.sources, target.sources)
        self._states[entry.segment_id] = PromptState(step.outcome.session, [dict(p) for p in target.prompts],
                                                     list(target.sources))
        self.history.undone() if undo else self.history.redone()
        self._store(entry.segment_id)
        extent = None
        for patch in entry.patches:
            extent = union_extent(extent, patch.extent)
        return extent

    def _write(self, segment_id: str, mask: np.ndarray, extent: Extent | None) -> list[VoxelPatch]:
        """Write ``mask`` over ``extent`` of the segment (masking applies) and return what changed, for undo.

        The overwrite mode can change other segments inside the extent too, so their voxels are kept as well
        unless the mode leaves other segments alone.
        """
        if extent is None:
            return []
        segment_ids = [segment_id]
        if self.editor_logic is not None:
            editor_node = self.editor_logic.GetSegmentEditorNode()
            if self.masking_from is not None:
                source = self.masking_from()
                if source is not None:
                    copy_masking(source, editor_node)
            if editor_node.GetOverwriteMode() != editor_node.OverwriteNone:
                segment_ids += [i for i in self.segmentation_node.GetSegmentation().GetSegmentIDs() if i != segment_id]
        k0, j0, i0, k1, j1, i1 = extent
        added = mask[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1] != 0
        read = [(i, read_segment_mask(self.segmentation_node, i, self.volume_node, extent)) for i in segment_ids]
        # another segment can only lose voxels where this one gains them: one without any there is not read again
        read = [(i, before) for i, before in read if i == segment_id or (before.astype(bool) & added).any()]
        write_segment_mask(self.segmentation_node, segment_id, mask, self.volume_node, extent, self.editor_logic)
        patches = []
        for i, before in read:
            after = read_segment_mask(self.segmentation_node, i, self.volume_node, extent)
            if not np.array_equal(before, after):
                patches.append(VoxelPatch.of(i, extent, before, after))
        return patches

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

    def reset_prompts(self) -> StepStatus:
        """Forget the selected segment's prompts and remove their points from the lists; the voxels stay.

        The next prediction starts a new session, whose first result replaces the segment's content. Undoable.
        """
        return self._reset("Reset prompts", clear=False)

    def clear_segment(self) -> StepStatus:
        """Empty the selected segment (masking applies) and reset its prompts, as one undoable step."""
        return self._reset("Clear", clear=True)

    def _reset(self, action: str, clear: bool) -> StepStatus:
        segment_id = self._current_segment()
        started = time.perf_counter()
        state = self._state(segment_id)
        before = state.snapshot()
        extent, patches = None, []
        if clear:
            current = read_segment_mask(self.segmentation_node, segment_id, self.volume_node)
            extent = extent_of(current != 0)
            patches = self._write(segment_id, np.zeros_like(current), extent)
        place_points(self.scene, state.sources, [])
        self._states[segment_id] = PromptState()
        if patches or before.prompts:
            self.history.record(HistoryEntry(action, segment_id, before, PromptState(), -1, patches))
        self._store(segment_id)
        return StepStatus(action, segment_id, self._segment_name(segment_id), 0.0,
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
        sources = state.sources[:click_count(state.prompts)]
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
            clicks = click_count(prompts)
            sources = (sources + [None] * clicks)[:clicks]
            self._states[segment_id] = PromptState(None, prompts, sources)
            restored.append(segment_id)
        return restored
