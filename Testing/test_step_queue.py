"""StepQueue, the panel's request queue and worker thread, with real threads and no Qt."""
from __future__ import annotations

import ctypes
import threading
import time

import pytest

from segvolgru.slicer_bridge.step_queue import StepQueue


class FakeStep:
    def __init__(self, action, seconds=0.0, python_work=0):
        self.action, self.seconds, self.python_work = action, seconds, python_work
        self.thread = None

    def compute(self):
        self.thread = threading.current_thread().name
        time.sleep(self.seconds)
        total = 0
        for n in range(self.python_work):  # pure Python: needs the GIL all along
            total += n
        return self


def make_queue(log, current=lambda owner: True):
    errors = []
    queue = StepQueue(lambda owner, step: log.append((owner, step.action)), is_current=current,
                      on_dropped=lambda step: log.append(("dropped", step.action)), on_error=errors.append)
    return queue, errors


def test_requests_run_in_order_on_one_worker_thread_and_apply_on_the_caller():
    log, steps = [], [FakeStep(f"s{n}", 0.01) for n in range(4)]
    queue, _ = make_queue(log)
    for step in steps:
        queue.submit(lambda step=step: ("wf", step))
    queue.wait_idle(10)
    assert log == [("wf", f"s{n}") for n in range(4)]
    assert {step.thread for step in steps} == {steps[0].thread} != threading.current_thread().name


def test_a_waiting_request_of_the_same_kind_is_not_queued_twice():
    log = []
    queue, _ = make_queue(log)
    queue.submit(lambda: ("wf", FakeStep("box", 0.05)))
    prepared = []
    for _n in range(3):
        queue.submit(lambda: prepared.append(1) or ("wf", FakeStep("sync")), kind="sync")
    assert queue.waiting == 1
    queue.wait_idle(10)
    assert prepared == [1] and [action for _, action in log] == ["box", "sync"]


def test_a_result_whose_owner_is_gone_is_dropped():
    log, owners = [], {"current": "old"}
    queue, _ = make_queue(log, current=lambda owner: owner == owners["current"])
    queue.submit(lambda: ("old", FakeStep("click", 0.05)))
    owners["current"] = "new"
    queue.wait_idle(10)
    assert log == [("dropped", "click")]


def test_a_failed_preparation_is_reported_once_and_drops_the_requests_built_on_it():
    log = []
    queue, errors = make_queue(log)
    queue.submit(lambda: ("wf", FakeStep("box", 0.05)))

    def broken():
        raise ValueError("no ROI")

    queue.submit(broken)
    queue.submit(lambda: ("wf", FakeStep("later")))
    with pytest.raises(ValueError, match="no ROI"):
        queue.wait_idle(10)
    assert [action for _, action in log] == ["box"] and len(errors) == 1
    queue.wait_idle(10)  # raised once only
    queue.submit(lambda: ("wf", FakeStep("after")))
    queue.wait_idle(10)
    assert log[-1] == ("wf", "after")


def test_wait_idle_times_out_with_a_clear_message():
    queue, _ = make_queue([])
    queue.submit(lambda: ("wf", FakeStep("slow", 0.5)))
    with pytest.raises(TimeoutError, match="still predicting"):
        queue.wait_idle(0.05)
    queue.shutdown()


def test_shutdown_returns_at_once_and_nothing_is_applied_afterwards():
    log = []
    queue, _ = make_queue(log)
    queue.submit(lambda: ("wf", FakeStep("slow", 0.3)))
    started = time.monotonic()
    queue.shutdown()
    assert time.monotonic() - started < 0.1
    time.sleep(0.4)
    assert queue.poll(0.0) is False and log == []
    queue.submit(lambda: ("wf", FakeStep("late")))
    assert log == [] and not queue.busy


def test_poll_waits_on_the_future_so_a_python_heavy_step_advances_while_the_main_loop_holds_the_gil():
    """A main loop that holds the GIL between events (as Slicer's does) starves a worker that needs the GIL,
    unless each poll waits on the future with the GIL released."""
    hold = ctypes.PyDLL(None).usleep  # called with the GIL held
    hold.argtypes = [ctypes.c_uint]
    work = 3_000_000

    def run(wait_seconds):
        queue, _ = make_queue([])
        queue.submit(lambda: ("wf", FakeStep("python", 0.0, work)))
        started = time.monotonic()
        while queue.busy:
            hold(20_000)  # 20 ms of Qt idling with the GIL
            queue.poll(wait_seconds)
        return time.monotonic() - started

    starved, waited = run(0.0), run(0.2)
    assert waited < 0.7 * starved
