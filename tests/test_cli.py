"""The command-line interface: register (same files as bundle inference), warp, jacobian, errors, prealign."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import run

import monai_ipear
from monai_ipear.cli import affine_prealign
from monai_ipear.cli import cli_main as main
from monai_ipear.data import SyntheticPairGenerator

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
AFFINE = np.array([[1.2, 0.0, 0.0, 10.0], [0.0, 1.0, 0.0, -5.0], [0.0, 0.0, 1.5, 3.0], [0, 0, 0, 1.0]])
SIZE = 24


def _small_field_model(path, seed=0):
    """A random iPEAR whose last convolutions are scaled down: small, non-zero fields."""
    torch.manual_seed(seed)
    sd = monai_ipear.iPEAR(spatial_dims=3).state_dict()
    for k in sd:
        if ".cl3.conv." in k:
            sd[k] = sd[k] * (0.05 if k.endswith("weight") else 0.0)
    torch.save(sd, path)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    p = SyntheticPairGenerator(SIZE, num_labels=3, max_displacement=3.0)(0)
    files = {"fixed": root / "fix.nii.gz", "moving": root / "mov.nii.gz", "label": root / "mov_seg.nii.gz",
             "fixed_label": root / "fix_seg.nii.gz", "model": root / "model.pt"}
    nib.save(nib.Nifti1Image(200.0 * p["fixed_image"][0].numpy(), AFFINE), str(files["fixed"]))
    nib.save(nib.Nifti1Image(200.0 * p["moving_image"][0].numpy(), AFFINE), str(files["moving"]))
    nib.save(nib.Nifti1Image(p["moving_label"][0].numpy().astype(np.int16), AFFINE), str(files["label"]))
    nib.save(nib.Nifti1Image(p["fixed_label"][0].numpy().astype(np.int16), AFFINE), str(files["fixed_label"]))
    _small_field_model(str(files["model"]))
    out = root / "cli_out"
    rc = main(["register", "--fixed", str(files["fixed"]), "--moving", str(files["moving"]),
               "--moving-label", str(files["label"]), "--model", str(files["model"]), "--out-dir", str(out),
               "--device", "cpu"])
    assert rc == 0
    return root, files, out


def test_register_writes_the_bundle_inference_files(pair):
    root, files, out = pair
    assert sorted(os.listdir(out)) == ["iterations.csv", "mov_to_fix_ddf.nii.gz", "mov_to_fix_ddf_itk.nii.gz",
                                       "mov_to_fix_warped.nii.gz", "mov_to_fix_warped_label.nii.gz"]
    # the same pair through the bundle's inference workflow (datalist with one explicit pair)
    datalist = {"validation": [{"image": str(files["moving"]), "label": str(files["label"])},
                               {"image": str(files["fixed"]), "label": str(files["fixed_label"])}],
                "validation_pairs": [{"moving": str(files["moving"]), "fixed": str(files["fixed"])}]}
    (root / "dataset.json").write_text(json.dumps(datalist))
    bundle_out = root / "bundle_out"
    run(config_file=os.path.join(CONFIGS, "inference.json"), bundle_root=str(root), datalist=str(root / "dataset.json"),
        ckpt_path=str(files["model"]), output_dir=str(bundle_out), device="cpu",
        meta_file=os.path.join(CONFIGS, "metadata.json"), logging_file=os.path.join(CONFIGS, "logging.conf"))
    for suffix in ("ddf", "ddf_itk", "warped", "warped_label"):
        a = nib.load(str(out / f"mov_to_fix_{suffix}.nii.gz"))
        b = nib.load(str(bundle_out / f"mov_to_fix_{suffix}.nii.gz"))
        assert np.allclose(a.affine, AFFINE, atol=1e-5) and np.allclose(b.affine, AFFINE, atol=1e-5)
        assert a.shape == b.shape and a.get_data_dtype() == b.get_data_dtype(), suffix
        assert np.allclose(a.get_fdata(), b.get_fdata(), atol=1e-5), suffix
    ddf = nib.load(str(out / "mov_to_fix_ddf.nii.gz")).get_fdata()
    assert ddf.shape == (SIZE, SIZE, SIZE, 3) and 0.01 < np.abs(ddf).max() < 8  # a real field
    assert (out / "iterations.csv").read_text() == (bundle_out / "iterations.csv").read_text()


def test_warp_label_reproduces_register_and_known_shift(pair, tmp_path):
    root, files, out = pair
    # the moving label warped with the saved field == register's warped label
    rc = main(["warp", "--image", str(files["label"]), "--ddf", str(out / "mov_to_fix_ddf.nii.gz"),
               "--out", str(tmp_path / "lab.nii.gz"), "--label"])
    assert rc == 0
    warped = nib.load(str(tmp_path / "lab.nii.gz"))
    assert warped.get_data_dtype() == np.uint8 and np.allclose(warped.affine, AFFINE)
    assert np.array_equal(warped.get_fdata(), nib.load(str(out / "mov_to_fix_warped_label.nii.gz")).get_fdata())
    # a constant shift of +2 voxels along axis 0 (pull): warped[x] = image[x + 2]; in mm (1.2 mm voxels): 2.4
    image = np.random.default_rng(0).random((16, 12, 10)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, AFFINE), str(tmp_path / "img.nii.gz"))
    for units, value in (("voxel", 2.0), ("mm", 2.4)):
        ddf = np.zeros((16, 12, 10, 3), np.float32)
        ddf[..., 0] = value
        nib.save(nib.Nifti1Image(ddf, AFFINE), str(tmp_path / f"ddf_{units}.nii.gz"))
        assert main(["warp", "--image", str(tmp_path / "img.nii.gz"), "--ddf", str(tmp_path / f"ddf_{units}.nii.gz"),
                     "--out", str(tmp_path / f"w_{units}.nii.gz"), "--ddf-units", units]) == 0
        w = nib.load(str(tmp_path / f"w_{units}.nii.gz")).get_fdata()
        assert np.allclose(w[:-2], image[2:], atol=1e-5), units
        assert np.allclose(w[-2:], 0.0)  # zeros padding outside the image


def test_jacobian_of_known_linear_fields(tmp_path, capsys):
    grid = np.stack(np.meshgrid(*[np.arange(12.0)] * 3, indexing="ij"), -1)
    for name, scale, det, folding in (("stretch", (0.1, -0.2, 0.3), 1.1 * 0.8 * 1.3, 0.0),
                                      ("fold", (-2.0, 0.0, 0.0), -1.0, 100.0)):
        ddf = (grid * np.array(scale)).astype(np.float32)  # u(x) = diag(scale) x -> det(I + diag(scale))
        nib.save(nib.Nifti1Image(ddf, AFFINE), str(tmp_path / f"{name}.nii.gz"))
        capsys.readouterr()
        assert main(["jacobian", "--ddf", str(tmp_path / f"{name}.nii.gz"), "--out", str(tmp_path / f"{name}_jac.nii.gz")]) == 0
        printed = capsys.readouterr().out
        assert f"folding_percent: {folding}" in printed
        jac = nib.load(str(tmp_path / f"{name}_jac.nii.gz"))
        assert jac.shape == (12, 12, 12) and np.allclose(jac.affine, AFFINE)
        assert np.allclose(jac.get_fdata(), det, atol=1e-5)


def test_errors_are_one_line_exit_2(pair, tmp_path, capsys):
    root, files, out = pair
    (tmp_path / "broken.nii.gz").write_text("not an image")
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16), np.float32), AFFINE), str(tmp_path / "other_grid.nii.gz"))
    cases = [
        (["register", "--fixed", str(files["fixed"]), "--moving", str(tmp_path / "missing.nii.gz"),
          "--model", str(files["model"]), "--out-dir", str(tmp_path)], "moving file not found"),
        (["register", "--fixed", str(files["fixed"]), "--moving", str(tmp_path / "broken.nii.gz"),
          "--model", str(files["model"]), "--out-dir", str(tmp_path)], "cannot read moving file"),
        (["register", "--fixed", str(files["fixed"]), "--moving", str(tmp_path / "other_grid.nii.gz"),
          "--model", str(files["model"]), "--out-dir", str(tmp_path)], "--prealign affine"),
        (["register", "--fixed", str(files["fixed"]), "--moving", str(files["moving"]), "--prealign", "rigid",
          "--model", str(files["model"]), "--out-dir", str(tmp_path)], "--prealign must be"),
        (["register", "--fixed", str(files["fixed"]), "--moving", str(files["moving"]),
          "--model", str(files["label"]), "--out-dir", str(tmp_path)], "cannot read model file"),
        (["warp", "--image", str(files["label"]), "--ddf", str(files["fixed"]), "--out", str(tmp_path / "x.nii.gz")],
         "is not a displacement field"),
        (["jacobian", "--ddf", str(out / "mov_to_fix_ddf.nii.gz"), "--bogus", "1"], "unknown option --bogus"),
        (["frobnicate"], "unknown command"),
    ]
    for argv, expected in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
        assert len(err) == 1 and expected in err[0], (argv, err)
    # through the interpreter: exit status 2, no traceback
    proc = subprocess.run([sys.executable, "-m", "monai_ipear", "warp", "--image", str(tmp_path / "broken.nii.gz"),
                           "--ddf", str(out / "mov_to_fix_ddf.nii.gz"), "--out", str(tmp_path / "y.nii.gz")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: cannot read image file")


def test_affine_prealign_recovers_a_translation(tmp_path):
    from scipy.ndimage import gaussian_filter, shift

    rng = np.random.default_rng(1)
    fixed = gaussian_filter(rng.random((32, 32, 32)), 3.0)
    fixed = (fixed - fixed.min()) / np.ptp(fixed) * (np.linalg.norm(np.indices(fixed.shape) - 15.5, axis=0) < 12)
    moving = shift(fixed, (3.0, -2.0, 1.0), order=1)
    nib.save(nib.Nifti1Image(fixed.astype(np.float32), np.eye(4)), str(tmp_path / "f.nii.gz"))
    nib.save(nib.Nifti1Image(moving.astype(np.float32), np.eye(4)), str(tmp_path / "m.nii.gz"))
    nib.save(nib.Nifti1Image((moving > 0.3).astype(np.int16), np.eye(4)), str(tmp_path / "ml.nii.gz"))
    paths = affine_prealign(str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"), str(tmp_path / "p"),
                            str(tmp_path / "ml.nii.gz"))
    aligned = nib.load(paths["moving"]).get_fdata()
    before, after = np.mean((moving - fixed) ** 2), np.mean((aligned - fixed) ** 2)
    assert after < 0.2 * before, (before, after)
    label = nib.load(paths["moving_label"]).get_fdata()
    assert set(np.unique(label)) <= {0.0, 1.0}  # nearest neighbour keeps label values
    dice = 2 * np.sum((label > 0) & (fixed > 0.3)) / (np.sum(label > 0) + np.sum(fixed > 0.3))
    assert dice > 0.9
    assert os.path.isfile(paths["transform"])


def test_register_iterations_option_with_bundle_weights(pair, tmp_path):
    root, files, _ = pair
    out = tmp_path / "k2"
    assert main(["register", "--fixed", str(files["fixed"]), "--moving", str(files["moving"]), "--model",
                 str(files["model"]), "--out-dir", str(out), "--device", "cpu", "--iterations", "2"]) == 0
    rows = (out / "iterations.csv").read_text().strip().splitlines()
    assert len(rows) == 2 and rows[1].split(",")[-4:] == ["2", "2", "2", "2"], rows
