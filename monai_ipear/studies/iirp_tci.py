"""Study: one set of network weights under every iteration controller (single pass, IterStop, fixed k, TCI).

Reproduces the comparison behind the iPEAR paper's Tables 4/F (IIRP-Net's IterStop vs TCI) on real pairs::

    python -m monai_ipear.studies.iirp_tci \\
        --weights iirp_mindboggle.pt --labels eval_labels.txt --both-directions \\
        --pair subject_b_t1.nii.gz subject_b_aseg.nii.gz subject_a_t1.nii.gz subject_a_aseg.nii.gz \\
        --out docs/studies.md

and asks the same of a trained iPEAR (``--model``: a file of :mod:`monai_ipear.pretrained`, ``packaged`` for the
package's default model) on all ordered pairs of a datalist split whose images are already on one grid::

    python -m monai_ipear.studies.iirp_tci --model packaged --datalist dataset.json --split validation \\
        --fixed 2 3 4 5 6

``--pair`` takes moving image, moving labels, fixed image, fixed labels (repeatable); ``--both-directions``
also registers fixed -> moving. Images are loaded with MONAI's ``LoadImage`` and scaled to [0, 1]. Reports
mean (sd) over pairs of Dice (%), folding (% voxels with det J <= 0), wall time per pair, and mean updates per
level (level 4 = coarsest first), as a Markdown table printed and, with ``--out``, appended to a file.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Sequence

import torch
from monai.transforms import Compose, EnsureChannelFirst, LoadImage, ScaleIntensity

from ..controllers import TCI, FixedIterations, IterationController, IterStop, SinglePass
from ..data.datalist import load_registration_pairs
from ..metrics import pair_registration_metrics
from ..networks.blocks.fields import FieldComposer
from ..networks.nets.pretrained import load_iirp_checkpoint
from ..pretrained import load_pretrained

__all__ = ["study_controllers", "run_iirp_tci_study", "format_study_table"]


def study_controllers(single_pass: str = "RP-Net (single pass)", fixed: Sequence[int] = (2, 3, 4)
                      ) -> dict[str, IterationController]:
    """The controllers compared, by row name: ``single_pass`` names the single-pass row, ``fixed`` the fixed
    update counts."""
    rows: dict[str, IterationController] = {
        single_pass: SinglePass(),
        "IIRP IterStop, paper rule": IterStop(faithful=False),
        "IIRP IterStop, faithful (published code)": IterStop(faithful=True),
    }
    rows.update({f"fixed {k} iterations": FixedIterations(k) for k in fixed})
    rows["TCI (iPEAR defaults)"] = TCI()
    return rows


def _mean_sd(values: Sequence[float], fmt: str = "{:.2f}") -> str:
    if len(values) < 2:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ({fmt.format(statistics.stdev(values))})"


def run_iirp_tci_study(
    net: torch.nn.Module,
    pairs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    labels: Sequence[int] | None,
    controllers: dict[str, IterationController] | None = None,
    log=print,
) -> dict[str, dict[str, list]]:
    """Register every pair under every controller with the same network weights.

    Args:
        net: a pyramid network with a ``controller`` attribute (e.g. from :func:`load_iirp_checkpoint`).
        pairs: ``(moving, moving_label, fixed, fixed_label)``, each ``(1, 1, *spatial)``.
        labels: labels scored by Dice (default: all present in both maps).

    Returns:
        ``{row: {"dice": [...], "folding": [...], "time": [...], "iterations": [(levels,) per pair]}}``,
        Dice in %, folding in %, time in seconds, iterations level 1 first.
    """
    controllers = controllers or study_controllers()
    fields = FieldComposer("zeros")
    results: dict[str, dict[str, list]] = {}
    net.eval()
    for name, controller in controllers.items():
        net.controller = controller
        rows = results.setdefault(name, {"dice": [], "folding": [], "time": [], "iterations": []})
        for i, (mov, mov_lab, fix, fix_lab) in enumerate(pairs):
            with torch.no_grad():
                start = time.perf_counter()
                ddf = net(mov, fix)
                elapsed = time.perf_counter() - start
                warped_lab = fields.warp(mov_lab, ddf, mode="nearest")
            m = pair_registration_metrics(ddf, warped_label=warped_lab, fixed_label=fix_lab, labels=labels, surface=False)
            iters = net.last_iterations[0].tolist()
            rows["dice"].append(100.0 * m["dice_mean"])
            rows["folding"].append(m["folding_pct"])
            rows["time"].append(elapsed)
            rows["iterations"].append(iters)
            log(f"{name} pair {i}: Dice {100 * m['dice_mean']:.2f} folding {m['folding_pct']:.4f}% "
                f"time {elapsed:.1f} s iterations (level 1..{len(iters)}) {iters}")
    return results


def format_study_table(results: dict[str, dict[str, list]]) -> str:
    """Markdown table of :func:`run_iirp_tci_study`'s results (mean (sd) over pairs)."""
    lines = [
        "| controller | Dice % | folding % | time / pair (s) | mean iterations, levels 4/3/2/1 |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        levels = len(r["iterations"][0])
        per_level = [statistics.mean(it[lvl] for it in r["iterations"]) for lvl in reversed(range(levels))]
        lines.append(
            f"| {name} | {_mean_sd(r['dice'])} | {_mean_sd(r['folding'], '{:.4f}')} | {_mean_sd(r['time'], '{:.1f}')} "
            f"| {' / '.join(f'{v:.1f}' for v in per_level)} |"
        )
    return "\n".join(lines)


def _load(path: str, scale: bool) -> torch.Tensor:
    steps = [LoadImage(image_only=True), EnsureChannelFirst()]
    if scale:
        steps.append(ScaleIntensity(minv=0.0, maxv=1.0))
    return torch.as_tensor(Compose(steps)(path)).float()[None]


def iirp_tci_study_cli(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    net_source = parser.add_mutually_exclusive_group(required=True)
    net_source.add_argument("--weights", help="published IIRP-Net checkpoint (.pt)")
    net_source.add_argument("--model", help="a monai_ipear pretrained-model file, or 'packaged' for the default model")
    pair_source = parser.add_mutually_exclusive_group(required=True)
    pair_source.add_argument("--pair", nargs=4, action="append",
                             metavar=("MOVING", "MOVING_LABELS", "FIXED", "FIXED_LABELS"))
    pair_source.add_argument("--datalist", help="datalist JSON: all ordered pairs of --split (labels required)")
    parser.add_argument("--split", default="validation", help="the datalist's subject list (default: validation)")
    parser.add_argument("--fixed", type=int, nargs="+", default=[2, 3, 4], help="fixed update counts (default 2 3 4)")
    parser.add_argument("--labels", help="text file, one label value per line (default: all shared labels)")
    parser.add_argument("--both-directions", action="store_true", help="also register fixed -> moving")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", help="append the Markdown table (with the command and machine) to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    labels = [int(v) for v in open(args.labels).read().split()] if args.labels else None
    if args.datalist:
        listed = load_registration_pairs(args.datalist, split=args.split)
        if "moving_label" not in listed[0]:
            raise SystemExit(f"the '{args.split}' subjects of {args.datalist} have no label maps: Dice needs them.")
        quads = [(p["moving_image"], p["moving_label"], p["fixed_image"], p["fixed_label"]) for p in listed]
    else:
        quads = [tuple(q) for q in args.pair]
    pairs = []
    for mov, mov_lab, fix, fix_lab in quads:
        m, ml, f, fl = _load(mov, True), _load(mov_lab, False), _load(fix, True), _load(fix_lab, False)
        pairs.append((m, ml, f, fl))
        if args.both_directions:
            pairs.append((f, fl, m, ml))
    if args.weights:
        net, single = load_iirp_checkpoint(args.weights), "RP-Net (single pass)"
    else:
        net, _ = load_pretrained(None if args.model == "packaged" else args.model)
        single = "single pass"
    results = run_iirp_tci_study(net, pairs, labels, study_controllers(single, args.fixed))
    table = format_study_table(results)
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    text = f"{table}\n\n{len(pairs)} registrations; mean (sd) over them; {machine}.\n"
    print(text)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(text)
    return text


if __name__ == "__main__":
    iirp_tci_study_cli()
