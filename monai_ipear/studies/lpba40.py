"""LPBA40 study data: the iPEAR paper's LPBA experiment as bundle datalists.

    python -m monai_ipear.studies.lpba40 --src ../shared/data/lpba40_1mm --out /data/lpba40_2mm --pixdim 2

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
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Spacingd

from ..preprocessing.__main__ import _save

__all__ = ["LPBA40_SPLIT", "prepare_lpba40", "lpba40_main"]

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


def lpba40_main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m monai_ipear.studies.lpba40", description=__doc__.splitlines()[0])
    p.add_argument("--src", required=True, help="folder with images/SNN.nii.gz and labels/SNN.nii.gz")
    p.add_argument("--out", required=True, help="output folder (NIfTI files and dataset.json)")
    p.add_argument("--pixdim", type=float, default=2.0, help="voxel size in mm (2: CPU protocol, 1: the paper's)")
    a = p.parse_args(argv)
    prepare_lpba40(a.src, a.out, a.pixdim)


if __name__ == "__main__":
    lpba40_main()
