"""Hardening: bad inputs through the bundle transforms / networks / metrics and through the CLI.

Every test here is a row of ``docs/reliability.md``.
"""

import hashlib
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric

import monai_ipear
from monai_ipear.cli import cli_main as main
from monai_ipear.data import SameGridCheckd, SyntheticPairGenerator, load_registration_pairs, registration_pair_transforms
from monai_ipear.engines import RegistrationOutputWriter
from monai_ipear.metrics import pair_registration_metrics

AFFINE = np.array([[1.2, 0.0, 0.0, 10.0], [0.0, 1.0, 0.0, -5.0], [0.0, 0.0, 1.5, 3.0], [0, 0, 0, 1.0]])
SIZE = 16


def _sha(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _save(array, path, affine=AFFINE):
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A synthetic pair on an anisotropic grid (1.2 x 1.0 x 1.5 mm) and a small-field iPEAR model."""
    root = tmp_path_factory.mktemp("rel")
    p = SyntheticPairGenerator(SIZE, num_labels=3, max_displacement=3.0)(0)
    files = {
        "fixed": _save(200.0 * p["fixed_image"][0].numpy(), root / "fix.nii.gz"),
        "moving": _save(200.0 * p["moving_image"][0].numpy(), root / "mov.nii.gz"),
        "label": _save(p["moving_label"][0].numpy().astype(np.int16), root / "mov_seg.nii.gz"),
        "fixed_label": _save(p["fixed_label"][0].numpy().astype(np.int16), root / "fix_seg.nii.gz"),
    }
    torch.manual_seed(0)
    sd = monai_ipear.iPEAR(spatial_dims=3).state_dict()
    for k in sd:  # small, non-zero fields
        if ".cl3.conv." in k:
            sd[k] = sd[k] * (0.05 if k.endswith("weight") else 0.0)
    files["model"] = str(root / "model.pt")
    torch.save(sd, files["model"])
    return root, files


def _register(files, fixed, moving, out_dir, *extra):
    return main(["register", "--fixed", str(fixed), "--moving", str(moving), "--model", files["model"],
                 "--out-dir", str(out_dir), "--device", "cpu", *extra])


def _one_error(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def _chain(exc) -> str:
    """The messages of an exception and its causes (MONAI wraps transform errors in 'applying transform ...')."""
    parts = []
    while exc is not None:
        parts.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    return " | ".join(parts)


def _transform_error(item, **kwargs) -> str:
    with pytest.raises(RuntimeError) as info:
        registration_pair_transforms(**kwargs)(item)
    return _chain(info.value)


def _pair_item(files, **over):
    item = {"moving_image": files["moving"], "fixed_image": files["fixed"], "moving_label": files["label"],
            "fixed_label": files["fixed_label"]}
    item.update(over)
    return {k: v for k, v in item.items() if v is not None}


# ---------------------------------------------------------------- missing / corrupt files


def test_missing_nifti_is_refused_by_transforms_and_cli(data, tmp_path, capsys):
    root, files = data
    missing = str(tmp_path / "nope.nii.gz")
    with pytest.raises(RuntimeError) as info:
        registration_pair_transforms()(_pair_item(files, moving_image=missing))
    assert "nope.nii.gz" in _chain(info.value)
    capsys.readouterr()
    assert _register(files, files["fixed"], missing, tmp_path / "out") == 2
    assert "moving file not found" in _one_error(capsys)
    assert not (tmp_path / "out").exists()  # nothing written


def test_corrupt_nifti_is_refused_by_transforms_and_cli(data, tmp_path, capsys):
    root, files = data
    good = open(files["moving"], "rb").read()
    bad = tmp_path / "trunc.nii.gz"
    bad.write_bytes(good[: len(good) // 2])  # a truncated gzip stream: a download cut short
    with pytest.raises(RuntimeError) as info:
        registration_pair_transforms()(_pair_item(files, moving_image=str(bad)))
    assert "trunc.nii.gz" in _chain(info.value) or "EOFError" in _chain(info.value)
    capsys.readouterr()
    assert _register(files, files["fixed"], bad, tmp_path / "out") == 2
    assert "cannot read moving file" in _one_error(capsys)


# ---------------------------------------------------------------- grids


def test_different_grid_shapes_are_refused(data, tmp_path, capsys):
    root, files = data
    other = _save(np.random.default_rng(0).random((SIZE, SIZE, 20)).astype(np.float32), tmp_path / "other.nii.gz")
    assert "ValueError: moving_image (16, 16, 20) and fixed_image (16, 16, 16) are not on the same voxel grid" in \
        _transform_error(_pair_item(files, moving_image=other, moving_label=None))
    capsys.readouterr()
    assert _register(files, files["fixed"], other, tmp_path / "out") == 2
    assert "--prealign affine" in _one_error(capsys)


def test_same_shape_different_affine_is_refused(data, tmp_path, capsys):
    """Same array shape, origin shifted by 7 mm: registering the arrays would be silently wrong geometry."""
    root, files = data
    shifted = AFFINE.copy()
    shifted[0, 3] += 7.0
    moved = _save(nib.load(files["moving"]).get_fdata().astype(np.float32), tmp_path / "shifted.nii.gz", shifted)
    item = _pair_item(files, moving_image=moved)
    item.pop("moving_label")
    assert "ValueError: moving_image and fixed_image have the same shape but different affines" in _transform_error(item)
    capsys.readouterr()
    assert _register(files, files["fixed"], moved, tmp_path / "out") == 2
    assert "different affines" in _one_error(capsys)
    # the check can be switched off, and a pair on one grid passes it unchanged
    assert registration_pair_transforms(check_grid=False)(item)["moving_image"].shape == (1, SIZE, SIZE, SIZE)
    same = registration_pair_transforms()(_pair_item(files))
    assert torch.allclose(same["moving_image"].affine.double(), torch.as_tensor(AFFINE))


def test_label_on_another_grid_than_its_image_is_refused(data, tmp_path):
    root, files = data
    lab = _save(np.zeros((SIZE, SIZE, SIZE), np.int16), tmp_path / "lab.nii.gz", np.eye(4))
    assert "moving_label and fixed_image have the same shape but different affines" in \
        _transform_error(_pair_item(files, moving_label=lab))
    # the transform alone, on MetaTensors
    from monai.data import MetaTensor

    a = MetaTensor(torch.zeros(1, 4, 4), affine=torch.eye(4))
    b = MetaTensor(torch.zeros(1, 4, 4), affine=torch.diag(torch.tensor([2.0, 1.0, 1.0, 1.0])))
    assert SameGridCheckd(["moving_image"])({"moving_image": a, "fixed_image": a.clone()})["moving_image"] is a
    with pytest.raises(ValueError):
        SameGridCheckd(["moving_image"])({"moving_image": b, "fixed_image": a})


def test_anisotropic_spacing_ddf_in_mm_is_voxel_ddf_times_spacing(data, tmp_path):
    """On the 1.2 x 1.0 x 1.5 mm grid the same registration saved in mm is the voxel field scaled per axis,
    and every output carries the fixed image's (anisotropic) affine."""
    root, files = data
    assert _register(files, files["fixed"], files["moving"], tmp_path / "vox") == 0
    assert _register(files, files["fixed"], files["moving"], tmp_path / "mm", "--ddf-units", "mm") == 0
    vox = nib.load(str(tmp_path / "vox" / "mov_to_fix_ddf.nii.gz"))
    mm = nib.load(str(tmp_path / "mm" / "mov_to_fix_ddf.nii.gz"))
    assert np.allclose(vox.affine, AFFINE, atol=1e-5) and np.allclose(mm.affine, AFFINE, atol=1e-5)
    v = vox.get_fdata()
    assert np.abs(v).max() > 0.01
    assert np.allclose(mm.get_fdata(), v * np.array([1.2, 1.0, 1.5]), atol=1e-4)


# ---------------------------------------------------------------- image content


def test_4d_image_is_refused_with_the_channel_count(data, tmp_path, capsys):
    root, files = data
    four = _save(np.random.default_rng(0).random((SIZE, SIZE, SIZE, 2)).astype(np.float32), tmp_path / "t.nii.gz")
    d = registration_pair_transforms()(_pair_item(files, moving_image=four, moving_label=None, fixed_label=None))
    assert d["moving_image"].shape == (2, SIZE, SIZE, SIZE)  # the 4th axis becomes channels
    with pytest.raises(ValueError, match="must have 1 channel"):
        monai_ipear.iPEAR(spatial_dims=3)(d["moving_image"][None], d["moving_image"][:1][None].expand(1, 2, -1, -1, -1))
    capsys.readouterr()
    assert _register(files, files["fixed"], four, tmp_path / "out") == 2
    assert "channel" in _one_error(capsys)


def test_nan_voxels_are_refused(data, tmp_path, capsys):
    root, files = data
    img = nib.load(files["moving"]).get_fdata().astype(np.float32)
    img[3, 4, 5] = np.nan
    nan_file = _save(img, tmp_path / "nan.nii.gz")
    net = monai_ipear.iPEAR(spatial_dims=3)
    x = torch.as_tensor(img)[None, None]
    with pytest.raises(ValueError, match="NaN or Inf"):
        net(x, torch.zeros_like(x))
    capsys.readouterr()
    assert _register(files, files["fixed"], nan_file, tmp_path / "out") == 2
    assert "NaN or Inf" in _one_error(capsys)
    assert not any(f.endswith("_ddf.nii.gz") for f in os.listdir(tmp_path / "out"))  # no half result written


def test_all_zero_images_register_to_finite_outputs(data, tmp_path):
    root, files = data
    zero = _save(np.zeros((SIZE, SIZE, SIZE), np.float32), tmp_path / "zero.nii.gz")
    d = registration_pair_transforms()({"moving_image": zero, "fixed_image": zero})
    assert torch.equal(d["moving_image"], torch.zeros(1, SIZE, SIZE, SIZE))  # min-max scaling gives 0, not NaN
    assert _register(files, zero, zero, tmp_path / "out") == 0
    for suffix in ("warped", "ddf"):
        arr = nib.load(str(tmp_path / "out" / f"zero_to_zero_{suffix}.nii.gz")).get_fdata()
        assert np.isfinite(arr).all(), suffix
    assert np.abs(nib.load(str(tmp_path / "out" / "zero_to_zero_warped.nii.gz")).get_fdata()).max() == 0.0


def test_constant_or_nan_images_are_refused_before_the_affine_prealignment(data, tmp_path, capsys):
    """The pre-aligning paths (the packaged model's pipeline, ``register --prealign affine`` with bundle weights)
    refuse a constant image, a NaN voxel and an empty mask with one line naming the image, before elastix runs
    (which failed with an "internal elastix error" there) and before anything is written; the pipeline also
    names a 4D series and an image of the wrong dimension (before: MONAI's orientation errors)."""
    from monai_ipear.pipeline import RegistrationPipeline

    root, files = data
    good = nib.load(files["moving"]).get_fdata().astype(np.float32)
    zero = _save(np.zeros_like(good), tmp_path / "zero.nii.gz")
    grey = _save(np.full_like(good, 7.0), tmp_path / "grey.nii.gz")
    nan = good.copy()
    nan[3, 4, 5] = np.nan
    nan = _save(nan, tmp_path / "nan.nii.gz")
    cases = [(files["fixed"], zero, "moving image", "constant (every voxel 0)"),
             (grey, files["moving"], "fixed image", "constant (every voxel 7)"),
             (files["fixed"], nan, "moving image", "non-finite values (NaN/Inf in 0.0244 %")]
    for fixed, moving, who, what in cases:
        capsys.readouterr()
        out = tmp_path / f"out_{os.path.basename(moving)}_{os.path.basename(fixed)}"
        assert _register(files, fixed, moving, out, "--prealign", "affine") == 2
        err = _one_error(capsys)
        assert who in err and what in err, err
        assert not out.exists()  # nothing written
    # the packaged pipeline (as `register` without --model runs it): the same check, and an empty mask
    pipe = RegistrationPipeline(device="cpu")
    load = RegistrationPipeline.load
    empty = _save(np.zeros_like(good, dtype=np.uint8), tmp_path / "empty_mask.nii.gz")
    series = _save(np.stack([good, good], -1), tmp_path / "series.nii.gz")  # (x, y, z, t): volumes as channels
    flat = _save(good[:, :, 5], tmp_path / "slice.nii.gz")
    for kwargs, error, text in [
        ({"fixed": files["fixed"], "moving": series}, ValueError, r"the moving image holds 2 volumes or channels"),
        ({"fixed": flat, "moving": files["moving"]}, ValueError, r"the fixed image is 2D .* registers 3D images\."),
        ({"fixed": files["fixed"], "moving": zero}, ValueError, "the moving image is constant"),
        ({"fixed": nan, "moving": files["moving"]}, FloatingPointError, "the fixed image holds non-finite"),
        ({"fixed": files["fixed"], "moving": files["moving"], "moving_mask": empty}, ValueError,
         "the moving image inside its mask is constant"),
    ]:
        with pytest.raises(error, match=text):
            pipe(**{k: load(v) for k, v in kwargs.items()})
    # the bundle transforms keep row 9's behaviour: a constant image is registered to finite outputs
    # (test_all_zero_images_register_to_finite_outputs)


def test_tiny_volume_is_refused(data, tmp_path, capsys):
    root, files = data
    tiny = _save(np.random.default_rng(0).random((6, 6, 6)).astype(np.float32), tmp_path / "tiny.nii.gz")
    with pytest.raises(ValueError, match="too small"):
        monai_ipear.iPEAR(spatial_dims=3)(torch.rand(1, 1, 6, 6, 6), torch.rand(1, 1, 6, 6, 6))
    capsys.readouterr()
    assert _register(files, tiny, tiny, tmp_path / "out") == 2
    assert "too small" in _one_error(capsys)


def test_odd_sized_volume_keeps_its_grid(data, tmp_path):
    """15 x 13 x 11 (not divisible by 8): the network pads and crops; outputs are on the input grid."""
    root, files = data
    img = nib.load(files["moving"]).get_fdata()[:15, :13, :11].astype(np.float32)
    fix = nib.load(files["fixed"]).get_fdata()[:15, :13, :11].astype(np.float32)
    m, f = _save(img, tmp_path / "m.nii.gz"), _save(fix, tmp_path / "f.nii.gz")
    assert _register(files, f, m, tmp_path / "out") == 0
    ddf = nib.load(str(tmp_path / "out" / "m_to_f_ddf.nii.gz"))
    warped = nib.load(str(tmp_path / "out" / "m_to_f_warped.nii.gz"))
    assert ddf.shape == (15, 13, 11, 3) and warped.shape == (15, 13, 11)
    assert np.allclose(ddf.affine, AFFINE, atol=1e-5) and np.isfinite(ddf.get_fdata()).all()


# ---------------------------------------------------------------- labels and Dice


def test_float_valued_label_maps_give_the_integer_results(data, tmp_path):
    """Label maps stored as float (with rounding noise) warp and score exactly like the integer maps."""
    root, files = data
    lab = nib.load(files["label"]).get_fdata()
    noisy = (lab + np.random.default_rng(0).uniform(-0.2, 0.2, lab.shape)).astype(np.float32)
    float_lab = _save(noisy, tmp_path / "float_seg.nii.gz")
    assert _register(files, files["fixed"], files["moving"], tmp_path / "int", "--moving-label", files["label"]) == 0
    assert _register(files, files["fixed"], files["moving"], tmp_path / "flt", "--moving-label", float_lab) == 0
    wi = nib.load(str(tmp_path / "int" / "mov_to_fix_warped_label.nii.gz"))
    wf = nib.load(str(tmp_path / "flt" / "mov_to_fix_warped_label.nii.gz"))
    assert wf.get_data_dtype() == np.uint8 and np.array_equal(wi.get_fdata(), wf.get_fdata())
    fixed_lab = torch.as_tensor(nib.load(files["fixed_label"]).get_fdata())[None, None]
    ddf = torch.zeros(1, 3, SIZE, SIZE, SIZE)
    as_int = pair_registration_metrics(ddf, warped_label=torch.as_tensor(lab)[None, None], fixed_label=fixed_lab,
                                       surface=False)
    as_float = pair_registration_metrics(ddf, warped_label=torch.as_tensor(noisy)[None, None], fixed_label=fixed_lab,
                                         surface=False)
    assert as_int == as_float and 0.0 < as_int["dice_mean"] < 1.0


def test_labels_absent_from_one_image_do_not_nan_poison_dice():
    fixed = torch.zeros(1, 1, 16, 16)
    fixed[..., :8, :8], fixed[..., 8:, 8:], fixed[..., :4, 12:] = 1, 2, 3
    warped = fixed.clone()
    warped[warped == 3] = 0  # label 3 missing from the warped map
    warped[..., 12:, :4] = 5  # label 5 only in the warped map
    ddf = torch.zeros(1, 2, 16, 16)
    # default: labels present in both maps (1, 2)
    m = pair_registration_metrics(ddf, warped_label=warped, fixed_label=fixed, surface=True)
    assert m["dice_mean"] == 1.0 and "dice_3" not in m and np.isfinite(m["hd95_mean"])
    # an explicit label list: 3 scores 0 (missed), 4 (absent from both) and 5 (absent from fixed) are NaN and skipped
    m = pair_registration_metrics(ddf, warped_label=warped, fixed_label=fixed, labels=[1, 2, 3, 4, 5], surface=False)
    assert m["dice_3"] == 0.0 and np.isnan(m["dice_4"]) and np.isnan(m["dice_5"])
    assert m["dice_mean"] == pytest.approx(2.0 / 3.0)
    # the metric behind the bundle's validation MeanDice handler (one-hot over num_classes): also finite,
    # the mean over classes 1, 2, 3 (0 for the missed label; 4 and 5 are empty in the fixed map and ignored)
    metric = DiceMetric(include_background=False, num_classes=6, reduction="mean")
    metric(warped, fixed)
    assert metric.aggregate().item() == pytest.approx(2.0 / 3.0)


def test_datalist_with_one_subject_is_refused(tmp_path):
    with pytest.raises(ValueError, match="at least 2 subjects"):
        load_registration_pairs({"training": [{"image": "a.nii.gz"}]}, str(tmp_path))
    with pytest.raises(ValueError, match="no 'validation' list"):
        load_registration_pairs({"training": []}, str(tmp_path), split="validation")


# ---------------------------------------------------------------- never overwrite inputs


def test_output_folder_equal_to_input_folder_keeps_inputs(data, tmp_path):
    root, files = data
    folder = tmp_path / "in"
    folder.mkdir()
    inputs = {k: _save(nib.load(files[k]).get_fdata().astype(np.float32), folder / os.path.basename(files[k]))
              for k in ("fixed", "moving", "label")}
    before = {k: _sha(p) for k, p in inputs.items()}
    assert _register(files, inputs["fixed"], inputs["moving"], folder, "--moving-label", inputs["label"]) == 0
    assert {k: _sha(p) for k, p in inputs.items()} == before
    assert (folder / "mov_to_fix_warped.nii.gz").is_file() and (folder / "mov_to_fix_warped_label.nii.gz").is_file()


def test_outputs_that_would_replace_an_input_are_refused(data, tmp_path, capsys):
    root, files = data
    folder = tmp_path / "in"
    folder.mkdir()
    fixed = _save(nib.load(files["fixed"]).get_fdata().astype(np.float32), folder / "fix.nii.gz")
    moving = _save(nib.load(files["moving"]).get_fdata().astype(np.float32), folder / "mov.nii.gz")
    # an input label map whose name is exactly the output name of the warped label
    trap = _save(nib.load(files["label"]).get_fdata().astype(np.int16), folder / "mov_to_fix_warped_label.nii.gz")
    before = _sha(trap)
    capsys.readouterr()
    assert _register(files, fixed, moving, folder, "--moving-label", trap) == 2
    assert "refusing to overwrite the input file" in _one_error(capsys)
    assert _sha(trap) == before
    # warp / jacobian: --out equal to an input
    ddf = np.zeros((SIZE, SIZE, SIZE, 3), np.float32)
    ddf_file = _save(ddf, folder / "ddf.nii.gz")
    before = {p: _sha(p) for p in (moving, ddf_file)}
    for argv in (["warp", "--image", moving, "--ddf", ddf_file, "--out", moving],
                 ["warp", "--image", moving, "--ddf", ddf_file, "--out", ddf_file],
                 ["jacobian", "--ddf", ddf_file, "--out", ddf_file]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        assert "refusing to overwrite" in _one_error(capsys)
    assert {p: _sha(p) for p in before} == before


def test_output_writer_refuses_input_paths(tmp_path):
    """The bundle's writer itself (used by inference.json) checks the batch's source files."""
    from types import SimpleNamespace

    from monai.data import MetaTensor

    src = str(tmp_path / "p_warped.nii.gz")
    _save(np.ones((8, 8, 8), np.float32), src)
    before = _sha(src)
    moving = MetaTensor(torch.ones(1, 1, 8, 8, 8), meta={"filename_or_obj": [src]})
    fixed = MetaTensor(torch.ones(1, 1, 8, 8, 8), meta={"filename_or_obj": [str(tmp_path / "f.nii.gz")]})
    engine = SimpleNamespace(state=SimpleNamespace(
        output={"ddf": torch.zeros(1, 3, 8, 8, 8), "warped_image": torch.zeros(1, 1, 8, 8, 8)},
        batch={"moving_image": moving, "fixed_image": fixed, "pair": ["p"]}))
    with pytest.raises(ValueError, match="refusing to overwrite"):
        RegistrationOutputWriter(output_dir=str(tmp_path))(engine)
    assert _sha(src) == before
    RegistrationOutputWriter(output_dir=str(tmp_path / "elsewhere"))(engine)  # another folder: written
    assert (tmp_path / "elsewhere" / "p_warped.nii.gz").is_file()
