"""Markdown report of a benchmark run: machine, command, accuracy / speed / training tables, plots."""

from __future__ import annotations

import math
import os
import platform
import statistics
from collections.abc import Mapping, Sequence

import monai
import torch

from .methods import display_name

__all__ = ["machine_description", "mean_sd", "summarize", "format_report"]


def machine_description() -> dict[str, str]:
    """CPU model, cores, torch threads, versions, load average (and the GPU, when CUDA is used)."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": f"{model}, {os.cpu_count()} logical cores",
        "threads": f"torch intra-op threads {torch.get_num_threads()}",
        "software": f"Python {platform.python_version()}, torch {torch.__version__}, MONAI {monai.__version__}",
    }
    try:
        info["load"] = "load average at report time: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def mean_sd(values: Sequence[float], fmt: str = "{:.3f}") -> str:
    """``mean (sd)`` over finite values (sample sd; ``mean`` alone for one value; ``n/a`` for none)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return fmt.format(vals[0])
    return f"{fmt.format(statistics.mean(vals))} ({fmt.format(statistics.stdev(vals))})"


def summarize(rows: Sequence[dict]) -> dict[str, object]:
    """Per-method summary: lists of the per-pair values and mean iterations per level."""
    out: dict[str, object] = {"n": len(rows)}
    for key in ("time_s", "peak_mb", "dice_mean", "hd95_mean", "assd_mean", "folding_pct"):
        out[key] = [r.get(key, float("nan")) for r in rows]
    iters = [r["iterations"] for r in rows if r.get("iterations")]
    out["iterations"] = [statistics.mean(col) for col in zip(*iters)] if iters else None
    return out


def _iter_text(iters: Sequence[float] | None) -> str:
    if not iters:
        return "-"
    # finest first in the data; shown coarsest (level 4) first, the decoding order
    return " / ".join(f"{v:.2f}" for v in reversed(list(iters)))


def accuracy_table(results: Mapping[str, Sequence[dict]], params: Mapping[str, int | None]) -> list[str]:
    lines = [
        "| Method | Parameters | Time per pair (s) | Peak memory (MiB) | Dice (%) | HD95 (mm) | ASSD (mm) | Folding (%) "
        "| Updates per level (L4 / L3 / L2 / L1) | Pairs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for name, rows in results.items():
        s = summarize(rows)
        p = params.get(name)
        lines.append(
            f"| {display_name(name)} | {p:,} |" if p else f"| {display_name(name)} | - |"
        )
        lines[-1] += (
            f" {mean_sd(s['time_s'])} | {mean_sd(s['peak_mb'], '{:.0f}')} | "
            f"{mean_sd([100 * v for v in s['dice_mean']], '{:.2f}')} | {mean_sd(s['hd95_mean'], '{:.2f}')} | "
            f"{mean_sd(s['assd_mean'], '{:.2f}')} | {mean_sd(s['folding_pct'], '{:.4f}')} | {_iter_text(s['iterations'])} | "
            f"{s['n']} |"
        )
    return lines


def per_label_table(results: Mapping[str, Sequence[dict]], label_names: Mapping[int, str] | None = None) -> list[str]:
    names = list(results)
    labels = sorted({int(k[5:]) for rows in results.values() for r in rows for k in r if k.startswith("dice_") and k[5:].isdigit()})
    lines = ["| Label | " + " | ".join(display_name(n) for n in names) + " |", "|---|" + "---:|" * len(names)]
    for v in labels:
        cells = []
        for n in names:
            vals = [100 * r[f"dice_{v}"] for r in results[n] if f"dice_{v}" in r and math.isfinite(r[f"dice_{v}"])]
            cells.append(f"{statistics.mean(vals):.1f}" if vals else "n/a")
        name = f"{v} {label_names[v]}" if label_names and v in label_names else str(v)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def speed_table(speed: Sequence[dict]) -> list[str]:
    """Rows of :func:`~monai_ipear.benchmark.speed.speed_study`: size, batch, autocast, method, times, memory, ratios
    (and the arithmetic columns when the study counted it, ``--flops``)."""
    arithmetic = any("gflop" in r for r in speed)
    lines = [
        "| Input size | Batch | Autocast | Method | Time per call (s), median | Rounds (s) | Peak memory of the process "
        "(MiB) | Rise during the call (MiB) | Tensor peak of the call (MiB) | Updates per level (L4 / L3 / L2 / L1) "
        "| Max field difference to fp32 (voxels) "
        "| iPEAR / this |" + (" GFLOP (convolutions, products) | GFLOP/s | iPEAR / this, GFLOP |" if arithmetic else ""),
        "|---|---:|---|---|---:|---|---:|---:|---:|---|---:|---:|" + ("---:|---:|---:|" if arithmetic else ""),
    ]
    for r in speed:
        ratio = r.get("ipear_ratio")
        diff = r.get("max_abs_diff_voxels")
        rounds = " ".join(f"{t:.2f}" for t in r.get("times_s", []))
        line = (
            f"| {'x'.join(map(str, r['size']))} | {r.get('batch', 1)} | {'yes' if r.get('autocast') else 'no'} | "
            f"{display_name(r['method'])} | {r['time_s']:.3f} | {rounds} | {r['peak_mb']:.0f} | "
            f"{r.get('peak_rise_mb', float('nan')):.0f} | {r.get('tensor_peak_mb', float('nan')):.0f} | "
            f"{_iter_text(r.get('iterations'))} | "
            f"{'' if diff is None else f'{diff:.2g}'} | {'' if ratio is None else f'{ratio:.2f}'} |"
        )
        if arithmetic:
            g, g_ratio = r.get("gflop"), r.get("ipear_gflop_ratio")
            rate = "" if g is None else f"{g / r['time_s']:.0f}"
            line += (f" {'' if g is None else f'{g:.1f}'} | {rate} | "
                     f"{'' if g_ratio is None else f'{g_ratio:.3f}'} |")
        lines.append(line)
    return lines


def training_table(training: Sequence[dict]) -> list[str]:
    lines = ["| Method | Budget | Wall time (min) | Optimiser steps | Epochs | Final loss (mean of last 10 steps) |",
             "|---|---:|---:|---:|---:|---:|"]
    for t in training:
        budget = [f"{t['budget_min']:g} min"] if t.get("budget_min") is not None else []
        budget += [f"{t['max_steps']} steps"] if t.get("max_steps") is not None else []
        lines.append(f"| {display_name(t['method'])} | {' or '.join(budget)} | {t['wall_min']:.1f} | {t['steps']} | "
                     f"{t['epochs']} | {t['final_loss']:.4f} |")
    return lines


def format_report(
    results: Mapping[str, Sequence[dict]],
    params: Mapping[str, int | None],
    command: str,
    notes: Sequence[str] = (),
    speed: Sequence[dict] | None = None,
    training: Sequence[dict] | None = None,
    plots: Mapping[str, str] | None = None,
    label_names: Mapping[int, str] | None = None,
    machine: Mapping[str, str] | None = None,
    title: str = "Benchmark",
) -> str:
    """The whole report as Markdown (one section per part that was run)."""
    machine = machine or machine_description()
    out = [f"# {title}", "", "Made by this command (rerun it to reproduce):", "", "```", command, "```", "", "## Machine", ""]
    out += [f"- {v}" for v in machine.values()]
    if notes:
        out += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    if training:
        out += ["", "## Training (same recipe and budget for every learned method)", ""] + training_table(training)
    if results:  # a speed-only run (no --methods) has no accuracy part
        out += ["", "## Accuracy and cost on the test pairs", "",
                "Mean (sample standard deviation) over pairs. Time: median of the timed calls per pair, then mean "
                "over pairs. Updates per level: mean over pairs, coarsest level first.", ""]
        out += accuracy_table(results, params)
    if speed:
        out += ["", "## Speed (one run, same process, so the ratios are comparable)", ""] + speed_table(speed)
    if plots and results:
        out += ["", "## Plots", ""] + [f"![{k}]({v})" for k, v in plots.items()]
    if results:
        out += ["", "## Dice per label (%, mean over pairs)", "", "<details><summary>table</summary>", ""]
        out += per_label_table(results, label_names) + ["", "</details>", ""]
    return "\n".join(out) + ("" if results else "\n")
