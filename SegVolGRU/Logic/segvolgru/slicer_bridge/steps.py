"""The steps a workflow runs and the click sources it remembers: plain data that crosses threads.

A :class:`Step` is prepared on the main thread, computed anywhere (``compute()`` runs torch only) and applied by
the workflow on the main thread; :class:`StepStatus` says what it did.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segvolgru.errors import SegVolGRUError

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
class Outcome:
    session: Any
    mask: np.ndarray | None  # None: the step changes prompts only (an undo or redo restores stored voxels)
    changed_extent: Extent | None
    fresh: bool
    timings: dict[str, float]
    sources: list[ClickSource | None] | None  # the new click sources, or None to keep the current ones


class Step:
    """One prediction: prepared on the main thread, ``compute()`` anywhere (torch only), then ``apply``-ed."""

    def __init__(self, action: str, segment_id: str, run: Callable[[], Outcome]) -> None:
        self.action = action
        self.segment_id = segment_id
        self._run = run
        self.outcome: Outcome | None = None
        self.error: BaseException | None = None
        self.compute_seconds = 0.0
        self.computed = False
        self.history: tuple[Any, bool] | None = None  # (entry, True for undo) for undo and redo steps

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


def click_count(prompts: Sequence[dict]) -> int:
    return sum(1 for p in prompts if isinstance(p, dict) and p.get("type") == "click")  # stored ones may be altered


def extent_of(changed: np.ndarray) -> Extent | None:
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


def union_extent(a: Extent | None, b: Extent | None) -> Extent | None:
    if a is None or b is None:
        return a if b is None else b
    return (*(min(x, y) for x, y in zip(a[:3], b[:3])), *(max(x, y) for x, y in zip(a[3:], b[3:])))
