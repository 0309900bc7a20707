"""Time `segvolgru.preprocess` on a 300x512x512 CT-like volume, as int16 and as float32.

Prints JSON: seconds per case (median of --repeats runs), the volume shape and the crop found. Goals on 2 CPU
cores: int16 <= 0.15 s, float32 <= 0.3 s.

    .venv/bin/python scripts/bench_preprocess.py [--shape 300 512 512] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from segvolgru.preprocessing import preprocess


def ct_like_volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """int16 (K, J, I) volume in HU: air -1000 around an elliptic body of soft tissue (~40 HU, noisy), with a
    bright bone cylinder (~1200 HU) and a small metal-like block (3000 HU)."""
    rng = np.random.default_rng(seed)
    k, j, i = shape
    jj, ii = np.ogrid[:j, :i]
    body = ((jj - j / 2) / (0.42 * j)) ** 2 + ((ii - i / 2) / (0.45 * i)) ** 2 <= 1
    bone = ((jj - 0.6 * j) / (0.06 * j)) ** 2 + ((ii - i / 2) / (0.06 * i)) ** 2 <= 1
    volume = np.full(shape, -1000, dtype=np.int16)
    volume[int(0.05 * k):int(0.95 * k), body] = 40
    volume[int(0.05 * k):int(0.95 * k), bone] = 1200
    volume += rng.normal(0, 25, size=shape).astype(np.int16)
    volume[k // 2, j // 2 - 3:j // 2 + 3, i // 2 - 3:i // 2 + 3] = 3000
    return volume


def median_seconds(volume: np.ndarray, repeats: int) -> tuple[float, object]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = preprocess(volume)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), help="volume shape (K, J, I)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per case; the median is reported")
    args = parser.parse_args()
    ct = ct_like_volume(tuple(args.shape))
    report = {"shape": list(ct.shape)}
    for name, volume in (("int16", ct), ("float32", ct.astype(np.float32))):
        seconds, result = median_seconds(volume, args.repeats)
        report[f"{name}_seconds"] = round(seconds, 4)
        report[f"{name}_crop"] = [list(result.crop_start), list(result.crop_stop)]
    print(json.dumps(report))


if __name__ == "__main__":
    main()
