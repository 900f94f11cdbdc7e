"""Peak memory of one call, measured in a fresh process.

Why a fresh process: within a long-running process the allocator keeps what earlier calls freed, so the resident
set size hardly moves during a repeated call (the old sampler reported 0 MiB and identical figures), and
``ru_maxrss`` only ever holds the largest value since the process started. A spawned process that loads the
network and inputs and makes the call once has ``ru_maxrss`` (``resource.getrusage``) equal to the peak of that
call whenever the call raises it above the loading phase, which is checked and reported.

On CUDA the figure is ``torch.cuda.max_memory_allocated`` (tensors only, no allocator cache) of that process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource

import torch

__all__ = ["peak_memory_in_fresh_process", "measure_call_peak"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_call_peak(call, *args, device: torch.device | str = "cpu") -> dict:
    """Run ``call(*args)`` once in *this* process and report its peak memory (MiB).

    CPU: ``peak_mb`` = the process's peak resident set size after the call (``ru_maxrss``), ``peak_rise_mb`` = its
    rise over the resident size just before the call, and ``peak_in_call`` = whether the call set the peak (if
    not, the peak of the call is at most ``peak_mb``). CUDA: ``torch.cuda.max_memory_allocated`` and its rise.
    Meant for a fresh process (:func:`peak_memory_in_fresh_process`).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call(*args)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mb": peak / 2**20, "peak_rise_mb": (peak - base) / 2**20, "peak_in_call": True}
    base = _rss_bytes()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    call(*args)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_mb": after / 2**20, "peak_rise_mb": max(0, after - base) / 2**20, "peak_in_call": after > before}


def _child(queue, call, args, device, threads):
    try:
        torch.set_num_threads(threads)
        args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
        queue.put(measure_call_peak(call, *args, device=device))
    except BaseException as e:  # report instead of hanging the parent
        queue.put({"error": f"{type(e).__name__}: {e}"})


def peak_memory_in_fresh_process(call, *args, device: torch.device | str = "cpu", timeout: float = 3600) -> dict:
    """:func:`measure_call_peak` of ``call(*args)`` in a spawned process (``call`` must be picklable: a module or
    a module-level function with picklable arguments). Returns NaN figures with an ``error`` entry on failure."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    proc = ctx.Process(target=_child, args=(queue, call, args, str(device), torch.get_num_threads()))
    proc.start()
    try:
        result = queue.get(timeout=timeout)
    except Exception as e:  # noqa: BLE001 - a crashed child (e.g. killed for memory) sends nothing
        result = {"error": f"no result from the measuring process ({type(e).__name__}); exit code {proc.exitcode}"}
    proc.join(timeout=60)
    if "error" in result:
        result.update(peak_mb=float("nan"), peak_rise_mb=float("nan"), peak_in_call=False)
    return result
