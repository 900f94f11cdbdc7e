"""LPBA40 study data: the iPEAR paper's LPBA experiment as bundle datalists.

    python -m monai_ipear.studies.lpba40 prepare --src ../shared/data/lpba40_1mm --out /data/lpba40_2mm --pixdim 2

reads the atlas ``S01`` and the training subjects ``S11``-``S40`` (160x192x160, 1 mm, skull-stripped, affinely
co-aligned; the paper's test subjects S02-S10 are not part of the folder) and writes, for each subject,
``SNN_image.nii.gz`` and ``SNN_label.nii.gz`` plus ``dataset.json``:

- ``--pixdim 2`` (the CPU protocol): MONAI ``Spacingd`` to 2 mm, trilinear for images, nearest for labels
  (80x96x80); ``--pixdim 1`` keeps the 1 mm grid (the paper's, for GPU runs);
- label codes 21..182 of the 56 structures renumbered 1..56 in increasing code order (0 = background), so that
  MONAI's one-hot ``MeanDice`` needs 57 classes instead of 183; the mapping is stored as ``"label_codes"``;
- the split (documented in docs/lpba40.md): ``training`` = S11-S35 (25 subjects, all 600 ordered inter-subject
  pairs, the paper's protocol), ``validation`` = S36-S40 (20 ordered inter-subject pairs), and
  ``validation_atlas`` = S01 + S36-S40 with ``validation_atlas_pairs`` (each validation subject moving, the
  atlas S01 fixed: 5 pairs).

Use with ``configs/lpba40/train.json`` (``--dataset_dir`` = ``--out``); see docs/lpba40.md for the commands.

After training, ``evaluate`` scores the trained checkpoints on both validation protocols (subject -> atlas S01
and the ordered inter-subject pairs of S36-S40) under each iteration controller, and ``plot`` draws validation
Dice against training steps from the runs' TensorBoard logs::

    python -m monai_ipear.studies.lpba40 evaluate --dataset_dir /data/lpba40_2mm \
        --ipear runs/lpba_ipear/models/model_final.pt --rpnet runs/lpba_rpnet/models/model_final.pt \
        --voxelmorph runs/lpba_voxelmorph/models/model_final.pt --sacbnet runs/lpba_sacb/models/model_final.pt \
        --out docs/lpba40_results.json
    python -m monai_ipear.studies.lpba40 plot --run iPEAR=runs/lpba_ipear ... --every 100 --out docs/lpba40/val_dice.png
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Spacingd

from ..preprocessing.__main__ import _save

__all__ = ["LPBA40_SPLIT", "ARCHITECTURES", "prepare_lpba40", "variant_network", "load_trained", "lpba40_methods",
           "evaluate_lpba40", "format_lpba40_tables", "read_validation_curve", "lpba40_main"]

LPBA40_SPLIT = {
    "atlas": "S01",
    "training": [f"S{i}" for i in range(11, 36)],
    "validation": [f"S{i}" for i in range(36, 41)],
}


def prepare_lpba40(src: str, out: str, pixdim: float = 2.0) -> dict:
    """Resample, renumber and write the subjects of :data:`LPBA40_SPLIT`; return the datalist written."""
    subjects = [LPBA40_SPLIT["atlas"]] + LPBA40_SPLIT["training"] + LPBA40_SPLIT["validation"]
    missing = [s for s in subjects if not os.path.isfile(os.path.join(src, "images", f"{s}.nii.gz"))]
    if missing:
        raise FileNotFoundError(f"{src} lacks images/{missing[0]}.nii.gz (and {len(missing) - 1} more).")
    keys = ["image", "label"]
    load = [LoadImaged(keys, image_only=True), EnsureChannelFirstd(keys)]
    if float(pixdim) != 1.0:
        load.append(Spacingd(keys, pixdim=float(pixdim), mode=["bilinear", "nearest"]))
    load = Compose(load)
    os.makedirs(out, exist_ok=True)
    codes: np.ndarray | None = None
    for name in subjects:
        d = load({"image": os.path.join(src, "images", f"{name}.nii.gz"),
                  "label": os.path.join(src, "labels", f"{name}.nii.gz")})
        label = d["label"].round().long()
        present = torch.unique(label).numpy()
        if codes is None:
            codes = present[present > 0]
        elif not np.isin(present[present > 0], codes).all():
            raise ValueError(f"{name} has label codes the atlas lacks: {sorted(set(present) - set(codes) - {0})}.")
        lut = torch.zeros(int(codes.max()) + 1, dtype=torch.long)
        lut[torch.as_tensor(codes)] = torch.arange(1, len(codes) + 1)
        relabelled = d["label"].clone()
        relabelled.array = lut[label].to(torch.uint8)
        _save(d["image"].float(), os.path.join(out, f"{name}_image.nii.gz"))
        _save(relabelled, os.path.join(out, f"{name}_label.nii.gz"))
        print(f"{name}: {tuple(d['image'].shape[1:])} at {pixdim} mm, {len(present) - 1} labels", flush=True)

    def entries(names):
        return [{"image": f"{n}_image.nii.gz", "label": f"{n}_label.nii.gz"} for n in names]

    atlas = LPBA40_SPLIT["atlas"]
    datalist = {
        "description": f"LPBA40 at {pixdim} mm; split of monai_ipear.studies.lpba40 (docs/lpba40.md)",
        "label_codes": [int(c) for c in codes],
        "training": entries(LPBA40_SPLIT["training"]),
        "validation": entries(LPBA40_SPLIT["validation"]),
        "validation_atlas": entries([atlas] + LPBA40_SPLIT["validation"]),
        "validation_atlas_pairs": [{"moving": f"{n}_image.nii.gz", "fixed": f"{atlas}_image.nii.gz"}
                                   for n in LPBA40_SPLIT["validation"]],
    }
    with open(os.path.join(out, "dataset.json"), "w") as f:
        json.dump(datalist, f, indent=4)
    return datalist


# the networks ``evaluate`` scores: the recipe's three and, by its variant config, SACB-Net
ARCHITECTURES = ("ipear", "rpnet", "voxelmorph", "sacbnet")


def variant_network(name: str, spatial_dims: int = 3) -> torch.nn.Module:
    """A fresh network as the bundle's variant ``configs/variants/<name>.json`` defines it (its ``network_def``), so
    that a checkpoint trained with that variant loads with the same constructor arguments."""
    from monai.bundle import ConfigParser

    from .variants import bundle_config_dir, variant_config_files

    parser = ConfigParser()
    parser.read_config(variant_config_files(bundle_config_dir(), name))
    parser["spatial_dims"] = spatial_dims
    return parser.get_parsed_content("network_def", instantiate=True)


def load_trained(arch: str, path: str) -> torch.nn.Module:
    """A network of ``arch`` (one of :data:`ARCHITECTURES`) with the weights of a bundle checkpoint
    (``model_final.pt``: a dict with ``"model"``; ``model.pt``: the state dict itself)."""
    from ..benchmark.methods import make_network

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    # the recipe's three come from make_network (what the benchmark builds); SACB-Net from its variant config
    net = variant_network(arch) if arch == "sacbnet" else make_network(arch)
    net.load_state_dict(state["model"] if "model" in state else state)
    return net.eval()


def lpba40_methods(checkpoints: dict[str, str], autocast: bool = False) -> list:
    """Benchmark methods of the study: every trained network under the controllers the paper compares; with
    ``autocast`` each also under ``torch.autocast`` (bfloat16 on CPU, float16 on CUDA), named ``"<method>, autocast"``."""
    from ..benchmark.methods import _net_method, _shallow_with_controller
    from ..controllers import TCI, FixedIterations, IterStop, SinglePass

    rows = []
    if "ipear" in checkpoints:
        net = load_trained("ipear", checkpoints["ipear"])
        for name, ctrl in [("iPEAR (TCI)", TCI()), ("iPEAR single pass", SinglePass()),
                           ("iPEAR fixed 3", FixedIterations(3)), ("iPEAR IterStop", IterStop())]:
            rows.append(_net_method(name, _shallow_with_controller(net, ctrl), ""))
    if "rpnet" in checkpoints:
        net = load_trained("rpnet", checkpoints["rpnet"])
        for name, ctrl in [("RP-Net single pass", SinglePass()), ("IIRP-Net (IterStop, published code)", IterStop(faithful=True)),
                           ("RP-Net + TCI", TCI())]:
            rows.append(_net_method(name, _shallow_with_controller(net, ctrl), ""))
    if "voxelmorph" in checkpoints:
        rows.append(_net_method("VoxelMorph (MONAI)", load_trained("voxelmorph", checkpoints["voxelmorph"]), ""))
    if "sacbnet" in checkpoints:
        rows.append(_net_method("SACB-Net", load_trained("sacbnet", checkpoints["sacbnet"]), ""))
    if autocast:
        rows += [_net_method(f"{m.name}, autocast", m.network, m.note, autocast=True) for m in rows]
    return rows


def _load_pairs(dataset_dir: str, split: str) -> list[dict]:
    from ..data.datalist import load_registration_pairs
    from ..data.transforms import registration_pair_transforms

    xform = registration_pair_transforms()
    out = []
    for p in load_registration_pairs(os.path.join(dataset_dir, "dataset.json"), dataset_dir, split):
        d = xform(dict(p))
        out.append({k: (v[None] if isinstance(v, torch.Tensor) else v) for k, v in d.items()})
    return out


def evaluate_lpba40(dataset_dir: str, checkpoints: dict[str, str], protocols=("validation_atlas", "validation"),
                    log=print, autocast: bool = False) -> dict:
    """``{protocol: {method: [per-pair rows]}}`` (Dice over the 56 labels, HD95, folding, time, updates per level)."""
    from ..benchmark.harness import run_benchmark

    methods = lpba40_methods(checkpoints, autocast)
    with open(os.path.join(dataset_dir, "dataset.json")) as f:
        labels = list(range(1, len(json.load(f)["label_codes"]) + 1))  # the renumbered structures (56 for LPBA40)
    results = {}
    for protocol in protocols:
        pairs = _load_pairs(dataset_dir, protocol)
        spacing = [float(v) for v in pairs[0]["fixed_image"].pixdim[:3]]
        identity = _identity_method()
        results[protocol] = run_benchmark([identity] + methods, pairs, labels=labels, spacing=spacing,
                                          repeats=1, warmup=0, log=log)
    return results


def _identity_method():
    from ..benchmark.methods import BenchmarkMethod

    def register(moving, fixed):
        return torch.zeros(moving.shape[0], moving.ndim - 2, *moving.shape[2:])

    return BenchmarkMethod("No registration", register, note="identity field")


def format_lpba40_tables(results: dict) -> list[str]:
    """Markdown tables, one per protocol (mean (sd) over pairs)."""
    from ..benchmark.report import accuracy_table

    titles = {"validation_atlas": "Validation subject -> atlas S01", "validation": "Validation subject pairs (S36-S40)"}
    lines = []
    for protocol, res in results.items():
        lines += ["", f"### {titles.get(protocol, protocol)}", ""] + accuracy_table(res, {})
    return lines


def read_validation_curve(run_dir: str, every: int, tag: str = "val_mean_dice") -> list[tuple[int, float]]:
    """``(training step, value)`` of a bundle run's validation metric, from its TensorBoard log
    (``runs/`` under the run's bundle root); the bundle logs it per validation round (= ``every`` iterations)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points: dict[int, float] = {}
    for root, _, files in os.walk(run_dir):
        if any(f.startswith("events.out.tfevents") for f in files):
            acc = EventAccumulator(root, size_guidance={"scalars": 0})
            acc.Reload()
            if tag in acc.Tags().get("scalars", []):
                for e in acc.Scalars(tag):
                    points[int(e.step) * every] = float(e.value)
    return sorted(points.items())


def parse_run(spec: str) -> tuple[str, str, int]:
    """``NAME=bundle_root[@first_step]`` of the ``plot`` command -> ``(name, bundle_root, first_step)``.

    ``first_step``: the optimiser steps the run's weights had when its trainer started counting from zero (a run
    started from other weights without their trainer state, e.g. a fine-tune); 0 by default."""
    name, sep, rest = spec.partition("=")
    folder, at, first = rest.rpartition("@")
    if not at:
        folder, first = rest, "0"
    if not sep or not name or not folder or not first.isdigit():
        raise ValueError(f"expected NAME=bundle_root or NAME=bundle_root@first_step, got {spec!r}")
    return name, folder, int(first)


def validation_curves(runs: list[str], every: int) -> dict[str, list[tuple[int, float]]]:
    """The ``plot`` command's curves: one per name, the runs given under the same name joined in step order."""
    curves: dict[str, dict[int, float]] = {}
    for spec in runs:
        name, folder, first = parse_run(spec)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"{name}: no training run at {folder!r}")
        curves.setdefault(name, {}).update({first + s: v for s, v in read_validation_curve(folder, every)})
    return {name: sorted(pts.items()) for name, pts in curves.items()}


def lpba40_main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m monai_ipear.studies.lpba40", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command")
    pre = sub.add_parser("prepare", help="resample, renumber and split the LPBA40 folder")
    pre.add_argument("--src", required=True, help="folder with images/SNN.nii.gz and labels/SNN.nii.gz")
    pre.add_argument("--out", required=True, help="output folder (NIfTI files and dataset.json)")
    pre.add_argument("--pixdim", type=float, default=2.0, help="voxel size in mm (2: CPU protocol, 1: the paper's)")
    ev = sub.add_parser("evaluate", help="score trained checkpoints on both validation protocols")
    ev.add_argument("--dataset_dir", required=True)
    for arch in ARCHITECTURES:
        ev.add_argument(f"--{arch}", default=None, help=f"{arch} bundle checkpoint")
    ev.add_argument("--protocols", nargs="+", default=["validation_atlas", "validation"],
                    help="datalist splits to score (default: both validation protocols)")
    ev.add_argument("--out", required=True, help="JSON file of per-pair results")
    ev.add_argument("--autocast", action="store_true",
                    help="also run every network under torch.autocast (bfloat16 on CPU): the agreement with float32")
    pl = sub.add_parser("plot", help="validation Dice against training steps")
    pl.add_argument("--run", action="append", required=True,
                    help="NAME=bundle_root[@first_step] of a training run (first_step: the steps its starting weights "
                    "had when its trainer began counting from zero; runs given under one NAME form one curve)")
    pl.add_argument("--every", type=int, required=True, help="val_every_iterations of the runs")
    pl.add_argument("--out", required=True, help="PNG path (a JSON of the points is written beside it)")
    a = p.parse_args(argv)
    if a.command == "prepare":
        prepare_lpba40(a.src, a.out, a.pixdim)
    elif a.command == "evaluate":
        ckpts = {k: getattr(a, k) for k in ARCHITECTURES if getattr(a, k)}
        if not ckpts:
            p.error("give at least one of " + ", ".join(f"--{k}" for k in ARCHITECTURES))
        results = evaluate_lpba40(a.dataset_dir, ckpts, tuple(a.protocols), autocast=a.autocast)
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)
        print("\n".join(format_lpba40_tables(results)))
    elif a.command == "plot":
        from ..benchmark.plots import _figure, plt

        try:
            curves = validation_curves(a.run, a.every)
        except (ValueError, FileNotFoundError) as e:
            p.error(str(e))
        fig = _figure()(figsize=(6, 4))
        ax = fig.add_subplot(111)
        for name, pts in curves.items():
            ax.plot([s for s, _ in pts], [100 * v for _, v in pts], marker="o", label=name)
        ax.set_xlabel("training steps (optimiser updates, batch 1)")
        ax.set_ylabel("validation Dice (%), subject -> atlas S01")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.out, dpi=100)
        plt.close(fig)
        with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
            json.dump(curves, f, indent=1)
    else:
        p.print_help()


if __name__ == "__main__":
    lpba40_main()
