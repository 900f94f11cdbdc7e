"""Ignite handler that scores every registered pair and writes a per-pair CSV and a summary JSON."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence

from monai.data.utils import affine_to_spacing

from ..metrics import pair_registration_metrics
from .outputs import fixed_affines, pair_names
from .preflight import as_bool

__all__ = ["RegistrationMetricsWriter", "summarize_rows"]


def summarize_rows(rows: list[dict]) -> dict:
    """``{column: {"mean", "std", "n"}}`` over the numeric columns of ``rows`` (NaN entries ignored;
    ``std`` is the population standard deviation)."""
    keys = [k for k in rows[0] if k != "pair"] if rows else []
    for r in rows[1:]:
        keys += [k for k in r if k != "pair" and k not in keys]
    summary = {}
    for k in keys:
        vals = [float(r[k]) for r in rows if k in r and r[k] is not None and not math.isnan(float(r[k]))]
        if not vals:
            summary[k] = {"mean": float("nan"), "std": float("nan"), "n": 0}
            continue
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
        summary[k] = {"mean": mean, "std": std, "n": len(vals)}
    return summary


def _nan_to_none(obj):
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    return obj


class RegistrationMetricsWriter:
    """Per pair: Dice per label and mean, HD95 and ASSD in mm (MONAI metrics with the fixed image's spacing),
    % voxels with Jacobian determinant <= 0, MSE, time per pair (s) and TCI iterations per level; after the run
    ``<output_dir>/<csv_name>`` (one row per pair) and ``<output_dir>/<summary_name>`` (mean, std, number of
    pairs per column, plus ``"num_pairs"``).

    Attach to an evaluator running :class:`~monai_ipear.engines.RegistrationEvalIteration`.

    Args:
        output_dir: folder for the two files.
        labels: labels to score (default: every nonzero label present in both the warped and fixed maps).
        surface: compute HD95 / ASSD (slower than Dice).
        fixed_key: batch key of the fixed image (spacing from its affine).
    """

    def __init__(
        self,
        output_dir: str = "./eval",
        labels: Sequence[int] | None = None,
        surface: bool = True,
        fixed_key: str = "fixed_image",
        csv_name: str = "metrics.csv",
        summary_name: str = "summary.json",
    ) -> None:
        self.output_dir = output_dir
        self.labels = labels
        self.surface = as_bool(surface, "surface")  # a bundle override arrives as the string 'false'
        self.fixed_key = fixed_key
        self.csv_name, self.summary_name = csv_name, summary_name
        self.rows: list[dict] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def _reset(self, engine=None) -> None:
        self.rows = []

    def __call__(self, engine) -> None:
        out, batch = engine.state.output, engine.state.batch
        ddf = out["ddf"]
        size, sd = ddf.shape[0], ddf.shape[1]
        names = pair_names(batch, size, len(self.rows))
        affines = fixed_affines(batch, self.fixed_key, size)
        for b in range(size):
            spacing = [float(s) for s in affine_to_spacing(affines[b], r=sd)]
            has_labels = "warped_label" in out and "fixed_label" in out
            row: dict = {"pair": names[b]}
            row.update(
                pair_registration_metrics(
                    ddf[b : b + 1].cpu(),
                    warped=out["warped_image"][b : b + 1].cpu(),
                    fixed=out[self.fixed_key][b : b + 1].cpu(),
                    warped_label=out["warped_label"][b : b + 1].cpu() if has_labels else None,
                    fixed_label=out["fixed_label"][b : b + 1].cpu() if has_labels else None,
                    labels=self.labels,
                    spacing=spacing,
                    surface=self.surface,
                )
            )
            row["time_s"] = float(out["time"][b])
            iters = out.get("iterations")
            if iters is not None:
                for lvl, v in enumerate(iters[b].tolist()):
                    row[f"iterations_level_{lvl + 1}"] = int(v)
            self.rows.append(row)

    def write(self, engine=None) -> dict:
        os.makedirs(self.output_dir, exist_ok=True)
        columns: list[str] = []
        for r in self.rows:
            columns += [k for k in r if k not in columns]
        with open(os.path.join(self.output_dir, self.csv_name), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns)
            w.writeheader()
            w.writerows(self.rows)
        summary = {"num_pairs": len(self.rows), "metrics": summarize_rows(self.rows)}
        with open(os.path.join(self.output_dir, self.summary_name), "w") as f:
            json.dump(_nan_to_none(summary), f, indent=2)  # strict JSON: undefined values become null
        return summary
