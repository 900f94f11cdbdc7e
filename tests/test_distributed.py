"""configs/multi_gpu_train.json: 2 gloo processes on CPU through torchrun and monai.bundle run."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


def test_two_gloo_processes_train_identically_and_only_rank0_writes(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    # test-only addition: every rank saves its own final weights, to compare them
    dump = tmp_path / "dump_weights.json"
    dump.write_text(json.dumps({"run": [
        "$@train#trainer.run()",
        "$torch.save(@network.module.state_dict(), @bundle_root + '/rank%d.pt' % dist.get_rank())",
    ]}))
    bundle = tmp_path / "bundle"
    logs = tmp_path / "logs"
    configs = [os.path.join(CONFIGS, "train.json"), os.path.join(CONFIGS, "multi_gpu_train.json"), str(dump)]
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "--log-dir", str(logs), "--redirects", "3",
        "-m", "monai.bundle", "run", "--config_file", str(configs),
        "--meta_file", os.path.join(CONFIGS, "metadata.json"), "--logging_file", os.path.join(CONFIGS, "logging.conf"),
        "--bundle_root", str(bundle), "--device", "$torch.device('cpu')",
        "--num_train_pairs", "4", "--num_val_pairs", "2", "--max_epochs", "1",
        "--synthetic#spatial_size", "16", "--synthetic#num_labels", "2",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
    rank_logs = {r: "\n".join(open(f).read() for f in sorted(glob.glob(str(logs / "**" / str(r) / "*.log"), recursive=True)))
                 for r in (0, 1)}
    assert proc.returncode == 0, proc.stderr[-3000:] + rank_logs[0][-2000:] + rank_logs[1][-2000:]

    w0 = torch.load(bundle / "rank0.pt", map_location="cpu", weights_only=True)
    w1 = torch.load(bundle / "rank1.pt", map_location="cpu", weights_only=True)
    assert set(w0) == set(w1) and all(torch.equal(w0[k], w1[k]) for k in w0)  # DDP kept the ranks identical
    final = torch.load(bundle / "models" / "model_final.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(final["model"][k], w0[k]) for k in w0)  # unwrapped (no "module." prefix)
    # DistributedSampler: 4 pairs over 2 ranks -> 2 optimiser steps per rank in the epoch
    assert {int(s["step"]) for s in final["optimizer"]["state"].values()} == {2}

    # only rank 0 wrote checkpoints, TensorBoard events and the metric logs
    assert sorted(os.listdir(bundle / "models")) == sorted(
        os.path.basename(p) for p in glob.glob(str(bundle / "models" / "*.pt")))
    assert (bundle / "models" / "model.pt").is_file()
    assert len(glob.glob(str(bundle / "runs" / "events.out.tfevents.*"))) == 1
    for line in ("Key metric: val_mean_dice", "Iter: 2/2 -- train_loss", "validation mean Dice"):
        assert line in rank_logs[0] and line not in rank_logs[1], line
    assert "Engine run finished" in rank_logs[1]  # rank 1 did train, silently
