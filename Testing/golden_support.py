"""Inputs and reference data of the golden fidelity check (copied from ../shared/golden into Testing/golden)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

GOLDEN_DIR = Path(__file__).with_name("golden")
_DTYPES = {"float32": torch.float32, "int64": torch.int64}


def manifest_entries() -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    entries = []
    for line in (GOLDEN_DIR / "manifest.tsv").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        key, dtype, shape = line.split("\t")
        entries.append((key, _DTYPES[dtype], tuple(int(s) for s in shape.split(",")) if shape else ()))
    return entries


def manifest_hash() -> str:
    for line in (GOLDEN_DIR / "manifest.tsv").read_text().splitlines():
        if line.startswith("#") and "sha256" in line:
            return line.split(":")[-1].strip()
    raise AssertionError("manifest.tsv has no weight hash line")


def golden_image() -> np.ndarray:
    """The closed-form (32, 256, 256) float32 test image of the golden reference (see its inputs.py docstring)."""
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in (32, 256, 256)], indexing="ij")
    base = 0.25 + 0.08 * np.sin(2 * np.pi * x / 64) * np.cos(2 * np.pi * y / 48) \
        + 0.05 * np.sin(2 * np.pi * z / 16 + 0.3)
    r2 = ((z - 16) / 6) ** 2 + ((y - 120) / 40) ** 2 + ((x - 100) / 30) ** 2
    organ = 0.6 / (1 + np.exp(8 * (r2 - 1)))
    blob = 0.3 * np.exp(-((z - 10) ** 2 / (2 * 4 ** 2) + (y - 190) ** 2 / (2 * 20 ** 2)
                          + (x - 180) ** 2 / (2 * 20 ** 2)))
    return np.clip(base + organ + blob, 0, 1).astype(np.float32)


def cases() -> dict[str, dict]:
    return json.loads((GOLDEN_DIR / "cases.json").read_text())["cases"]


def reference() -> dict[str, np.ndarray]:
    with np.load(GOLDEN_DIR / "reference.npz") as z:
        return {k: z[k] for k in z.files}


def stats(array: np.ndarray) -> np.ndarray:
    a = np.asarray(array, dtype=np.float64)
    return np.array([a.mean(), a.std(), a.min(), a.max()])


def max_abs_diff(got, want) -> float:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"shape {got.shape} != reference {want.shape}"
    return float(np.abs(got - want).max())
