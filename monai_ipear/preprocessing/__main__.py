"""Command: mask, pre-align to a template, box and scale a set of subjects; write NIfTI files and a datalist.

    python -m monai_ipear.preprocessing --images s1.nii.gz s2.nii.gz ... --labels l1.nii.gz l2.nii.gz ... \\
        --template 0 --train 4 --out prep/

Subject ``--template`` (index, default 0) is masked and boxed, then every subject is masked (label > 0, or
``--masks``), affinely pre-aligned to it (elastix) and cropped to the template's brain box (multiple of 16).
Writes ``<out>/<stem>_image.nii.gz``, ``<out>/<stem>_label.nii.gz`` and ``<out>/dataset.json`` with the first
``--train`` subjects under ``"training"`` and the rest under ``"validation"`` (the datalist format of
:func:`monai_ipear.data.load_registration_pairs`).
"""

from __future__ import annotations

import argparse
import json
import os
import time

from monai.data import NibabelWriter
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, MaskIntensityd, Orientationd

from ..data.datalist import _stem
from .transforms import real_scan_preprocessing


def _save(tensor, path: str) -> None:
    writer = NibabelWriter()
    writer.set_data_array(tensor, channel_dim=0)
    writer.set_metadata({"affine": tensor.affine, "original_affine": tensor.affine}, resample=False)
    writer.write(path)


def preprocess_main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m monai_ipear.preprocessing", description=__doc__.splitlines()[0])
    p.add_argument("--images", nargs="+", required=True)
    p.add_argument("--labels", nargs="+", required=True)
    p.add_argument("--masks", nargs="+", default=None, help="brain masks (default: label > 0)")
    p.add_argument("--template", type=int, default=0, help="index of the template subject")
    p.add_argument("--train", type=int, default=None, help="number of subjects in the training split")
    p.add_argument("--transform", default="affine", choices=["rigid", "affine"])
    p.add_argument("--iterations", type=int, default=256)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if len(a.images) != len(a.labels) or (a.masks and len(a.masks) != len(a.images)):
        p.error("give one label map (and mask) per image")
    os.makedirs(a.out, exist_ok=True)
    masks = a.masks or a.labels
    t_keys = ["template_image", "template_mask"]
    template = Compose([
        LoadImaged(t_keys, image_only=True), EnsureChannelFirstd(t_keys), Orientationd(t_keys, "RAS"),
        MaskIntensityd("template_image", mask_key="template_mask"),
    ])({"template_image": a.images[a.template], "template_mask": masks[a.template]})
    template["template_mask"] = (template["template_mask"] > 0).float()
    pipeline = real_scan_preprocessing("image", "label", "mask" if a.masks else None, transform=a.transform,
                                       num_iterations=a.iterations, load=False)
    load = Compose([LoadImaged(["image", "label"] + (["mask"] if a.masks else []), image_only=True),
                    EnsureChannelFirstd(["image", "label"] + (["mask"] if a.masks else [])),
                    Orientationd(["image", "label"] + (["mask"] if a.masks else []), "RAS")])
    entries = []
    for i, (img, lab) in enumerate(zip(a.images, a.labels)):
        start = time.perf_counter()
        d = {"image": img, "label": lab}
        if a.masks:
            d["mask"] = a.masks[i]
        d = load(d)
        d.update(template)
        out = pipeline(d)
        stem = _stem(img)
        _save(out["image"], os.path.join(a.out, f"{stem}_image.nii.gz"))
        _save(out["label"], os.path.join(a.out, f"{stem}_label.nii.gz"))
        entries.append({"image": f"{stem}_image.nii.gz", "label": f"{stem}_label.nii.gz"})
        print(f"{stem}: {tuple(out['image'].shape[1:])} in {time.perf_counter() - start:.1f} s", flush=True)
    n_train = a.train if a.train is not None else len(entries)
    with open(os.path.join(a.out, "dataset.json"), "w") as f:
        json.dump({"training": entries[:n_train], "validation": entries[n_train:]}, f, indent=2)


if __name__ == "__main__":
    preprocess_main()
