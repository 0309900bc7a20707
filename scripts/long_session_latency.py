"""Click latency along one long interactive session: does a click cost more the more clicks came before it?

The shipped demo model (GRU correction on) on a 32x64x64 CT-like volume: a box over the middle half, then random
clicks of alternating polarity anywhere in the volume. Prints the median seconds of clicks 1-50, 151-200 and 351-400
(those the session reaches), wall clock and this process's CPU time (which other load on the machine does not
inflate); the last line is one JSON object. Uses only the public API, so that the same command
measures an older checkout (``PYTHONPATH=<checkout>/SegVolGRU/Logic``).

    .venv/bin/python scripts/long_session_latency.py [--clicks 400] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from segvolgru import InteractiveSession, demo_model_path, load_model
from segvolgru.bench import ct_like_volume
from segvolgru.cache import EmbeddingCache

SHAPE = (32, 64, 64)
RANGES = ((1, 50), (151, 200), (351, 400))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=400, help="clicks after the box (default 400)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    session = InteractiveSession(load_model(demo_model_path()), ct_like_volume(SHAPE), cache=EmbeddingCache())
    lo, hi = np.asarray(SHAPE) // 4, 3 * np.asarray(SHAPE) // 4 - 1
    session.set_box((*lo.tolist(), *hi.tolist()))
    rng = np.random.default_rng(0)
    times = {"wall": [], "cpu": []}
    for n in range(args.clicks):
        voxel = tuple(int(v) for v in rng.integers(0, SHAPE))
        wall, cpu = time.perf_counter(), time.process_time()
        session.add_click(voxel, bool(n % 2 == 0))
        times["wall"].append(time.perf_counter() - wall)
        times["cpu"].append(time.process_time() - cpu)
    print(json.dumps({f"{clock}_clicks_{a}_{b}_s": round(statistics.median(values[a - 1:b]), 4)
                      for clock, values in times.items() for a, b in RANGES if b <= len(values)}))


if __name__ == "__main__":
    main()
