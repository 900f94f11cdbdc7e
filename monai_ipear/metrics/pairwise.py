"""Per-pair registration metrics: Dice, HD95 and ASSD (MONAI, spacing-aware), folding and MSE."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDistanceMetric

from .jacobian import folding_percentage

__all__ = ["label_overlap_metrics", "pair_registration_metrics"]


def label_overlap_metrics(
    warped_label: torch.Tensor,
    fixed_label: torch.Tensor,
    labels: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    surface: bool = True,
) -> dict[int, dict[str, float]]:
    """Dice, HD95 and ASSD per label for one pair.

    Args:
        warped_label, fixed_label: ``(1, *spatial)`` integer label maps (float dtype allowed).
        labels: labels to score (default: every nonzero label present in both maps).
        spacing: voxel size in mm per axis for HD95 / ASSD (default 1 mm).
        surface: also compute HD95 and ASSD (slower than Dice).

    Returns:
        ``{label: {"dice": ..., "hd95": ..., "assd": ...}}``; HD95/ASSD in mm (NaN where undefined).
    """
    if warped_label.shape != fixed_label.shape or warped_label.shape[0] != 1:
        raise ValueError(
            f"label maps must both be (1, *spatial) of one shape, got {tuple(warped_label.shape)} and "
            f"{tuple(fixed_label.shape)}."
        )
    w, f = warped_label[0], fixed_label[0]
    w, f = w.round().long(), f.round().long()
    if labels is None:
        common = set(torch.unique(w).tolist()) & set(torch.unique(f).tolist())
        labels = sorted(int(v) for v in common if v != 0)
    labels = [int(v) for v in labels]
    if not labels:
        return {}
    # one channel per scored label, batch of 1: (1, n_labels, *spatial)
    pred = torch.stack([(w == v) for v in labels])[None].float()
    gt = torch.stack([(f == v) for v in labels])[None].float()
    dice = DiceMetric(include_background=True, reduction="none", ignore_empty=True)(pred, gt)[0]
    out = {v: {"dice": float(dice[i])} for i, v in enumerate(labels)}
    if surface:
        sp = list(spacing) if spacing is not None else None
        hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(pred, gt, spacing=sp)[0]
        asd = SurfaceDistanceMetric(include_background=True, symmetric=True, reduction="none")(pred, gt, spacing=sp)[0]
        for i, v in enumerate(labels):
            out[v]["hd95"] = float(hd[i])
            out[v]["assd"] = float(asd[i])
    return out


def _nanmean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v) and not math.isinf(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def pair_registration_metrics(
    ddf: torch.Tensor,
    warped: torch.Tensor | None = None,
    fixed: torch.Tensor | None = None,
    warped_label: torch.Tensor | None = None,
    fixed_label: torch.Tensor | None = None,
    labels: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    surface: bool = True,
) -> dict[str, float]:
    """All scalar metrics of one pair as a flat dict (the columns of the evaluation CSV).

    ``ddf`` ``(1, spatial_dims, *spatial)`` voxels; images ``(1, C, *spatial)``; labels ``(1, 1, *spatial)``.
    Keys: ``folding_pct`` (% voxels with det J <= 0), ``mse`` (mean squared intensity error, when images are
    given), ``dice_mean``, ``hd95_mean``, ``assd_mean`` (means over scored labels) and ``dice_<label>``,
    ``hd95_<label>``, ``assd_<label>`` per label (when labels are given).
    """
    out: dict[str, float] = {"folding_pct": float(folding_percentage(ddf)[0])}
    if warped is not None and fixed is not None:
        out["mse"] = float(torch.mean((warped.float() - fixed.float()) ** 2))
    if warped_label is not None and fixed_label is not None:
        per_label = label_overlap_metrics(warped_label[0], fixed_label[0], labels, spacing, surface)
        keys = ("dice", "hd95", "assd") if surface else ("dice",)
        for k in keys:
            out[f"{k}_mean"] = _nanmean([m[k] for m in per_label.values()])
        for v, m in per_label.items():
            for k in keys:
                out[f"{k}_{v}"] = m[k]
    return out
