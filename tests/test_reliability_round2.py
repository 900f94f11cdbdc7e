"""Hardening, round 2 (issue 12): no silent wrong result, no lost file, no code run from a file.

Every test here is a row of ``docs/reliability.md`` (numbered cases R2-1 .. R2-11 and the classes).
Volumes are tiny (16^3, 32^2) and models random or zero-field, so every test runs in seconds.
"""

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import run

import monai_ipear
from monai_ipear.cli import cli_main as main
from monai_ipear.engines.outputs import label_dtype, write_label_map

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
SIZE = 16
# voxel axes -> world axes permuted: how coronal / sagittal acquisitions (MPRAGE, the IXI files) are stored
SAGITTAL = np.array([[0.0, 0.0, -1.0, 90.0], [-1.0, 0.0, 0.0, 126.0], [0.0, 1.0, 0.0, -72.0], [0, 0, 0, 1.0]])
CORONAL = np.array([[-1.2, 0.0, 0.0, 90.0], [0.0, 0.0, 1.0, -126.0], [0.0, 1.0, 0.0, -72.0], [0, 0, 0, 1.0]])
AXIAL = np.diag([1.2, 1.0, 1.5, 1.0])


def _save(array, path, affine=AXIAL):
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return str(path)


def _model(path, spatial_dims=3, zero_field=False, nan=False):
    """iPEAR weights: a small nonzero field, an exactly zero field (identity warp) or NaN weights."""
    torch.manual_seed(0)
    sd = monai_ipear.iPEAR(spatial_dims=spatial_dims).state_dict()
    for k in sd:
        if ".cl3.conv." in k:
            sd[k] = sd[k] * (0.0 if zero_field or k.endswith("bias") else 0.05)
        if nan and k.endswith("weight"):
            sd[k] = torch.full_like(sd[k], float("nan"))
    torch.save(sd, str(path))
    return str(path)


def _images(rng, shape):
    return rng.random(shape).astype(np.float32) * 100.0, rng.random(shape).astype(np.float32) * 100.0


def _errors(capsys) -> list:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]


def _register(tmp_path, fixed, moving, model, out, *extra):
    return main(["register", "--fixed", fixed, "--moving", moving, "--model", model, "--out-dir", str(out),
                 "--device", "cpu", *extra])


# ---------------------------------------------------------------- R2-1 label values beyond int16 / float32


def test_label_dtype_holds_the_values():
    assert label_dtype(np.array([0, 255])) == np.uint8
    assert label_dtype(np.array([-1, 5])) == np.int16
    assert label_dtype(np.array([0, 40000])) == np.int32
    assert label_dtype(np.array([0, 16777217])) == np.int32
    assert label_dtype(np.array([0, 2**40])) == np.int64


def test_large_label_values_survive_register_and_warp(tmp_path):
    """Labels 40000 and 16777217 (> int16, > 2**24) come out unchanged (zero field: identity warp)."""
    rng = np.random.default_rng(0)
    fix, mov = _images(rng, (SIZE,) * 3)
    lab = np.zeros((SIZE,) * 3, np.int32)
    lab[2:7], lab[7:12], lab[12:14, :5] = 40000, 16777217, 3
    f, m = _save(fix, tmp_path / "f.nii.gz"), _save(mov, tmp_path / "m.nii.gz")
    lf = _save(lab, tmp_path / "lab.nii.gz")
    model = _model(tmp_path / "zero.pt", zero_field=True)
    assert _register(tmp_path, f, m, model, tmp_path / "out", "--moving-label", lf) == 0
    out = nib.load(str(tmp_path / "out" / "m_to_f_warped_label.nii.gz"))
    assert out.get_data_dtype() == np.int32
    assert np.array_equal(np.asarray(out.dataobj), lab)  # before: int16 cast, 40000 -> -25536, 16777217 -> 0
    ddf = str(tmp_path / "out" / "m_to_f_ddf.nii.gz")
    assert main(["warp", "--image", lf, "--ddf", ddf, "--out", str(tmp_path / "w.nii.gz"), "--label"]) == 0
    assert np.array_equal(np.asarray(nib.load(str(tmp_path / "w.nii.gz")).dataobj), lab)
    # the writer alone, on a float64 tensor
    write_label_map(torch.as_tensor(lab, dtype=torch.float64)[None], torch.as_tensor(AXIAL), str(tmp_path / "d.nii.gz"))
    assert np.array_equal(np.asarray(nib.load(str(tmp_path / "d.nii.gz")).dataobj), lab)


# ---------------------------------------------------------------- R2-2 warp onto another grid


def test_warp_and_jacobian_refuse_an_image_on_another_grid(tmp_path, capsys):
    rng = np.random.default_rng(1)
    img = rng.random((SIZE,) * 3).astype(np.float32)
    ddf = _save(np.zeros((SIZE,) * 3 + (3,), np.float32), tmp_path / "ddf.nii.gz")
    flipped = AXIAL.copy()
    flipped[0, 0], flipped[0, 3] = -flipped[0, 0], 18.0  # same shape, x axis flipped
    other = _save(img, tmp_path / "flipped.nii.gz", flipped)
    capsys.readouterr()
    assert main(["warp", "--image", other, "--ddf", ddf, "--out", str(tmp_path / "w.nii.gz")]) == 2
    assert "different affines" in _errors(capsys)[0]
    assert not (tmp_path / "w.nii.gz").exists()
    mask = _save((img > 0.5).astype(np.uint8), tmp_path / "mask.nii.gz", flipped)
    assert main(["jacobian", "--ddf", ddf, "--mask", mask]) == 2
    assert "different affines" in _errors(capsys)[0]
    same = _save(img, tmp_path / "same.nii.gz")  # the field's grid: accepted
    assert main(["warp", "--image", same, "--ddf", ddf, "--out", str(tmp_path / "w.nii.gz")]) == 0


# ---------------------------------------------------------------- R2-3 NaN weights


def _inference_args(root, model, spatial_dims=3, size=SIZE, **extra):
    args = {"config_file": os.path.join(CONFIGS, "inference.json"), "meta_file": os.path.join(CONFIGS, "metadata.json"),
            "logging_file": os.path.join(CONFIGS, "logging.conf"), "bundle_root": str(root), "device": "cpu",
            "ckpt_path": model, "spatial_dims": spatial_dims, "synthetic#spatial_size": size,
            "synthetic#num_pairs": 1, "synthetic#num_labels": 2}
    args.update(extra)
    return args


def test_nan_weights_are_refused_and_nothing_is_written(tmp_path, capsys):
    rng = np.random.default_rng(2)
    fix, mov = _images(rng, (SIZE,) * 3)
    f, m = _save(fix, tmp_path / "f.nii.gz"), _save(mov, tmp_path / "m.nii.gz")
    model = _model(tmp_path / "nan.pt", nan=True)
    capsys.readouterr()
    assert _register(tmp_path, f, m, model, tmp_path / "out") == 2  # before: exit 0, NaN field, zero image
    assert "non-finite" in _errors(capsys)[0]
    assert not [p for p in os.listdir(tmp_path / "out") if p.endswith(".nii.gz")]
    with pytest.raises(Exception) as info:  # bundle inference.json
        run("run", **_inference_args(tmp_path / "bundle", model))
    chain, e = [], info.value
    while e is not None:
        chain.append(e)
        e = e.__cause__ or e.__context__
    assert any(isinstance(x, FloatingPointError) and "displacement field" in str(x) for x in chain)
    out = tmp_path / "bundle" / "outputs"
    assert not out.exists() or not [p for p in os.listdir(out) if p.endswith(".nii.gz")]


# ---------------------------------------------------------------- R2-8 coronal / sagittal storage


@pytest.mark.parametrize("affine", [SAGITTAL, CORONAL], ids=["sagittal", "coronal"])
def test_coronal_and_sagittal_volumes_are_written_with_their_affine(tmp_path, affine):
    rng = np.random.default_rng(3)
    fix, mov = _images(rng, (SIZE,) * 3)
    f, m = _save(fix, tmp_path / "f.nii.gz", affine), _save(mov, tmp_path / "m.nii.gz", affine)
    lab = _save((mov > 50).astype(np.uint8), tmp_path / "l.nii.gz", affine)
    model = _model(tmp_path / "m.pt")
    assert _register(tmp_path, f, m, model, tmp_path / "out", "--moving-label", lab) == 0  # before: "error: Affine [["
    for suffix, shape in (("warped", (SIZE,) * 3), ("ddf", (SIZE,) * 3 + (3,)), ("warped_label", (SIZE,) * 3)):
        img = nib.load(str(tmp_path / "out" / f"m_to_f_{suffix}.nii.gz"))
        assert img.shape == shape and np.allclose(img.affine, affine, atol=1e-5), suffix
    # the arrays are stored as computed (no reorientation): the saved field warps the label map again to the same
    # warped label map
    ddf = str(tmp_path / "out" / "m_to_f_ddf.nii.gz")
    assert main(["warp", "--image", lab, "--ddf", ddf, "--out", str(tmp_path / "again.nii.gz"), "--label"]) == 0
    again = np.asarray(nib.load(str(tmp_path / "again.nii.gz")).dataobj)
    assert np.array_equal(again, np.asarray(nib.load(str(tmp_path / "out" / "m_to_f_warped_label.nii.gz")).dataobj))
    assert again.sum() > 0


# ---------------------------------------------------------------- R2-11 2D images


def test_2d_images_register_warp_and_run_the_bundle(tmp_path):
    rng = np.random.default_rng(4)
    fix, mov = _images(rng, (32, 32))
    f, m = _save(fix, tmp_path / "f.nii.gz", np.eye(4)), _save(mov, tmp_path / "m.nii.gz", np.eye(4))
    model = _model(tmp_path / "m2.pt", spatial_dims=2)
    # before: TypeError "'>=' not supported between 'NoneType' and 'int'" in the writer
    assert _register(tmp_path, f, m, model, tmp_path / "out") == 0
    warped = nib.load(str(tmp_path / "out" / "m_to_f_warped.nii.gz"))
    ddf = nib.load(str(tmp_path / "out" / "m_to_f_ddf.nii.gz"))
    assert warped.shape == (32, 32) and ddf.shape == (32, 32, 1, 2)
    assert np.abs(ddf.get_fdata()).max() > 0
    assert main(["warp", "--image", m, "--ddf", str(tmp_path / "out" / "m_to_f_ddf.nii.gz"),
                 "--out", str(tmp_path / "w.nii.gz")]) == 0
    assert nib.load(str(tmp_path / "w.nii.gz")).shape == (32, 32)
    assert main(["jacobian", "--ddf", str(tmp_path / "out" / "m_to_f_ddf.nii.gz")]) == 0
    # the bundle's inference.json on 2D synthetic data
    run("run", **_inference_args(tmp_path / "bundle", model, spatial_dims=2, size=32))
    files = sorted(os.listdir(tmp_path / "bundle" / "outputs"))
    assert "synthetic_100000_warped.nii.gz" in files and "synthetic_100000_warped_label.nii.gz" in files
    assert nib.load(str(tmp_path / "bundle" / "outputs" / "synthetic_100000_warped.nii.gz")).shape == (32, 32)
