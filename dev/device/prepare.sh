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
cp "$prep"/dataset.json "$prep"/*.nii.gz .devdata/ixi_prep/
cp "$moving" .devdata/speed/moving.nii.gz && cp "$fixed" .devdata/speed/fixed.nii.gz && cp "$weights" .devdata/speed/rpnet.pt
du -sh .whl .devdata/ixi_prep .devdata/speed
echo "tracked files: $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes; a call carries at most 64 MiB in all"
