#!/bin/bash
# On the GPU machine: train iPEAR on the carried IXI folder for MINUTES minutes (the bundle's training workflow,
# configs/train.json + real_data.json + ixi/train.json), validating and saving a checkpoint every EVERY steps into
# $OUT/ixi/models (they come back with the call). With RESUME (a checkpoint carried in .devdata/), the run goes on
# from it: model, optimiser and the trainer's step count.
# usage, as the device tool's command (carry [".whl", ".devdata"]):  bash dev/device/train.sh MINUTES EVERY [RESUME]
set -uo pipefail
[ $# -ge 2 ] || { echo "usage: $0 MINUTES EVERY [RESUME_CHECKPOINT]" >&2; exit 2; }
source dev/device/setup_env.sh
minutes=$1; every=$2; resume=${3:-}
extra=(); [ -n "$resume" ] && extra=(--resume true --ckpt_path "$resume")
start=$(date +%s)
# SIGINT at the time limit: Ignite stops and the checkpoint saver writes model_final.pt. Python only installs its
# SIGINT handler where SIGINT is not ignored at start, and a command started in the background inherits it ignored,
# so the handler is installed explicitly; SIGKILL 60 s later if the save hangs.
run_bundle='import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); sys.argv[0] = "monai.bundle"; runpy.run_module("monai.bundle", run_name="__main__")'
timeout --signal=INT --kill-after=60 $((minutes * 60)) python3 -c "$run_bundle" run training \
    --config_file "['configs/train.json','configs/real_data.json','configs/ixi/train.json']" \
    --bundle_root "$OUT/ixi" --dataset_dir .devdata/ixi_prep --num_iterations 1000000 \
    --val_every_iterations "$every" --num_workers "${NUM_WORKERS:-6}" "${extra[@]}" > "$OUT/ixi_log.txt" 2>&1
echo "training exit $? after $(( $(date +%s) - start )) s (124: stopped at the time limit, as planned)"
grep -a "Epoch\[[0-9]*\] Metrics" "$OUT/ixi_log.txt" | tail -n 30
ls -la "$OUT/ixi/models"
