"""Benchmark command: (optionally) preprocess and train, then evaluate methods on test pairs and time them.

Whole recipe on a folder of raw scans (see docs/benchmarks.md)::

    python -m monai_ipear.benchmark \\
        --preprocess-images raw/images/*.nii.gz --preprocess-labels raw/labels/*.nii.gz --train-subjects 4 \\
        --prep-dir runs/prep --train-minutes 10 --models-dir runs/models \\
        --methods ipear rpnet iirpnet ipear-fixed3 voxelmorph elastix-affine ants-syn \\
        --speed-sizes 160x192x160 80x96x112 --out docs/benchmarks.md

On prepared data, without training: ``--datalist prep/dataset.json --weights ipear=ipear.pt rpnet=rpnet.pt``.
Speed only, on one pair of images (no datalist, no accuracy table)::

    python -m monai_ipear.benchmark --methods --speed-images moving.nii.gz fixed.nii.gz --speed-sizes 160x192x160 \
        --speed-methods ipear rpnet ipear-fixed3 --speed-encoders ipear rpnet --speed-train ipear rpnet \
        --fixed-at-tci --threads 2 --out speed.md

Other tools as speed rows in the same rounds (from a Python that has antspyx, or unigradicon and icon_registration;
see :mod:`monai_ipear.benchmark.external`): ``--speed-methods ipear rpnet ants-syn unigradicon unigradicon-io1``.

Pairs are all ordered pairs of the ``--split`` subjects of the datalist (``validation`` by default).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import sys

import numpy as np
import torch

from ..data.datalist import load_registration_pairs
from ..data.transforms import registration_pair_transforms
from .harness import run_benchmark
from .methods import LEARNED_METHODS, METHOD_NAMES, build_method, make_network
from .report import format_report, machine_description


def _size(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.lower().split("x"))


def _load_pairs(items: list[dict]) -> tuple[list[dict], list[float]]:
    keys = ["moving_image", "fixed_image", "moving_label", "fixed_label"]
    load = registration_pair_transforms(keys[:2], keys[2:])
    pairs, spacing = [], None
    for item in items:
        d = load({k: item[k] for k in keys if k in item})
        if spacing is None and hasattr(d["fixed_image"], "affine"):
            a = np.asarray(d["fixed_image"].affine)
            n = d["fixed_image"].ndim - 1
            spacing = [float(s) for s in np.sqrt((a[:n, :n] ** 2).sum(0))]
        pairs.append({k: torch.as_tensor(d[k]).float()[None] for k in keys if k in d} | {"pair": item.get("pair", "")})
    return pairs, spacing


def _label_names(path: str | None) -> dict[int, str] | None:
    if not path:
        return None
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {int(r["Index"]): r.get("Name", "") for r in rows}


def benchmark_main(argv: list[str] | None = None) -> dict:
    from ..runtime import program_arguments

    argv = program_arguments(argv)  # as a program: the allocator setting of monai_ipear.runtime
    p = argparse.ArgumentParser(prog="python -m monai_ipear.benchmark", description=__doc__.splitlines()[0])
    p.add_argument("--datalist", help="dataset.json (Learn2Reg style); default <prep-dir>/dataset.json")
    p.add_argument("--split", default="validation", help="datalist split of the test subjects")
    p.add_argument("--train-split", default="training")
    p.add_argument("--preprocess-images", nargs="+", help="raw scans: preprocess them first (python -m monai_ipear.preprocessing)")
    p.add_argument("--preprocess-labels", nargs="+")
    p.add_argument("--train-subjects", type=int, default=4)
    p.add_argument("--prep-dir", default="runs/prep")
    p.add_argument("--methods", nargs="*", default=list(METHOD_NAMES[:8]), choices=METHOD_NAMES,
                   help="methods of the accuracy table (none: speed study only)")
    p.add_argument("--weights", nargs="*", default=[], help="arch=path for ipear, rpnet, voxelmorph (state_dict files), unigradicon (its Step_2_final.trch)")
    p.add_argument("--train-minutes", type=float, default=None, help="train each learned architecture this long first")
    p.add_argument("--train-steps", type=int, default=None, help="or stop training after this many steps")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--models-dir", default="runs/models")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--no-surface", action="store_true", help="skip HD95 / ASSD")
    p.add_argument("--elastix-iterations", type=int, default=256)
    p.add_argument("--speed-sizes", nargs="*", default=[], type=_size, help="e.g. 160x192x160 80x96x112")
    p.add_argument("--speed-methods", nargs="+", default=["ipear", "rpnet", "iirpnet", "ipear-fixed3"])
    p.add_argument("--speed-images", nargs=2, metavar=("MOVING", "FIXED"),
                   help="the pair the speed study uses (default: the first test pair)")
    p.add_argument("--speed-encoders", nargs="*", default=[], choices=["ipear", "rpnet"],
                   help="also time these methods' encoders on the stacked pair")
    p.add_argument("--speed-train", nargs="*", default=[], choices=["ipear", "rpnet"],
                   help="also time one training step (forward + backward of the recipe's loss)")
    p.add_argument("--speed-train-sizes", nargs="*", default=None, type=_size,
                   help="sizes (among --speed-sizes) at which training steps are timed (default: all)")
    p.add_argument("--speed-train-warmup", type=int, default=2,
                   help="untimed training steps per method before the timed ones")
    p.add_argument("--fixed-at-tci", action="store_true",
                   help="also time iPEAR with fixed updates per level equal to TCI's counts on the pair")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements (one process each)")
    p.add_argument("--flops", action="store_true",
                   help="also count each speed row's arithmetic (GFLOP of convolutions and products, one more call)")
    p.add_argument("--reference-paths", action="store_true",
                   help="run the networks on their reference implementations (gather attention, MONAI Warp)")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1])
    p.add_argument("--autocast", action="store_true", help="also time under torch.autocast")
    p.add_argument("--device", default="cpu")
    p.add_argument("--label-names", help="CSV with Index and Name columns")
    p.add_argument("--note", action="append", default=[], help="extra line for the report's notes")
    p.add_argument("--out", required=True, help="Markdown report path")
    p.add_argument("--plots-dir", default=None, help="default: <out without .md>/ next to the report")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    command = "python -m monai_ipear.benchmark " + " ".join(shlex.quote(v) for v in argv)
    notes = list(a.note)
    if a.preprocess_images:
        from ..preprocessing.__main__ import preprocess_main as preprocess

        preprocess(["--images", *a.preprocess_images, "--labels", *a.preprocess_labels, "--train", str(a.train_subjects),
                    "--out", a.prep_dir])
        notes.append("preprocessing: brain mask = label > 0, affine pre-alignment of every subject to the first "
                     "(elastix, Mattes MI), crop to the template brain box (+4 voxels, multiple of 16), "
                     "intensities scaled to [0, 1] between the 0.5 and 99.5 percentiles")
    datalist = a.datalist or os.path.join(a.prep_dir, "dataset.json")
    weights: dict = dict(w.split("=", 1) for w in a.weights)
    archs = sorted({LEARNED_METHODS[m] for m in a.methods + a.speed_methods if m in LEARNED_METHODS})
    training = []
    if a.train_minutes is not None or a.train_steps is not None:
        from .train import train_with_budget

        train_pairs = load_registration_pairs(datalist, split=a.train_split)
        os.makedirs(a.models_dir, exist_ok=True)
        for arch in archs:
            net = make_network(arch)
            print(f"training {arch} on {len(train_pairs)} pairs", flush=True)
            info = train_with_budget(net, train_pairs, a.train_minutes,
                                     lr=a.lr, max_steps=a.train_steps, device=a.device)
            info["method"] = arch
            path = os.path.join(a.models_dir, f"{arch}.pt")
            torch.save(net.state_dict(), path)
            weights[arch] = net
            training.append(info)
        notes.append(f"training: {len(train_pairs)} ordered pairs of the '{a.train_split}' split, LNCC(9) + 1.0 x "
                     f"diffusion, Adam lr {a.lr}, batch 1, the same wall-time budget for every network")
    if a.methods or not a.speed_images:
        test_items = load_registration_pairs(datalist, split=a.split)
        pairs, spacing = _load_pairs(test_items)
    else:
        pairs, spacing = [], None
    methods = [build_method(m, weights, elastix_iterations=a.elastix_iterations) for m in a.methods]
    for m in methods:
        if m.note:
            notes.append(f"{m.display}: {m.note}")
    results = run_benchmark(methods, pairs, spacing=spacing, repeats=a.repeats, warmup=a.warmup,
                            surface=not a.no_surface, device=a.device)
    params = {m.name: m.parameters for m in methods}
    speed = None
    if a.speed_sizes:
        from .speed import speed_study

        names = list(dict.fromkeys(a.speed_methods + a.speed_encoders + a.speed_train))
        nets = {}
        for m in names:
            method = build_method(m, weights)
            if method.network is None:
                raise SystemExit(f"--speed-methods {m}: no speed row ({method.note or 'not a timed tool'})")
            nets[m] = method.network
            if method.note and m not in a.methods:
                notes.append(f"{method.display}: {method.note}")
        if a.reference_paths:
            from ..networks.nets import use_reference_paths

            for net in nets.values():
                use_reference_paths(net)
            notes.append("networks on their reference paths (gather neighborhood attention, MONAI Warp)")
        if a.speed_images:
            (sp,), _ = _load_pairs([{"moving_image": a.speed_images[0], "fixed_image": a.speed_images[1]}])
            sp_moving, sp_fixed = sp["moving_image"], sp["fixed_image"]
            pair_name = f"{os.path.basename(a.speed_images[0])} to {os.path.basename(a.speed_images[1])}"
        else:
            sp_moving, sp_fixed, pair_name = pairs[0]["moving_image"], pairs[0]["fixed_image"], pairs[0]["pair"]
        speed = speed_study(nets, sp_moving, sp_fixed, a.speed_sizes, a.repeats, a.warmup,
                            a.batch_sizes, (False, True) if a.autocast else (False,), a.device,
                            encoders=a.speed_encoders, train_steps=a.speed_train, fixed_at_tci=a.fixed_at_tci,
                            memory=not a.no_memory, train_sizes=a.speed_train_sizes,
                            train_warmup=a.speed_train_warmup, flops=a.flops)
        if a.flops:
            notes.append("speed: GFLOP counted by torch.utils.flop_counter in one more call per row (convolutions, "
                         "matrix products and attention; element-wise work, reductions, normalisation and sampling "
                         "not counted)")
        notes.append(f"speed: pair '{pair_name}' resized (trilinear) to each size; {a.warmup} warm-up round(s), then "
                     f"{a.repeats} interleaved rounds (each method once per round), median; training steps after "
                     f"the inference rounds, with {a.speed_train_warmup} untimed step(s) each first, "
                     "then interleaved among themselves; 'iPEAR / this' divides like by like (an encoder by iPEAR's "
                     "encoder, a training step by iPEAR's training step); peak memory: one fresh "
                     "process per row (CPU: peak resident set size of that process during the call, VmHWM reset "
                     "just before it, which includes Python, torch and the weights; rise = over its size just "
                     "before the call; tensor peak = the most the call's own tensors held at once, from PyTorch's "
                     "profiler over a second call; CUDA: torch.cuda.max_memory_allocated, and its rise as tensor "
                     "peak)")
    plots_dir = a.plots_dir or os.path.splitext(a.out)[0]
    plots = {}
    try:
        from .plots import write_plots

        plots = {k: os.path.relpath(v, os.path.dirname(os.path.abspath(a.out)) or ".")
                 for k, v in write_plots(results, plots_dir).items()}
    except ImportError as e:
        notes.append(f"plots skipped: {e}")
    text = format_report(results, params, command, notes, speed, training, plots, _label_names(a.label_names),
                         machine_description())
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)
    with open(os.path.splitext(a.out)[0] + "_results.json", "w") as f:
        json.dump({"command": command, "results": results, "speed": speed,
                   "training": [{k: v for k, v in t.items() if k != "losses"} for t in training]}, f, indent=1)
    print(f"report written to {a.out}")
    return {"results": results, "speed": speed, "training": training, "report": text}


if __name__ == "__main__":
    benchmark_main()
