"""Short versions of the three bundle workflows (train / inference / evaluate) run through ``monai.bundle``."""

import csv
import glob
import json
import os

import nibabel as nib
import numpy as np
import pytest
import monai.handlers
import torch
from monai.bundle import ConfigParser, run
from monai.networks.blocks import Warp

import monai_ipear
from monai_ipear.data import SyntheticPairGenerator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
COMMON = {
    "meta_file": os.path.join(CONFIGS, "metadata.json"),
    "logging_file": os.path.join(CONFIGS, "logging.conf"),
}
TINY = {"synthetic#spatial_size": 32, "synthetic#num_labels": 3}


def _small_field_model(path, seed=0):
    """An iPEAR whose last convolutions are scaled down, so its fields are small but not zero."""
    torch.manual_seed(seed)
    net = monai_ipear.iPEAR(spatial_dims=3)
    sd = net.state_dict()
    for k in sd:
        if ".cl3.conv." in k:
            sd[k] = sd[k] * (0.05 if k.endswith("weight") else 0.0)
    torch.save(sd, path)
    return net


def test_training_workflow_short(tmp_path):
    run(
        run_id="training",
        config_file=os.path.join(CONFIGS, "train.json"),
        bundle_root=str(tmp_path),
        num_train_pairs=2,
        num_val_pairs=1,
        max_epochs=1,
        val_interval=1,
        **TINY,
        **COMMON,
    )
    models = tmp_path / "models"
    assert (models / "model.pt").is_file() and (models / "model_final.pt").is_file()
    best = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    assert set(best) == set(monai_ipear.iPEAR(spatial_dims=3).state_dict())  # a plain state dict of the network
    final = torch.load(models / "model_final.pt", map_location="cpu", weights_only=True)
    assert {"model", "optimizer", "lr_scheduler"} <= set(final)
    assert glob.glob(str(tmp_path / "runs" / "events.out.tfevents.*"))


def test_resume_is_one_override():
    parser = ConfigParser()
    parser.read_config(os.path.join(CONFIGS, "train.json"))
    parser["resume"] = True
    parser["bundle_root"] = "/nonexistent"
    handlers = parser.get_parsed_content("train#handlers", instantiate=True)
    assert isinstance(handlers[0], monai.handlers.CheckpointLoader)  # ResumeCheckpointLoader (restores the epoch too)
    assert handlers[0].load_path == "/nonexistent/models"  # the folder: its newest run checkpoint is resumed
    parser["resume"] = False
    parser.parse()
    assert all(type(h).__name__ != "CheckpointLoader" for h in parser.get_parsed_content("train#handlers"))


def _write_nifti_dataset(root, n=2, size=32, one_pair=False):
    gen = SyntheticPairGenerator(size, num_labels=3, max_displacement=3.0)
    affine = np.array([[0.0, -1.2, 0.0, 40.0], [1.1, 0.0, 0.0, -20.0], [0.0, 0.0, 1.5, 5.0], [0, 0, 0, 1.0]])
    subjects = []
    for i in range(n):
        p = gen(i)
        nib.save(nib.Nifti1Image(300.0 * p["fixed_image"][0].numpy(), affine), os.path.join(root, f"s{i}.nii.gz"))
        nib.save(nib.Nifti1Image(p["fixed_label"][0].numpy().astype(np.int16), affine), os.path.join(root, f"s{i}_seg.nii.gz"))
        subjects.append({"image": f"s{i}.nii.gz", "label": f"s{i}_seg.nii.gz"})
    with open(os.path.join(root, "dataset.json"), "w") as f:
        datalist = {"training": subjects, "validation": subjects}
        if one_pair:  # explicit pair lists: one pair per split keeps the test short
            pair = [{"moving": subjects[0]["image"], "fixed": subjects[1]["image"]}]
            datalist.update({"training_pairs": pair, "validation_pairs": pair})
        json.dump(datalist, f)
    return affine


@pytest.mark.parametrize("reader", ["NibabelReader", "ITKReader"])
def test_inference_workflow_writes_viewer_correct_outputs(tmp_path, reader):
    data = tmp_path / "data"
    data.mkdir()
    _write_nifti_dataset(str(data))
    _small_field_model(str(tmp_path / "model.pt"))
    out = tmp_path / "out"
    run(
        config_file=os.path.join(CONFIGS, "inference.json"),
        bundle_root=str(tmp_path),
        dataset_dir=str(data),
        datalist=str(data / "dataset.json"),
        ckpt_path=str(tmp_path / "model.pt"),
        output_dir=str(out),
        **{"preprocessing#reader": reader},
        **COMMON,
    )
    warp = Warp(mode="nearest", padding_mode="zeros")
    for moving, fixed in (("s0", "s1"), ("s1", "s0")):
        prefix = out / f"{moving}_to_{fixed}"
        fixed_affine = nib.load(str(data / f"{fixed}.nii.gz")).affine
        files = {k: nib.load(f"{prefix}_{k}.nii.gz") for k in ("warped", "ddf", "warped_label")}
        for k, img in files.items():
            assert np.allclose(img.affine, fixed_affine, atol=1e-4), k
        ddf = files["ddf"].get_fdata()
        assert ddf.shape == (32, 32, 32, 3)  # one component per axis, last dimension
        assert 0.01 < np.abs(ddf).max() < 16  # a real, not a zero, field
        moving_label = nib.load(str(data / f"{moving}_seg.nii.gz")).get_fdata()
        ddf_t = torch.as_tensor(np.moveaxis(ddf, -1, 0), dtype=torch.float32)[None]
        rewarped = warp(torch.as_tensor(moving_label, dtype=torch.float32)[None, None], ddf_t)[0, 0].numpy()
        saved = files["warped_label"].get_fdata()
        assert np.array_equal(rewarped, saved)
        assert saved.max() > 0
    with open(out / "iterations.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["pair"] for r in rows] == ["s0_to_s1", "s1_to_s0"]
    assert all(3 <= int(r[f"level_{i}"]) <= 10 for r in rows for i in range(1, 5))  # TCI: t = 3 <= k <= k_max


def test_inference_ddf_in_mm(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    affine = _write_nifti_dataset(str(data), one_pair=True)
    _small_field_model(str(tmp_path / "model.pt"))
    for units in ("voxel", "mm"):
        run(
            config_file=os.path.join(CONFIGS, "inference.json"), bundle_root=str(tmp_path), dataset_dir=str(data),
            datalist=str(data / "dataset.json"), ckpt_path=str(tmp_path / "model.pt"), output_dir=str(tmp_path / units),
            ddf_units=units, **COMMON,
        )
    vox = nib.load(str(tmp_path / "voxel" / "s0_to_s1_ddf.nii.gz")).get_fdata()
    mm = nib.load(str(tmp_path / "mm" / "s0_to_s1_ddf.nii.gz")).get_fdata()
    assert np.allclose(mm, vox @ affine[:3, :3].T, atol=1e-4)


def test_evaluation_workflow_writes_csv_and_summary(tmp_path):
    _small_field_model(str(tmp_path / "model.pt"))
    out = tmp_path / "eval"
    run(
        config_file=os.path.join(CONFIGS, "evaluate.json"),
        bundle_root=str(tmp_path),
        ckpt_path=str(tmp_path / "model.pt"),
        output_dir=str(out),
        **{"synthetic#num_pairs": 2},
        **TINY,
        **COMMON,
    )
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    summary = json.loads((out / "summary.json").read_text())
    assert len(rows) == 2 and summary["num_pairs"] == 2
    for col in ("dice_mean", "hd95_mean", "assd_mean", "folding_pct", "mse", "time_s", "iterations_level_1"):
        assert col in rows[0], col
        vals = [float(r[col]) for r in rows]
        assert summary["metrics"][col]["mean"] == pytest.approx(np.mean(vals), rel=1e-6)
        assert summary["metrics"][col]["std"] == pytest.approx(np.std(vals), rel=1e-6, abs=1e-9)
        assert summary["metrics"][col]["n"] == 2
    assert all(0.0 <= float(r["dice_mean"]) <= 1.0 and float(r["time_s"]) > 0 for r in rows)


def test_training_on_own_nifti_data_is_one_override(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _write_nifti_dataset(str(data), one_pair=True)  # one explicit pair per split
    run(
        run_id="training",
        config_file=os.path.join(CONFIGS, "train.json"),
        bundle_root=str(tmp_path),
        dataset_dir=str(data),
        datalist=str(data / "dataset.json"),
        num_classes=4,
        max_epochs=1,
        val_interval=1,
        **COMMON,
    )
    assert (tmp_path / "models" / "model.pt").is_file()
