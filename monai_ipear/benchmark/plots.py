"""PNG plots of a benchmark run (matplotlib, optional extra ``bench``)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from monai.utils import optional_import

from .methods import display_name
from .report import summarize

plt, has_matplotlib = optional_import("matplotlib.pyplot")

__all__ = ["has_matplotlib", "plot_dice_boxes", "plot_iteration_histograms", "plot_time_vs_dice", "write_plots"]


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    return plt.figure


def plot_dice_boxes(results: Mapping[str, Sequence[dict]], path: str) -> str:
    """Box plot of the per-pair mean Dice (%) of each method."""
    fig = _figure()(figsize=(1.6 + 1.3 * len(results), 4))
    ax = fig.add_subplot(111)
    data = [[100 * r["dice_mean"] for r in rows if "dice_mean" in r] for rows in results.values()]
    ax.boxplot(data)
    ax.set_xticks(range(1, len(results) + 1), [display_name(n) for n in results], rotation=30, ha="right")
    ax.set_ylabel("Dice (%), mean over labels")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_iteration_histograms(results: Mapping[str, Sequence[dict]], path: str, method: str = "ipear") -> str:
    """Histogram of the updates per level (one panel per level, coarsest first), like iPEAR's Figure H.1."""
    rows = [r["iterations"] for r in results.get(method, []) if r.get("iterations")]
    if not rows:
        raise ValueError(f"no iteration counts for {method!r}")
    levels = len(rows[0])
    fig = _figure()(figsize=(3 * levels, 3))
    for i, lvl in enumerate(range(levels, 0, -1)):
        ax = fig.add_subplot(1, levels, i + 1)
        counts = [r[lvl - 1] for r in rows]
        ax.hist(counts, bins=range(1, max(counts) + 2), align="left", rwidth=0.8)
        ax.set_title(f"level {lvl}")
        ax.set_xlabel("updates")
        if i == 0:
            ax.set_ylabel("pairs")
    fig.suptitle(f"{display_name(method)}: updates per level")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_time_vs_dice(results: Mapping[str, Sequence[dict]], path: str) -> str:
    """Mean time per pair (s, log scale) against mean Dice (%), one point per method."""
    fig = _figure()(figsize=(6, 4))
    ax = fig.add_subplot(111)
    for name, rows in results.items():
        s = summarize(rows)
        t = sum(s["time_s"]) / len(s["time_s"])
        d = [v for v in s["dice_mean"] if v == v]
        if d:
            ax.scatter([t], [100 * sum(d) / len(d)], label=display_name(name))
    ax.set_xscale("log")
    ax.set_xlabel("time per pair (s)")
    ax.set_ylabel("Dice (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_plots(results: Mapping[str, Sequence[dict]], folder: str, prefix: str = "") -> dict[str, str]:
    """All plots into ``folder``; returns ``{title: path}`` (the iteration histogram only when iPEAR ran)."""
    if not has_matplotlib:
        raise ImportError("plots need matplotlib: pip install 'monai-ipear[bench]'")
    os.makedirs(folder, exist_ok=True)
    out = {
        "Dice per method": plot_dice_boxes(results, os.path.join(folder, f"{prefix}dice_boxplot.png")),
        "Time against Dice": plot_time_vs_dice(results, os.path.join(folder, f"{prefix}time_vs_dice.png")),
    }
    if any(r.get("iterations") for r in results.get("ipear", [])):
        out["iPEAR updates per level"] = plot_iteration_histograms(results, os.path.join(folder, f"{prefix}ipear_iterations.png"))
    return out
