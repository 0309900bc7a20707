"""Compute device choice, its description, precision and the CUDA out-of-memory fallback to CPU."""
from __future__ import annotations

import contextlib
import gc
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

from .errors import InputError

T = TypeVar("T")
PRECISIONS = ("fp32", "bf16", "fp16")


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """"auto" -> the first CUDA GPU when present, else CPU; "cpu", "cuda" or "cuda:N" by choice."""
    if isinstance(spec, torch.device):
        return spec
    if spec is not None and not isinstance(spec, str):
        raise InputError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"device {spec!r} was asked for but no CUDA GPU is available: use 'cpu' or 'auto'")
        device = torch.device(spec)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"{spec} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device
    if spec == "cpu":
        return torch.device("cpu")
    raise InputError(f"unknown device {spec!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")


def describe_device(device: torch.device) -> str:
    """A line for status bars and logs, e.g. "cuda:0 (NVIDIA H200, 139.8 GiB)" or "cpu (2 threads)"."""
    if device.type == "cuda":
        index = device.index or 0
        props = torch.cuda.get_device_properties(index)
        return f"cuda:{index} ({props.name}, {props.total_memory / 1024 ** 3:.1f} GiB)"
    return f"cpu ({torch.get_num_threads()} threads)"


def autocast(device: torch.device, precision: str = "fp32") -> contextlib.AbstractContextManager:
    """Mixed precision on GPU when asked; fp32 always on CPU (the fidelity tests and CPU speed both want it)."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "fp32" or device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def with_oom_fallback(run: Callable[[], T], to_cpu: Callable[[], None]) -> T:
    """Run ``run``; on a CUDA out-of-memory error free the GPU, call ``to_cpu`` and run again on the CPU."""
    try:
        return run()
    except torch.cuda.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        warnings.warn("CUDA ran out of memory: falling back to the CPU for this and later predictions "
                      "(slower); choose a smaller ROI or free GPU memory to use the GPU again", RuntimeWarning)
        to_cpu()
        torch.cuda.empty_cache()
        return run()
