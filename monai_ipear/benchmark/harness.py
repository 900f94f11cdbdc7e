"""Run registration methods over pairs and measure time, memory, accuracy, smoothness and TCI iterations.

Per pair and method: wall time of ``register`` (median over ``repeats`` timed calls after ``warmup`` untimed
ones), peak memory of the call (learned methods: measured in a fresh process,
:func:`~monai_ipear.benchmark.memory.peak_memory_in_fresh_process`, CPU: the peak resident set size of that
process; classical methods, timed once: rise of this process's resident set size sampled every 2 ms; CUDA:
``torch.cuda.max_memory_allocated``),
Dice per label and mean, HD95 and ASSD (mm) and folding % (``monai_ipear.metrics.pair_registration_metrics``),
and the number of updates per pyramid level (``network.last_iterations``).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Sequence

import torch

from ..metrics import pair_registration_metrics
from ..networks.blocks.fields import FieldComposer
from .methods import BenchmarkMethod

__all__ = ["PeakMemory", "time_call", "run_benchmark"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakMemory:
    """Context manager: ``peak_mb`` = peak memory of the enclosed code above its start (MiB).

    On CUDA (``device.type == "cuda"``) it uses the allocator's peak; on CPU it samples the resident set size
    (Linux ``/proc``; elsewhere ``peak_mb`` stays NaN).
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.002) -> None:
        self.device, self.interval = torch.device(device), interval
        self.peak_mb = float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        try:
            self._base = self._peak = _rss_bytes()
        except OSError:
            self._thread = None
            return self
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self._peak = max(self._peak, _rss_bytes())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
            return
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.peak_mb = (self._peak - self._base) / 2**20


def time_call(fn, *args, repeats: int = 3, warmup: int = 1, device: torch.device | str = "cpu"):
    """Run ``fn(*args)`` ``warmup`` times untimed, then ``repeats`` times timed; return (last output, times in s,
    peak MiB of the first timed call)."""
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    out = None
    for _ in range(warmup):
        out = fn(*args)
    times, peak = [], float("nan")
    for r in range(repeats):
        with PeakMemory(device) as mem:
            sync(device)
            start = time.perf_counter()
            out = fn(*args)
            sync(device)
            times.append(time.perf_counter() - start)
        if r == 0:
            peak = mem.peak_mb
    return out, times, peak


def run_benchmark(
    methods: Sequence[BenchmarkMethod],
    pairs: Sequence[dict],
    labels: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    repeats: int = 3,
    warmup: int = 1,
    surface: bool = True,
    device: torch.device | str = "cpu",
    log=print,
) -> dict[str, list[dict]]:
    """Every available method on every pair.

    Args:
        methods: from :func:`~monai_ipear.benchmark.methods.build_method` (unavailable ones are skipped).
        pairs: dicts with ``moving_image``, ``fixed_image`` ``(1, 1, *spatial)`` and optionally ``moving_label``,
            ``fixed_label`` ``(1, 1, *spatial)``, and a ``pair`` name.
        labels: labels to score (default: all present in both maps).
        spacing: voxel size (mm) for HD95/ASSD.
        repeats, warmup: timing (median of ``repeats``; methods with ``timed_once`` run once, no warm-up).
        surface: compute HD95 and ASSD.

    Returns:
        ``{method name: [per-pair dict]}``; each dict holds ``pair``, ``time_s`` (median), ``times_s``,
        ``peak_mb``, ``iterations`` (list per level, finest first, or None) and the metric keys of
        :func:`~monai_ipear.metrics.pair_registration_metrics` (``dice_mean``, ``dice_<label>``, ...).
    """
    device = torch.device(device)
    fields = FieldComposer("zeros")  # the padding the networks and the bundle's inference use
    results: dict[str, list[dict]] = {}
    for method in methods:
        if not method.available:
            log(f"{method.name}: {method.note}")
            continue
        if method.network is not None:
            method.network.to(device)
        rows = []
        for pair in pairs:
            moving, fixed = pair["moving_image"].to(device), pair["fixed_image"].to(device)
            learned = method.network is not None
            once = method.timed_once
            ddf, times, peak = time_call(method.register, moving, fixed, repeats=1 if once else repeats,
                                         warmup=0 if once else warmup, device=device)
            if learned:  # the in-process sampler misses what the allocator kept from earlier calls: fresh process
                from .memory import peak_memory_in_fresh_process
                from .speed import _Call

                peak = peak_memory_in_fresh_process(_Call(method.network, False, device), moving, fixed, device=device)["peak_mb"]
            ddf = ddf.float().cpu()
            row = {"pair": pair.get("pair", str(len(rows))), "time_s": statistics.median(times), "times_s": times,
                   "peak_mb": peak, "iterations": None}
            iters = getattr(method.network, "last_iterations", None) if learned else None
            if iters is not None:
                row["iterations"] = [int(v) for v in iters[0].tolist()]
            moving, fixed = moving.cpu(), fixed.cpu()
            with torch.no_grad():
                warped = fields.warp(moving, ddf)
                wl = fields.warp(pair["moving_label"].float(), ddf, mode="nearest") if "moving_label" in pair else None
            row.update(pair_registration_metrics(ddf, warped, fixed, wl, pair.get("fixed_label"), labels, spacing, surface))
            rows.append(row)
            log(f"{method.name} {row['pair']}: {row['time_s']:.3f} s, Dice {row.get('dice_mean', float('nan')):.4f}, "
                f"folding {row['folding_pct']:.4f} %, iterations {row['iterations']}")
        results[method.name] = rows
    return results
