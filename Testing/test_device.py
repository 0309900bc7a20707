"""Device choice and the out-of-memory fallback."""
from __future__ import annotations

import pytest
import torch

from segvolgru.device import autocast, describe_device, resolve_device, with_oom_fallback
from segvolgru.errors import InputError


def test_auto_picks_cpu_without_a_gpu_and_cpu_is_described():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: auto picks it")
    assert resolve_device("auto") == torch.device("cpu")
    assert describe_device(torch.device("cpu")).startswith("cpu (")


def test_cuda_without_a_gpu_and_unknown_devices_are_refused():
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA GPU"):
            resolve_device("cuda")
    with pytest.raises(InputError, match="unknown device"):
        resolve_device("tpu")


def test_out_of_memory_falls_back_to_the_cpu_with_a_warning():
    calls, moved = [], []

    def run():
        calls.append(len(calls))
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return "done on cpu"

    with pytest.warns(RuntimeWarning, match="falling back to the CPU"):
        assert with_oom_fallback(run, lambda: moved.append(True)) == "done on cpu"
    assert moved == [True] and len(calls) == 2


def test_cpu_always_computes_in_fp32_and_bad_precision_is_refused():
    with autocast(torch.device("cpu"), "bf16"):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(InputError, match="unknown precision"):
        autocast(torch.device("cpu"), "int4")
