"""Study: the default ``register`` (packaged model, end to end) against classical registration on raw scans.

    python -m monai_ipear.studies.pretrained_comparison --data-dir ../shared/data/ixi_dlmuse_2mm --last 6 \\
        --methods register elastix-affine elastix-bspline ants-syn [--ants-python venv-ants/bin/python] \\
        --out docs/pretrained_comparison.md

Subjects: ``<data-dir>/images/*`` and ``<data-dir>/labels/*`` sorted by name, the last ``--last`` of them (the
held-out validation subjects of the packaged model), or explicit ``--images``/``--labels``. Brain masks are
``label > 0`` (or ``--masks``). Pairs: all ordered pairs (``--max-pairs`` keeps the first ones).

Methods, each from the RAW files (any storage order; full head + mask):

- ``register``: :class:`~monai_ipear.pipeline.RegistrationPipeline` with the packaged model (or ``--model``),
  exactly what ``python -m monai_ipear register --fixed-mask --moving-mask`` runs, pre-alignment included;
  time = the whole call (reading arrays, pre-alignment, network, composition, warping image and labels).
- ``register-autocast``: the same with ``register --autocast`` (the network under bfloat16 autocast on CPU); the
  report adds its agreement with ``register``: the largest per-pair Dice difference and the pairs with the same
  updates per level.
- ``elastix-affine`` / ``elastix-bspline``: elastix default maps (Mattes MI; B-spline after the affine stage),
  ``--elastix-iterations`` x 3 resolutions, on the masked images reoriented to RAS (as the training
  preprocessing); time = registration + resampling the labels.
- ``ants-syn``: antspyx ``SyN`` defaults on the masked images, in this Python when ``ants`` imports, else in
  ``--ants-python`` (a separate virtual environment: antspyx pins numpy < 2.4); skipped with a note otherwise.

Scores on the fixed subject's grid: Dice per label and its mean over the labels present in both maps, HD95
(mm, MONAI), % voxels of the fixed brain mask with det J <= 0 of each method's field, wall time per pair on this
machine. Times are from one run in one process after a warm-up (ITK's modules and the model are loaded before
the clock starts), so their ratios are comparable; ratios are to ``register``.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from monai.transforms import Orientation

from ..controllers import FixedIterations, controller_from_spec
from ..metrics import folding_percentage, label_overlap_metrics
from ..pipeline import RegistrationPipeline, iteration_control, save_nifti

__all__ = ["run_comparison", "format_comparison", "comparison_main", "METHODS", "CHOICES"]

METHODS = ("register", "elastix-affine", "elastix-bspline", "ants-syn")  # the default rows
CHOICES = METHODS + ("register-autocast",)
# the register row is named by _register_display (model file and iteration control)
DISPLAY = {"elastix-affine": "elastix affine", "elastix-bspline": "elastix affine + B-spline", "ants-syn": "ANTs SyN"}
_RAS = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))


def _spacing(x) -> list[float]:
    a = np.asarray(x.affine, dtype=np.float64)
    return [float(s) for s in np.sqrt((a[:3, :3] ** 2).sum(0))]


def _scores(warped_label, fixed_label, spacing, fold_pct, seconds) -> dict:
    per = label_overlap_metrics(torch.as_tensor(warped_label).float().reshape(1, *fixed_label.shape[1:]),
                                torch.as_tensor(fixed_label).float(), spacing=spacing, surface=True)
    dice = [v["dice"] for v in per.values()]
    hd = [v["hd95"] for v in per.values() if np.isfinite(v["hd95"])]
    return {"dice": float(np.mean(dice)) if dice else float("nan"), "hd95": float(np.mean(hd)) if hd else float("nan"),
            "folding_pct": float(fold_pct), "time_s": float(seconds), "labels": len(per)}


def _elastix(transform: str, iterations: int, subj_f: dict, subj_m: dict) -> dict:
    from ..preprocessing.elastix import elastix_ddf, elastix_register, elastix_resample

    f_img, m_img = _RAS(subj_f["image"] * (subj_f["mask"] > 0)), _RAS(subj_m["image"] * (subj_m["mask"] > 0))
    f_lab, m_lab, f_mask = _RAS(subj_f["label"]), _RAS(subj_m["label"]), _RAS(subj_f["mask"])
    sp_f, sp_m = _spacing(f_img), _spacing(m_img)
    if not np.allclose(sp_f, sp_m, atol=1e-3):
        raise ValueError(f"elastix baselines need one voxel size for both subjects, got {sp_f} and {sp_m}.")
    start = time.perf_counter()
    result = elastix_register(m_img[0], f_img[0], sp_f, transform, iterations)
    warped = elastix_resample(m_lab[0], result, "nearest")
    elapsed = time.perf_counter() - start
    ddf = elastix_ddf(result, m_img[0])[None]
    fold = float(folding_percentage(ddf, (f_mask > 0).as_tensor()[None])[0])
    return _scores(np.rint(warped)[None], f_lab, sp_f, fold, elapsed)


def _ants(subj_f: dict, subj_m: dict, ants_python: str | None, workdir: str) -> dict:
    files = {}
    for name, subj, key in (("fixed", subj_f, "image"), ("moving", subj_m, "image"), ("moving_label", subj_m, "label"),
                            ("fixed_mask", subj_f, "mask")):
        arr = subj[key] * (subj["mask"] > 0) if key == "image" else subj[key]
        files[name] = os.path.join(workdir, f"{name}.nii.gz")
        save_nifti(arr, subj[key].affine, files[name])
    out_dir = os.path.join(workdir, "ants")
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ants_worker.py")
    args = [files["fixed"], files["moving"], files["moving_label"], files["fixed_mask"], out_dir]
    if ants_python:
        res = subprocess.run([ants_python, worker, *args], check=True, capture_output=True, text=True)
        info = json.loads(res.stdout.strip().splitlines()[-1])
    else:
        from ._ants_worker import run_syn

        info = run_syn(*args)
    warped = RegistrationPipeline.load(os.path.join(out_dir, "warped_label.nii.gz"))
    return _scores(warped.round(), subj_f["label"], _spacing(subj_f["label"]), info["folding_pct"], info["time_s"])


def _ants_available(ants_python: str | None) -> tuple[bool, str]:
    try:
        import ants  # noqa: F401

        return True, "antspyx in this Python"
    except ImportError:
        pass
    if ants_python:
        ok = subprocess.run([ants_python, "-c", "import ants"], capture_output=True).returncode == 0
        return ok, f"antspyx in {ants_python}" if ok else f"skipped: 'import ants' fails in {ants_python}"
    return False, "skipped: antspyx not importable (pin numpy<2.4; use --ants-python with a separate venv)"


def _score_method(method: str, mov: dict, fix: dict, pipeline, elastix_iterations: int, ants_python) -> dict:
    """One method on one pair (``mov`` onto ``fix``, loaded subjects): its scores and time."""
    if method in ("register", "register-autocast"):  # one pipeline, the same settings, either precision
        pipeline.autocast = method == "register-autocast"
        start = time.perf_counter()
        out = pipeline(fix["image"], mov["image"], fix["mask"], mov["mask"], mov["label"])
        elapsed = time.perf_counter() - start
        r = _scores(out["warped_label"], fix["label"], _spacing(fix["image"]), out["folding_pct"], elapsed)
        r["iterations"] = out["iterations"]
        return r
    if method.startswith("elastix"):
        return _elastix("affine" if method == "elastix-affine" else "bspline", elastix_iterations, fix, mov)
    with tempfile.TemporaryDirectory() as tmp:
        return _ants(fix, mov, ants_python, tmp)


def run_comparison(subjects: list[dict], methods=METHODS, model: str | None = None, pipeline: RegistrationPipeline | None = None,
                   elastix_iterations: int = 256, ants_python: str | None = None, max_pairs: int | None = None,
                   log=print, iterations: str | int | None = None) -> dict:
    """``subjects``: dicts of ``image``, ``label`` (and optional ``mask``) paths; ``iterations``: the ``register``
    network's iteration control (``register --iterations``, set on ``pipeline``'s network; default: its own). Returns
    ``{"rows": {method: [per-pair dict]}, "notes": [...], "pairs": [...]}``."""
    from ..preprocessing.elastix import has_elastix

    notes = []
    methods = list(methods)
    if any(m.startswith("elastix") for m in methods) and not has_elastix():
        notes.append("elastix baselines skipped: itk-elastix not installed")
        methods = [m for m in methods if not m.startswith("elastix")]
    if "ants-syn" in methods:
        ok, text = _ants_available(ants_python)
        notes.append(f"ANTs SyN: {text}")
        if not ok:
            methods.remove("ants-syn")
    if any(m.startswith("register") for m in methods) and pipeline is None:
        pipeline = RegistrationPipeline(model=model, device="cpu")
    with contextlib.ExitStack() as restore:  # ``iterations`` and the autocast switch hold for this comparison only
        if pipeline is not None:
            restore.callback(setattr, pipeline, "autocast", pipeline.autocast)  # each register row sets it
            restore.enter_context(iteration_control(pipeline.network, iterations))  # a bad value fails here, first
        if pipeline is not None and pipeline.metadata.get("placeholder"):
            notes.append("WARNING: the packaged model is the PLACEHOLDER (random weights); `register` figures are meaningless")
        loaded = []
        for s in subjects:
            d = {k: RegistrationPipeline.load(s[k], k) for k in ("image", "label")}
            d["mask"] = RegistrationPipeline.load(s["mask"], "mask") if s.get("mask") else (d["label"] > 0).float()
            d["name"] = os.path.basename(str(s["image"])).split(".")[0]
            loaded.append(d)
        pairs = [(i, j) for j in range(len(loaded)) for i in range(len(loaded)) if i != j]  # (moving, fixed)
        pairs = pairs[:max_pairs] if max_pairs else pairs
        rows: dict[str, list] = {m: [] for m in methods}
        if pairs and has_elastix():  # warm-up: ITK loads its modules lazily (seconds) on first use
            from ..preprocessing.elastix import elastix_register

            f = loaded[pairs[0][1]]
            elastix_register(_RAS(f["image"])[0], _RAS(f["image"])[0], _spacing(f["image"]), "affine", 1, 1)
        for i, j in pairs:
            mov, fix = loaded[i], loaded[j]
            name = f"{mov['name']}_to_{fix['name']}"
            for m in methods:
                r = _score_method(m, mov, fix, pipeline, elastix_iterations, ants_python)
                r["pair"] = name
                rows[m].append(r)
                log(f"{name} {m}: Dice {r['dice']:.4f}, HD95 {r['hd95']:.2f} mm, folding {r['folding_pct']:.4f} %, "
                    f"{r['time_s']:.2f} s")
    return {"rows": rows, "notes": notes, "pairs": [f"{loaded[i]['name']}_to_{loaded[j]['name']}" for i, j in pairs],
            "register_iterations": None if iterations is None else str(iterations),
            "register_model": None if pipeline is None or model is None else os.path.basename(str(model))}


def _ms(values, fmt):
    v = [x for x in values if x is not None and np.isfinite(x)]
    if not v:
        return "n/a"
    return fmt.format(statistics.mean(v)) + (f" ({fmt.format(statistics.stdev(v))})" if len(v) > 1 else "")


def _register_display(iterations: str | None, model: str | None = None, autocast: bool = False) -> str:
    """The ``register`` row's name under ``register --iterations`` (``None``: the network's own control, TCI),
    ``--model`` (``None``: the packaged model) and ``--autocast``."""
    controller = None if iterations is None else controller_from_spec(iterations)
    name = "packaged iPEAR" if model is None else f"iPEAR `{model}`"
    command, control = ["register"], ["TCI"]
    if isinstance(controller, FixedIterations):
        k = controller.k_max
        command, control = [*command, f"--iterations {k}"], [f"{k} update{'s' if k > 1 else ''} per level"]
    if autocast:
        command, control = [*command, "--autocast"], [*control, "bfloat16 autocast"]
    return f"`{' '.join(command)}` ({name}, {', '.join(control)}, affine pre-alignment)"


def _autocast_agreement(rows: dict) -> str | None:
    """A note comparing ``register-autocast`` with ``register`` pair by pair (same pair order)."""
    full, half = rows.get("register"), rows.get("register-autocast")
    if not full or not half:
        return None
    diffs = [abs(a["dice"] - b["dice"]) for a, b in zip(full, half)]
    same = sum(a.get("iterations") == b.get("iterations") for a, b in zip(full, half))
    return (f"`--autocast` against float32, pair by pair: largest Dice difference {max(diffs):.4f} (mean "
            f"{statistics.mean(diffs):.4f}); the same updates per level on {same} of {len(diffs)} pairs")


def format_comparison(result: dict, command: str = "", machine: str = "") -> str:
    rows = result["rows"]
    display = {**DISPLAY, "register": _register_display(result.get("register_iterations"), result.get("register_model")),
               "register-autocast": _register_display(result.get("register_iterations"), result.get("register_model"), True)}
    ref = rows.get("register")
    ref_t = statistics.mean(r["time_s"] for r in ref) if ref else None
    ref_d = statistics.mean(r["dice"] for r in ref) if ref else None
    lines = [f"Pairs: {len(result['pairs'])} ordered pairs; mean (sd) over pairs; one run, one process"
             + (f"; {machine}" if machine else "") + ".", "",
             "| method | Dice | HD95 (mm) | folding (% of fixed brain) | time per pair (s) | time / register | Dice - register |",
             "|---|---|---|---|---|---|---|"]
    for m, rs in rows.items():
        if not rs:
            continue
        t = statistics.mean(r["time_s"] for r in rs)
        d = statistics.mean(r["dice"] for r in rs)
        lines.append(f"| {display.get(m, m)} | {_ms([r['dice'] for r in rs], '{:.4f}')} | {_ms([r['hd95'] for r in rs], '{:.2f}')} | "
                     f"{_ms([r['folding_pct'] for r in rs], '{:.4f}')} | {_ms([r['time_s'] for r in rs], '{:.2f}')} | "
                     f"{t / ref_t:.2f} | {d - ref_d:+.4f} |" if ref else
                     f"| {display.get(m, m)} | {_ms([r['dice'] for r in rs], '{:.4f}')} | {_ms([r['hd95'] for r in rs], '{:.2f}')} | "
                     f"{_ms([r['folding_pct'] for r in rs], '{:.4f}')} | {_ms([r['time_s'] for r in rs], '{:.2f}')} | | |")
    if ref and ref[0].get("iterations"):
        its = [statistics.mean(c) for c in zip(*[r["iterations"] for r in ref])]
        lines += ["", "`register` updates per level (level 1 .. 4, mean): " + " / ".join(f"{v:.2f}" for v in its)]
    notes = list(result["notes"]) + [n for n in [_autocast_agreement(rows)] if n]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    if command:
        lines += ["", f"Command: `{command}`"]
    return "\n".join(lines) + "\n"


def comparison_main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m monai_ipear.studies.pretrained_comparison",
                                description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", help="folder with images/ and labels/ (sorted by name)")
    p.add_argument("--last", type=int, default=6, help="use the last N subjects of the sorted lists")
    p.add_argument("--images", nargs="*")
    p.add_argument("--labels", nargs="*")
    p.add_argument("--masks", nargs="*", help="brain masks (default: label > 0)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=CHOICES)
    p.add_argument("--model", default=None, help="pretrained-format file (default: the packaged model)")
    p.add_argument("--elastix-iterations", type=int, default=256)
    p.add_argument("--ants-python", default=None, help="python of a venv with antspyx")
    p.add_argument("--max-pairs", type=int, default=None)
    p.add_argument("--iterations", default=None, help="register's iteration control: 'tci' (default) or k per level")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="Markdown file (also printed)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.images:
        images, labels = list(a.images), list(a.labels or [])
    elif a.data_dir:
        images = sorted(glob.glob(os.path.join(a.data_dir, "images", "*.nii*")))[-a.last:]
        labels = sorted(glob.glob(os.path.join(a.data_dir, "labels", "*.nii*")))[-a.last:]
    else:
        p.error("give --data-dir or --images/--labels")
    if len(images) != len(labels) or len(images) < 2:
        p.error(f"need at least 2 subjects with one label map each (got {len(images)} images, {len(labels)} labels)")
    masks = a.masks or [None] * len(images)
    subjects = [{"image": i, "label": lab, "mask": m} for i, lab, m in zip(images, labels, masks)]
    result = run_comparison(subjects, a.methods, a.model, None, a.elastix_iterations, a.ants_python, a.max_pairs,
                            iterations=a.iterations)
    from ..benchmark.report import machine_description

    mach = machine_description()
    machine = ", ".join(f"{k}: {v}" for k, v in mach.items()) if isinstance(mach, dict) else str(mach)
    command = "python -m monai_ipear.studies.pretrained_comparison " + " ".join(shlex.quote(v) for v in argv)
    text = format_comparison(result, command, machine)
    print(text)
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
            json.dump({"command": command, **result}, f, indent=1, default=float)
    return result


if __name__ == "__main__":
    comparison_main()
