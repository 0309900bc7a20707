"""The workflow's undo history: every step (box, clicks, undoable clears and prompt resets) with what it replaced.

One linear history per workflow, across its segments, as in Slicer's Segment Editor: a write into one segment can
overwrite voxels of others, so only undoing the steps in reverse order restores every segment exactly. An entry
keeps the segment's prompt state before and after the step and, for each segment the step could change, the
voxels of the written box before and after (1 bit per voxel).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from segvolgru.errors import InputError

Extent = tuple[int, int, int, int, int, int]
HISTORY_LIMIT = 50


@dataclass
class PromptState:
    """A segment's prompts as the panel shows them: the live session (or None: replayed at the next step), the
    prompt list and the markups point each click came from (aligned with the click prompts)."""

    session: Any = None
    prompts: list[dict] = field(default_factory=list)
    sources: list[Any] = field(default_factory=list)

    def snapshot(self) -> "PromptState":
        """A copy whose lists later steps cannot change; click sources are shared, so a point put back by an
        undo (with a new point ID) is known to every entry that names it."""
        return PromptState(self.session, [dict(p) for p in self.prompts], list(self.sources))


@dataclass(frozen=True)
class VoxelPatch:
    """Voxels of one segment inside ``extent`` (inclusive k0, j0, i0, k1, j1, i1) before and after a write."""

    segment_id: str
    extent: Extent
    before_bits: np.ndarray
    after_bits: np.ndarray

    @classmethod
    def of(cls, segment_id: str, extent: Sequence[int], before: np.ndarray, after: np.ndarray) -> "VoxelPatch":
        return cls(segment_id, tuple(int(v) for v in extent), np.packbits(before != 0), np.packbits(after != 0))

    def values(self, after: bool) -> np.ndarray:
        """The box's voxels (uint8 0/1, shape of the extent) after the write, or before it."""
        k0, j0, i0, k1, j1, i1 = self.extent
        shape = (k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1)
        bits = self.after_bits if after else self.before_bits
        return np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape)


@dataclass
class HistoryEntry:
    """One step of the panel.

    ``pushes`` counts the prompts the live session gained in place (undone with ``session.undo()``); -1 when the
    step changed which session is live (a replay, moved clicks, a reset), so undo and redo swap sessions.
    """

    action: str
    segment_id: str
    before: PromptState
    after: PromptState
    pushes: int
    patches: list[VoxelPatch]


class History:
    """Undo and redo stacks of ``HistoryEntry``; the oldest entries beyond ``limit`` are forgotten."""

    def __init__(self, limit: int = HISTORY_LIMIT) -> None:
        self.limit = limit
        self._undo: list[HistoryEntry] = []
        self._redo: list[HistoryEntry] = []
        self._trimmed = False

    def record(self, entry: HistoryEntry) -> None:
        """A new step: it becomes the one to undo and clears the redo stack."""
        self._undo.append(entry)
        self._redo.clear()
        if len(self._undo) > self.limit:
            del self._undo[0]
            self._trimmed = True

    def next_undo(self) -> HistoryEntry:
        """The entry ``undone()`` would move; InputError saying why when there is none."""
        if not self._undo:
            if self._trimmed:
                raise InputError(f"The undo history is exhausted: it keeps the last {self.limit} steps.")
            raise InputError("Nothing to undo: no box, click, clear or prompt reset in this segmentation yet.")
        return self._undo[-1]

    def next_redo(self) -> HistoryEntry:
        if not self._redo:
            raise InputError("Nothing to redo: redo follows an undo, before any new step.")
        return self._redo[-1]

    def undone(self) -> None:
        self._redo.append(self._undo.pop())

    def redone(self) -> None:
        self._undo.append(self._redo.pop())

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def drop_sessions(self) -> None:
        """Forget the sessions the entries hold (after a settings change they no longer match): undoing to such a
        state replays its prompts at the next step instead."""
        for entry in self._undo + self._redo:
            entry.before = replace(entry.before, session=None)
            entry.after = replace(entry.after, session=None)
