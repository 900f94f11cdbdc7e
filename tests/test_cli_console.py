"""The console script ``monai-ipear``: version, help without framework artefacts, progress lines when stderr is
not a terminal, and ``register --prealign affine`` writing the ITK composite transform that ``warp`` applies."""

import configparser
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

import monai_ipear
from monai_ipear.cli import COMMANDS, cli_main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AS_CONSOLE_SCRIPT = "import sys; sys.argv[0] = 'monai-ipear'; from monai_ipear.cli import cli_main; sys.exit(cli_main())"


def _env():
    return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_console_script_is_declared_and_points_at_cli_main():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    scripts = [ln.strip() for ln in cfg["options.entry_points"]["console_scripts"].splitlines() if ln.strip()]
    assert scripts == ["monai-ipear = monai_ipear.cli:cli_main"]
    module, func = scripts[0].split("=")[1].strip().split(":")
    assert getattr(__import__(module, fromlist=[func]), func) is cli_main


def test_version_and_help(capsys):
    assert cli_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"monai-ipear {monai_ipear.__version__}"
    proc = subprocess.run([sys.executable, "-c", AS_CONSOLE_SCRIPT, "--help"], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: monai-ipear {register,warp,jacobian}")
    for name, func in COMMANDS.items():
        assert cli_main([name, "--help"]) == 0
        text = capsys.readouterr().out
        assert text.startswith(f"usage: python -m monai_ipear {name} [options]")
        for artefact in ("NAME", "SYNOPSIS", "FLAGS", "Type:", "Default:", "POSITIONAL", "``"):
            assert artefact not in text, (name, artefact)
        import inspect

        lines = text.splitlines()
        for param in inspect.signature(func).parameters:  # every option is listed with its own description
            flag = "--" + param.replace("_", "-")
            i = next(i for i, ln in enumerate(lines) if ln.strip().startswith(flag + " ") or ln.strip() == flag)
            own = lines[i].strip()[len(flag):].strip().split(maxsplit=1)  # metavar, description
            first = own[1] if len(own) > 1 else lines[i + 1].strip()  # a long flag: the description on the next line
            assert first and not first.startswith("-"), (name, param, lines[i:i + 2])
        if name == "register":  # the masks are described together in the docstring ("fixed_mask, moving_mask: ...")
            masks = [ln for ln in lines if "brain masks" in ln]
            assert len(masks) == 2 and not any("--ddf-units" in ln for ln in masks), masks
        assert "(required)" in text


def test_progress_is_plain_lines_when_stderr_is_not_a_terminal(tmp_path):
    ddf = np.zeros((8, 8, 8, 3), np.float32)
    nib.save(nib.Nifti1Image(ddf, np.eye(4)), str(tmp_path / "ddf.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), str(tmp_path / "img.nii.gz"))
    proc = subprocess.run([sys.executable, "-c", AS_CONSOLE_SCRIPT, "warp", "--image", str(tmp_path / "img.nii.gz"),
                           "--ddf", str(tmp_path / "ddf.nii.gz"), "--out", str(tmp_path / "w.nii.gz")],
                          capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr
    steps = [ln for ln in proc.stderr.splitlines() if ln.startswith("warp img.nii.gz: ")]
    assert [ln.split(": ")[1].split()[0] for ln in steps] == ["1/3", "2/3", "3/3"]
    assert "read MONAI DDF" in steps[0] and steps[-1].endswith("w.nii.gz")
    assert "field: MONAI DDF (voxels along the array axes)" in proc.stdout


def _blob_volume(shape, centre):
    i = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"), -1)
    return np.exp(-np.sum(((i - centre) / np.array([6.0, 5.0, 4.0])) ** 2, -1)).astype(np.float32)


def test_register_prealign_writes_composite_that_warp_applies(tmp_path):
    torch.manual_seed(0)
    sd = monai_ipear.iPEAR(spatial_dims=3).state_dict()
    for k in sd:
        if ".cl3.conv." in k:
            sd[k] = sd[k] * (0.05 if k.endswith("weight") else 0.0)
    torch.save(sd, tmp_path / "model.pt")
    fixed_aff = np.diag([1.5, 1.5, 1.5, 1.0])
    moving_aff = np.diag([1.2, 1.2, 1.2, 1.0])
    moving_aff[:3, 3] = [-3.0, 2.0, 1.0]
    fixed = _blob_volume((24, 24, 24), np.array([11.5, 12.0, 11.0]))
    moving = _blob_volume((30, 30, 30), np.array([16.0, 13.0, 14.0]))
    nib.save(nib.Nifti1Image(fixed, fixed_aff), str(tmp_path / "f.nii.gz"))
    nib.save(nib.Nifti1Image(moving, moving_aff), str(tmp_path / "m.nii.gz"))
    out = tmp_path / "out"
    assert cli_main(["register", "--fixed", str(tmp_path / "f.nii.gz"), "--moving", str(tmp_path / "m.nii.gz"),
                     "--model", str(tmp_path / "model.pt"), "--out-dir", str(out), "--prealign", "affine",
                     "--device", "cpu"]) == 0
    composite = out / "m_to_f_composite.h5"
    assert composite.is_file() and (out / "m_to_f_ddf_itk.nii.gz").is_file()
    # one step (composite on the ORIGINAL moving image) vs register's two steps (affine resampling, then the DDF)
    assert cli_main(["warp", "--image", str(tmp_path / "m.nii.gz"), "--ddf", str(composite),
                     "--out", str(tmp_path / "one_step.nii.gz")]) == 0
    one = nib.load(str(tmp_path / "one_step.nii.gz"))
    two = nib.load(str(out / "m_to_f_warped.nii.gz"))
    assert np.allclose(one.affine, fixed_aff, atol=1e-5) and one.shape == two.shape
    inner = (slice(3, -3),) * 3
    diff = np.abs(one.get_fdata() - two.get_fdata())[inner]
    assert diff.max() < 0.02, diff.max()  # only the second interpolation of the two-step path differs
    assert np.abs(two.get_fdata() - fixed)[inner].mean() < np.abs(
        nib.load(str(tmp_path / "m.nii.gz")).get_fdata()[:24, :24, :24] - fixed)[inner].mean()
