#!/bin/bash
# On the GPU machine: the benchmark command of docs/benchmarks.md on CUDA, for issue 16's GPU items.
#   part 1: 160x192x160, batch 1, fp32 and autocast (field difference to fp32): iPEAR TCI, fixed at TCI's counts,
#           fixed 3, RP-Net, both encoders, training steps of iPEAR and RP-Net; peak memory per row
#   part 2: iPEAR, RP-Net and their training steps at batch 2 and 4, fp32; peak memory per row
# usage, as the device tool's command (carry [".whl", ".devdata"]):  bash dev/device/speed.sh 1|2 [REPEATS]
# SIZE and DEVICE override the size and the device (SIZE=32x32x32 DEVICE=cpu checks the script on a CPU).
set -uo pipefail
source dev/device/setup_env.sh
part=${1:?part 1 or 2}; repeats=${2:-20}
common=(--methods --speed-images .devdata/speed/moving.nii.gz .devdata/speed/fixed.nii.gz
        --speed-sizes "${SIZE:-160x192x160}" --device "${DEVICE:-cuda}" --repeats "$repeats" --warmup 3
        --weights ipear=models/lpba40/ipear_lpba40_2mm_300steps.pt rpnet=.devdata/speed/rpnet.pt)
if [ "$part" = 1 ]; then
    python3 -m monai_ipear.benchmark "${common[@]}" --speed-methods ipear ipear-fixed3 rpnet --fixed-at-tci \
        --speed-encoders ipear rpnet --speed-train ipear rpnet --batch-sizes 1 --autocast --out "$OUT/speed_gpu_b1.md"
else
    python3 -m monai_ipear.benchmark "${common[@]}" --speed-methods ipear rpnet --speed-train ipear rpnet \
        --batch-sizes 2 4 --out "$OUT/speed_gpu_b24.md"
fi
echo "benchmark exit $?"
grep -h "^| [0-9]" "$OUT"/speed_gpu_*.md
