"""Peak memory of one call, measured in a fresh process.

Why a fresh process: within a long-running process the allocator keeps what earlier calls freed, so the resident
set size hardly moves during a repeated call (the old sampler reported 0 MiB and identical figures).

CPU peak: Linux's high-water mark of the resident set (``VmHWM`` in ``/proc/self/status``), reset to the current
resident size just before the call by writing ``5`` to ``/proc/self/clear_refs``. ``ru_maxrss`` is not used where
the reset works: it only ever grows, and a child made by fork + exec starts with its *parent's* peak (Linux keeps
it across ``execve``), so under a large parent (a long pytest run) it hid the call entirely. Where the reset is
refused (non-Linux, restricted ``/proc``) the figure falls back to ``ru_maxrss`` and ``peak_in_call`` says
whether the call raised it.

On CUDA the figure is ``torch.cuda.max_memory_allocated`` (tensors only, no allocator cache) of that process.

Tensor peak (``tensor_peak_mb``, both devices): the most memory the call's *own tensors* held at once, above what was
allocated before it - the figure ``torch.cuda.max_memory_allocated`` gives on a GPU, which a process's resident set
on CPU does not: there it also holds Python, torch's libraries, the weights and whatever the C library keeps after
frees (with :func:`~monai_ipear.runtime.keep_freed_cpu_memory` a heap whose high-water mark depends on the order of
allocations). On CPU it is read from PyTorch's profiler (``profile_memory=True``: one event per tensor allocation
and free, in order) over a second call, after the resident-set measurement; the profiler is not used on CUDA.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource

import torch

__all__ = ["peak_memory_in_fresh_process", "measure_call_peak", "cpu_tensor_peak_bytes"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset this process's resident-set high-water mark to its current size (Linux >= 4.0); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int | None:
    """``VmHWM`` of ``/proc/self/status`` in bytes, or None where it is not available."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def cpu_tensor_peak_bytes(call, *args) -> int | None:
    """Run ``call(*args)`` under PyTorch's profiler and return the most bytes that CPU tensors allocated during the
    call held at once (frees of tensors that existed before the call are not counted), or None where the profiler
    gives no memory events.

    Why by hand: PyTorch offers ``torch.cuda.max_memory_allocated`` but no CPU counterpart; its profiler records
    every CPU allocation and free (``[memory]`` events, signed sizes), whose running sum in time order this takes.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call(*args)
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:  # a torch without the Kineto results
        return None
    sizes = sorted((e.start_ns(), e.nbytes()) for e in events
                   if e.name() == "[memory]" and e.device_type().name == "CPU")
    if not sizes:
        return None
    running = peak = 0
    for _, nbytes in sizes:
        running += nbytes
        peak = max(peak, running)
    return peak


def measure_call_peak(call, *args, device: torch.device | str = "cpu") -> dict:
    """Run ``call(*args)`` once in *this* process and report its peak memory (MiB).

    CPU: ``peak_mb`` = the process's peak resident set size during the call (``VmHWM`` after resetting it just
    before; fallback ``ru_maxrss``), ``peak_rise_mb`` = its rise over the resident size just before the call, and
    ``peak_in_call`` = whether the figure is the call's own peak (always with the reset; with the fallback, whether
    the call raised ``ru_maxrss``: if not, the call's peak is at most ``peak_mb``), and ``tensor_peak_mb`` =
    :func:`cpu_tensor_peak_bytes` of a second call (NaN where the profiler gives none). CUDA:
    ``torch.cuda.max_memory_allocated`` and its rise, which is also ``tensor_peak_mb``. Meant for a fresh process
    (:func:`peak_memory_in_fresh_process`).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call(*args)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        rise = (peak - base) / 2**20
        return {"peak_mb": peak / 2**20, "peak_rise_mb": rise, "peak_in_call": True, "tensor_peak_mb": rise}
    base = _rss_bytes()
    if _reset_peak_rss() and _peak_rss_bytes() is not None:
        call(*args)
        peak = max(_peak_rss_bytes(), base)
        result = {"peak_mb": peak / 2**20, "peak_rise_mb": (peak - base) / 2**20, "peak_in_call": True}
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        call(*args)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result = {"peak_mb": after / 2**20, "peak_rise_mb": max(0, after - base) / 2**20,
                  "peak_in_call": after > before}
    tensors = cpu_tensor_peak_bytes(call, *args)
    result["tensor_peak_mb"] = float("nan") if tensors is None else tensors / 2**20
    return result


def _child(queue, call, args, device, threads, keep_freed):
    try:
        if keep_freed:  # the same allocator setting as the timed process
            from ..runtime import keep_freed_cpu_memory

            keep_freed_cpu_memory()
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
    from ..runtime import keeps_freed_cpu_memory, release_freed_cpu_memory

    release_freed_cpu_memory()  # what this process kept for reuse would sit beside the child's peak
    proc = ctx.Process(target=_child, args=(queue, call, args, str(device), torch.get_num_threads(),
                                            keeps_freed_cpu_memory()))
    proc.start()
    try:
        result = queue.get(timeout=timeout)
    except Exception as e:  # noqa: BLE001 - a crashed child (e.g. killed for memory) sends nothing
        result = {"error": f"no result from the measuring process ({type(e).__name__}); exit code {proc.exitcode}"}
    proc.join(timeout=60)
    if "error" in result:
        result.update(peak_mb=float("nan"), peak_rise_mb=float("nan"), peak_in_call=False, tensor_peak_mb=float("nan"))
    return result
