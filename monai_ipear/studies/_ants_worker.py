"""ANTs SyN for the pretrained comparison, runnable in ANOTHER Python (antspyx pins numpy < 2.4 and scipy < 1.16,
so it may live in its own virtual environment; this file imports only ``ants``, ``numpy`` and the standard library).

    <venv>/bin/python _ants_worker.py fixed.nii.gz moving.nii.gz moving_label.nii.gz fixed_mask.nii.gz out_dir

Writes ``out_dir/warped_label.nii.gz`` (nearest / genericLabel) on the fixed grid and prints one JSON line:
``{"time_s": registration + label resampling, "folding_pct": % of fixed-mask voxels with det J <= 0 of the SyN
warp (the affine stage has a positive determinant, so it does not change the sign)}``.
"""

from __future__ import annotations

import json
import os
import sys
import time


def run_syn(fixed: str, moving: str, moving_label: str, fixed_mask: str, out_dir: str) -> dict:
    import ants
    import numpy as np

    f_img, m_img = ants.image_read(fixed), ants.image_read(moving)
    lab = ants.image_read(moving_label)
    start = time.perf_counter()
    reg = ants.registration(f_img, m_img, type_of_transform="SyN")
    warped = ants.apply_transforms(f_img, lab, reg["fwdtransforms"], interpolator="genericLabel")
    elapsed = time.perf_counter() - start
    os.makedirs(out_dir, exist_ok=True)
    ants.image_write(warped, os.path.join(out_dir, "warped_label.nii.gz"))
    warp_files = [t for t in reg["fwdtransforms"] if t.endswith((".nii.gz", ".nii"))]
    folding = float("nan")
    if warp_files:
        jac = ants.create_jacobian_determinant_image(f_img, warp_files[0], do_log=False).numpy()
        mask = ants.image_read(fixed_mask).numpy() > 0
        folding = float(100.0 * (jac[mask] <= 0).mean()) if mask.any() else float("nan")
    return {"time_s": elapsed, "folding_pct": folding}


if __name__ == "__main__":
    print(json.dumps(run_syn(*sys.argv[1:6])))
