"""The panel's request queue and worker thread, without Qt, so that pytest drives it with real threads.

Requests (box, clicks, undo, ...) run one at a time and in order. Each is *prepared* on the main thread when its
turn comes (it reads MRML and returns a step, or None when there is nothing to do), *computed* on one worker
thread (torch only), then *applied* on the main thread (writes into MRML). Clicks placed while a prediction runs
are therefore kept and handled in order, and MRML is only touched on the main thread.

Waiting is GIL-friendly. Slicer does not enable PythonQt's thread support, so its main thread holds the GIL while
Qt idles: a worker running Python code (torch's module calls between kernels) advances only while the main thread
runs Python that releases the GIL. ``poll`` and ``wait_idle`` therefore block on the running future with
``concurrent.futures.wait`` and a timeout, which releases the GIL for that long, instead of checking ``done()``
and returning to the event loop at once.
"""
from __future__ import annotations

import collections
import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol


class Computable(Protocol):
    """A prepared step: ``compute()`` runs anywhere and keeps its own errors for the apply phase."""

    action: str

    def compute(self) -> Any: ...


Prepared = tuple[Any, Computable]
"""(owner, step): ``owner`` is what prepared the step (the workflow); a result whose owner is no longer current
is dropped instead of applied."""


@dataclass
class _Running:
    owner: Any
    step: Computable
    future: concurrent.futures.Future


def _ignore(*_args) -> None:
    return None


class StepQueue:
    """Prepare on the caller's thread, compute on one worker thread, apply on the caller's thread, in order.

    Args:
        apply: ``apply(owner, step)`` on the main thread once the step's computation finished; its exceptions
            are reported like a failed preparation.
        is_current: ``is_current(owner)``; False drops a finished step (its nodes may be gone).
        on_started: ``on_started(step)`` when a step starts computing (for a status line).
        on_dropped: ``on_dropped(step)`` when a finished step is dropped.
        on_error: ``on_error(error)`` for a failed preparation or apply. The requests still waiting were built on
            the failed one, so they are dropped; ``wait_idle`` raises the error once.
        schedule: ``schedule(seconds, callback)`` runs ``callback`` on this thread after ``seconds`` (a Qt
            single-shot timer); with it the queue polls itself while a step runs: ``poll(wait_seconds)``, then
            ``poll_gap_seconds`` for the application's events. None: the caller polls.
    """

    def __init__(self, apply: Callable[[Any, Computable], None], *,
                 is_current: Callable[[Any], bool] = lambda owner: True,
                 on_started: Callable[[Computable], None] = _ignore,
                 on_dropped: Callable[[Computable], None] = _ignore,
                 on_error: Callable[[Exception], None] = _ignore,
                 schedule: Callable[[float, Callable[[], None]], None] | None = None,
                 poll_gap_seconds: float = 0.005, wait_seconds: float = 0.05) -> None:
        self._apply = apply
        self._is_current = is_current
        self._on_started = on_started
        self._on_dropped = on_dropped
        self._on_error = on_error
        self._schedule = schedule
        self._poll_gap = poll_gap_seconds
        self._wait = wait_seconds
        self._poll_scheduled = False
        self._waiting: collections.deque[tuple[str | None, Callable[[], Prepared | None]]] = collections.deque()
        self._running: _Running | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._closed = False
        self.last_error: Exception | None = None

    # ---------------------------------------------------------------- state
    @property
    def running(self) -> bool:
        """A step is computing (or finished and not applied yet)."""
        return self._running is not None

    @property
    def busy(self) -> bool:
        """A step is running or requests are waiting."""
        return self._running is not None or bool(self._waiting)

    @property
    def waiting(self) -> int:
        """Requests not prepared yet."""
        return len(self._waiting)

    # ---------------------------------------------------------------- main thread
    def submit(self, prepare: Callable[[], Prepared | None], kind: str | None = None) -> None:
        """Queue ``prepare`` and start it at once when nothing runs.

        With ``kind``, a request of that kind already waiting is not queued twice: a waiting click sync, for
        example, reads the point lists when it starts and so covers every click placed meanwhile.
        """
        if self._closed:
            return
        if kind is not None and any(waiting_kind == kind for waiting_kind, _ in self._waiting):
            return
        self._waiting.append((kind, prepare))
        if self._running is None:
            self.start_next()

    def start_next(self) -> None:
        """Prepare waiting requests until one gives a step, and start computing it."""
        while self._waiting and self._running is None and not self._closed:
            _, prepare = self._waiting.popleft()
            try:
                prepared = prepare()
            except Exception as error:
                self._fail(error)
                return
            if prepared is None:
                continue
            owner, step = prepared
            if self._executor is None:
                # One long-lived thread keeps CUDA's per-thread caches warm between clicks.
                self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="SegVolGRU")
            self._running = _Running(owner, step, self._executor.submit(step.compute))
            self._on_started(step)
        self._schedule_poll()

    def _schedule_poll(self) -> None:
        if self._schedule is not None and self._running is not None and not self._poll_scheduled:
            self._poll_scheduled = True
            self._schedule(self._poll_gap, self._scheduled_poll)

    def _scheduled_poll(self) -> None:
        self._poll_scheduled = False
        if not self._closed:  # a timer that fires after shutdown (a module reload) touches nothing
            self.poll(self._wait)
            self._schedule_poll()

    def poll(self, wait_seconds: float = 0.0) -> bool:
        """Wait up to ``wait_seconds`` for the running step (the GIL is released meanwhile); apply it when it
        finished and start the next. Returns whether work remains."""
        running = self._running
        if running is None:
            self.start_next()
            return self.busy
        if not running.future.done():
            concurrent.futures.wait([running.future], timeout=max(0.0, wait_seconds))
            if not running.future.done():
                self._schedule_poll()
                return True
        self._running = None
        if self._closed:
            return False
        try:
            running.future.result()  # compute() keeps model errors in the step; this re-raises only a crash
            if self._is_current(running.owner):
                self._apply(running.owner, running.step)
            else:
                self._on_dropped(running.step)
        except Exception as error:
            self._fail(error)
        self.start_next()
        return self.busy

    def wait_idle(self, timeout_seconds: float, process_events: Callable[[], None] = _ignore,
                  slice_seconds: float | None = None) -> None:
        """Run the queue to the end on this thread: wait on each step in slices of ``slice_seconds`` and call
        ``process_events`` between slices (the application's event loop). Raises TimeoutError after
        ``timeout_seconds``, and the first error reported meanwhile (once)."""
        deadline = time.monotonic() + timeout_seconds
        while self.busy and not self._closed:
            if time.monotonic() > deadline:
                raise TimeoutError(f"SegVolGRU is still predicting after {timeout_seconds:g} s.")
            self.poll(self._wait if slice_seconds is None else slice_seconds)
            process_events()
        error, self.last_error = self.last_error, None
        if error is not None:
            raise error

    def forget(self) -> None:
        """Drop the waiting requests; a step computing now is dropped when it finishes if its owner is gone."""
        self._waiting.clear()

    def shutdown(self) -> None:
        """Stop for good without blocking: waiting requests are dropped, a running computation finishes on its
        thread and is never applied, later polls and submissions do nothing."""
        self._closed = True
        self._waiting.clear()
        self._running = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _fail(self, error: Exception) -> None:
        self._waiting.clear()
        self.last_error = error
        self._on_error(error)
