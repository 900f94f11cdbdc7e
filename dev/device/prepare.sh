#!/bin/bash
# Fill the folders a run on a lent GPU machine carries (the workplace's `device` tool; see README.md here):
#   .whl/      the pure-Python wheels the GPU image lacks (monai, nibabel, pytorch-ignite, fire, termcolor)
#   .devdata/  ixi_prep/ (a preprocessed training folder with dataset.json), speed/ (one image pair and the
#              IIRP-Net weights for the speed rows)
# Both are added to .git/info/exclude: they travel only when a call names them in `carry`, and never get committed.
# usage: dev/device/prepare.sh IXI_PREP_DIR MOVING FIXED RPNET_WEIGHTS
set -euo pipefail
[ $# -eq 4 ] || { echo "usage: $0 IXI_PREP_DIR MOVING FIXED RPNET_WEIGHTS" >&2; exit 2; }
prep=$(realpath "$1"); moving=$(realpath "$2"); fixed=$(realpath "$3"); weights=$(realpath "$4")
[ -f "$prep/dataset.json" ] || { echo "$prep has no dataset.json (python -m monai_ipear.preprocessing writes one)" >&2; exit 2; }
cd "$(git rev-parse --show-toplevel)"
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")" && touch "$exclude"
for p in /.whl/ /.devdata/; do grep -qxF "$p" "$exclude" || echo "$p" >> "$exclude"; done
# the versions installed here (the ones the tests ran with); all pure Python (py3-none-any), so the platform flags
# only satisfy pip
pins=$(python -c 'import importlib.metadata as m; print(" ".join(f"{p}=={m.version(p)}" for p in ("monai", "nibabel", "pytorch-ignite", "fire", "termcolor")))')
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl $pins
rm -rf .devdata && mkdir -p .devdata/ixi_prep .devdata/speed
cp "$prep"/dataset.json .devdata/ixi_prep/
# the training folder stored smaller (44 -> 27 MB for the 46 IXI subjects at 2 mm): images as int16 with NIfTI's
# scale (the preprocessed intensities lie in [0, 1]: error below 1e-5), labels as int16 (exact; refused if not integral)
python - "$prep" .devdata/ixi_prep <<'PY'
import glob, os, sys

import nibabel as nib
import numpy as np

src, dst = sys.argv[1:]
for path in sorted(glob.glob(os.path.join(src, "*.nii.gz"))):
    img = nib.load(path)
    data = img.get_fdata(dtype=np.float32)
    label = "_label" in os.path.basename(path)
    if label and not np.array_equal(data, np.round(data)):
        sys.exit(f"{path}: a label map with non-integer values")
    header = img.header.copy()
    header.set_data_dtype(np.int16)
    nib.save(nib.Nifti1Image(data.astype(np.int16) if label else data, img.affine, header),
             os.path.join(dst, os.path.basename(path)))
PY
cp "$moving" .devdata/speed/moving.nii.gz && cp "$fixed" .devdata/speed/fixed.nii.gz && cp "$weights" .devdata/speed/rpnet.pt
du -sh .whl .devdata/ixi_prep .devdata/speed
tracked=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
total=$((tracked + $(du -cb .whl .devdata | tail -1 | cut -f1)))
echo "tracked files: $tracked bytes; with .whl and .devdata: $total bytes of the 67108864 (64 MiB) a call carries"
[ "$total" -lt 67108864 ] || { echo "over the device tool's 64 MiB carry limit: trim .devdata" >&2; exit 1; }
