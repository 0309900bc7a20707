"""Benchmark: a panel step computed on the worker thread while the main thread polls as in Slicer, against the
same step alone. Slicer's main thread holds the GIL while Qt idles; this simulates that with a C sleep made
with the GIL held between polls.

    .venv/bin/python scripts/bench_worker.py [--idle-ms 5] [--repeats 5] [--shape 32 96 96]

Prints JSON: a box and a click (encoder included) of the DEMO model on a phantom, alone, with the panel's polling (wait on the future, then idle), and with the former
polling (check done(), then idle 30 ms) — seconds, median of the repeats.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time

import numpy as np

import segvolgru
from segvolgru.cache import EmbeddingCache
from segvolgru.phantoms import make_phantom
from segvolgru.slicer_bridge.step_queue import StepQueue

_HOLD = ctypes.PyDLL(None).usleep
_HOLD.argtypes = [ctypes.c_uint]


class BoxAndClickStep:
    """A box on a new session with an empty embedding cache (the encoder runs), then one click."""

    action = "Box"

    def __init__(self, model, volume, spacing, box, voxel):
        self.session = segvolgru.InteractiveSession(model, volume, spacing=spacing, cache=EmbeddingCache())
        self.box, self.voxel = box, voxel

    def compute(self):
        self.session.set_box(self.box)
        self.session.add_click(self.voxel, True)
        return self


def timed(step, wait_seconds: float | None, idle_ms: int) -> float:
    queue = StepQueue(lambda owner, s: None)
    started = time.perf_counter()
    if wait_seconds is None:
        step.compute()
        return time.perf_counter() - started
    queue.submit(lambda: ("owner", step))
    while queue.busy:
        _HOLD(idle_ms * 1000)
        queue.poll(wait_seconds)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-ms", type=int, default=5, help="main-thread idle between polls, GIL held")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shape", type=int, nargs=3, default=(32, 96, 96), help="phantom (K, J, I): larger, longer steps")
    args = parser.parse_args()
    model = segvolgru.load_model(segvolgru.demo_model_path())
    volume, labels, spacing = make_phantom(3, shape=tuple(args.shape), modality="ct")
    ks, js, is_ = np.nonzero(labels == np.bincount(labels[labels > 0]).argmax())
    box = (ks.min(), js.min(), is_.min(), ks.max(), js.max(), is_.max())
    voxel = (int(np.median(ks)), int(np.median(js)), int(np.median(is_)))
    timed(BoxAndClickStep(model, volume, spacing, box, voxel), None, 0)  # warm-up: first-call costs out of the figures
    results = {}
    for name, wait, idle in (("alone_s", None, 0), ("panel_polling_s", 0.05, args.idle_ms),
                             ("former_polling_s", 0.0, 30)):
        results[name] = statistics.median(
            timed(BoxAndClickStep(model, volume, spacing, box, voxel), wait, idle) for _ in range(args.repeats))
    results["panel_over_alone"] = results["panel_polling_s"] / results["alone_s"]
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
