"""Fields for ITK, SimpleITK and ANTs: the written ITK displacement field and composite transform, applied by those
tools, equal the project's own warp on an oblique, anisotropic grid (interior, 1e-4)."""

import importlib.util

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.blocks import Warp

import itk
from monai_ipear.cli import cli_main as main
from monai_ipear.itk_fields import (
    apply_field,
    ddf_to_itk_displacement,
    read_field,
    write_itk_composite,
    write_itk_displacement_field,
)

TOL = 1e-4
SHAPE = (20, 18, 16)
INTERIOR = (slice(4, -4),) * 3


def _rotation(ax, ay, az):
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _affine(spacing, angles, origin):
    a = np.eye(4)
    a[:3, :3] = _rotation(*np.radians(angles)) @ np.diag(spacing)
    a[:3, 3] = origin
    return a


FIXED_AFFINE = _affine((1.0, 1.6, 2.3), (20, -15, 30), (-12.0, 30.0, 5.0))  # oblique, anisotropic


def _smooth_image(shape, phase=0.0):
    i = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    return (np.sin(i[0] / 3.0 + phase) * np.cos(i[1] / 4.0) + 0.3 * np.sin(i[2] / 2.5)).astype(np.float32)


def _smooth_ddf(shape, amplitude=2.0):
    i = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    return torch.from_numpy(
        (amplitude * np.stack([np.sin(i[1] / 5.0 + k) * np.cos(i[2] / 6.0 + 0.5 * k) for k in range(3)])).astype(np.float32))


def _project_warp(image, ddf):
    return Warp("bilinear", "zeros")(torch.from_numpy(image)[None, None], ddf[None])[0, 0].numpy()


def _itk_image(array, affine):
    """An ITK float image of the (x, y, z) ``array`` with the voxel-to-RAS ``affine`` (geometry in LPS)."""
    img = itk.image_from_array(np.ascontiguousarray(np.transpose(array, (2, 1, 0)).astype(np.float32)))
    flip = np.diag([-1.0, -1.0, 1.0])
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    img.SetSpacing([float(v) for v in spacing])
    img.SetOrigin([float(v) for v in flip @ affine[:3, 3]])
    img.SetDirection(itk.matrix_from_array(np.ascontiguousarray(flip @ affine[:3, :3] / spacing)))
    return img


def _save_nifti(array, affine, path):
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine), str(path))
    return str(path)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("itk_fields")
    moving = _smooth_image(SHAPE)
    ddf = _smooth_ddf(SHAPE)
    field = write_itk_displacement_field(ddf, FIXED_AFFINE, root / "f_ddf_itk.nii.gz")
    return {"root": root, "moving": moving, "ddf": ddf, "field": field, "ours": _project_warp(moving, ddf)}


def test_itk_field_file_format(case):
    img = nib.load(case["field"])
    assert img.shape == SHAPE + (1, 3)
    assert int(img.header["intent_code"]) == 1007
    assert np.allclose(img.affine, FIXED_AFFINE, atol=1e-5)
    # a shift of one voxel along array axis 0 is the first column of the affine, in LPS millimetres
    shift = torch.zeros((3,) + SHAPE)
    shift[0] = 1.0
    d = ddf_to_itk_displacement(shift, FIXED_AFFINE)
    assert np.allclose(d[3, 4, 5], np.diag([-1, -1, 1]) @ FIXED_AFFINE[:3, 0])
    assert np.allclose(np.linalg.norm(d[3, 4, 5]), 1.0)  # spacing along axis 0 is 1.0 mm
    shift[0], shift[2] = 0.0, 1.0
    assert np.allclose(np.linalg.norm(ddf_to_itk_displacement(shift, FIXED_AFFINE)[0, 0, 0]), 2.3)


def test_itk_resampler_applies_the_field_like_the_project_warp(case):
    moving = _itk_image(case["moving"], FIXED_AFFINE)
    field = itk.ImageFileReader[itk.Image[itk.Vector[itk.F, 3], 3]].New(FileName=case["field"])
    field.Update()
    warp = itk.WarpImageFilter[type(moving), type(moving), itk.Image[itk.Vector[itk.F, 3], 3]].New(
        Input=moving, DisplacementField=field.GetOutput())
    warp.SetOutputParametersFromImage(moving)
    warp.Update()
    itk_result = np.transpose(itk.array_from_image(warp.GetOutput()), (2, 1, 0))
    diff = np.abs(itk_result - case["ours"])[INTERIOR].max()
    assert diff < TOL, diff
    # the field does move the image (the comparison is not between two unwarped images)
    assert np.abs(case["ours"] - case["moving"])[INTERIOR].max() > 0.3


def test_read_field_and_apply_field_reproduce_the_voxel_warp(case):
    loaded = read_field(case["field"])
    assert loaded.kind == "itk-displacement" and loaded.spatial_shape == SHAPE
    assert np.allclose(loaded.affine, FIXED_AFFINE, atol=1e-5)
    out = apply_field(torch.from_numpy(case["moving"])[None], FIXED_AFFINE, loaded.points)[0].numpy()
    assert np.abs(out - case["ours"]).max() < TOL  # everywhere, borders included


def _prealigned_case(root):
    """A moving image on its own grid and an affine A (fixed physical -> moving physical, LPS), as ITK uses."""
    moving_affine = _affine((1.3, 1.1, 1.8), (-10, 25, 5), (-20.0, 25.0, -4.0))
    moving_shape = (40, 44, 32)  # covers the fixed field of view: the comparison is not about border handling
    moving = _smooth_image(moving_shape, phase=0.4)
    affine = itk.AffineTransform[itk.D, 3].New()
    affine.SetCenter([1.0, -2.0, 3.0])
    m = _rotation(*np.radians([4.0, -3.0, 6.0])) @ np.diag([1.05, 0.97, 1.02])
    affine.SetMatrix(itk.matrix_from_array(np.ascontiguousarray(m)))
    # the fixed grid's centre maps to the moving grid's centre
    centre = lambda a, s: np.diag([-1.0, -1.0, 1.0]) @ (a[:3, :3] @ ((np.array(s) - 1) / 2.0) + a[:3, 3])  # noqa: E731
    c_fix, c_mov = centre(FIXED_AFFINE, SHAPE), centre(moving_affine, moving_shape)
    affine.SetTranslation([float(v) for v in c_mov - (m @ (c_fix - [1.0, -2.0, 3.0]) + [1.0, -2.0, 3.0])])
    tfm = str(root / "affine.tfm")
    itk.transformwrite([affine], tfm)
    return moving, moving_affine, tfm


def _composite_warped_by_us(case, tmp_path):
    """The pre-aligned case's composite (affine + the case's field) written, and the original moving image warped
    by it in one step with the project's ``warp`` command: ``(moving, moving_affine, tfm, composite, moving_path,
    ours)``, ``ours`` the warped array on the fixed grid."""
    moving, moving_affine, tfm = _prealigned_case(tmp_path)
    comp = write_itk_composite(tfm, case["field"], str(tmp_path / "composite.h5"))
    moving_path = _save_nifti(moving, moving_affine, tmp_path / "moving.nii.gz")
    assert main(["warp", "--image", moving_path, "--ddf", comp, "--out", str(tmp_path / "ours.nii.gz")]) == 0
    ours = nib.load(str(tmp_path / "ours.nii.gz"))
    assert np.allclose(ours.affine, FIXED_AFFINE, atol=1e-5) and ours.shape == SHAPE
    return moving, moving_affine, tfm, comp, moving_path, ours.get_fdata()


def test_composite_transform_with_itk_equals_project_warp(case, tmp_path):
    # the project's warp reads the composite and applies it in one step to the ORIGINAL moving image
    moving, moving_affine, tfm, comp, _, ours = _composite_warped_by_us(case, tmp_path)
    # ITK: the composite read back and applied by ITK's resampler onto the fixed grid
    transform = itk.transformread(comp)[0]
    fixed_ref = _itk_image(np.zeros(SHAPE), FIXED_AFFINE)
    res = itk.resample_image_filter(_itk_image(moving, moving_affine), transform=transform, use_reference_image=True,
                                    reference_image=fixed_ref)
    itk_result = np.transpose(itk.array_from_image(res), (2, 1, 0))
    diff = np.abs(itk_result - ours)[INTERIOR].max()
    assert diff < TOL, diff
    # and the one-step composite agrees with the two steps register makes (affine resampling, then the DDF), up to
    # the second interpolation of the two-step path
    pre = itk.resample_image_filter(_itk_image(moving, moving_affine), transform=itk.transformread(tfm)[0],
                                    use_reference_image=True, reference_image=fixed_ref)
    two_step = _project_warp(np.ascontiguousarray(np.transpose(itk.array_from_image(pre), (2, 1, 0))), case["ddf"])
    assert np.abs(two_step - ours)[INTERIOR].max() < 0.05
    assert np.abs(ours - moving[: SHAPE[0], : SHAPE[1], : SHAPE[2]])[INTERIOR].max() > 0.3  # the images differ


def test_warp_reads_each_form_and_says_which(case, tmp_path, capsys):
    fixed_path = _save_nifti(case["moving"], FIXED_AFFINE, tmp_path / "img.nii.gz")
    ddf_vox = _save_nifti(np.moveaxis(case["ddf"].numpy(), 0, -1), FIXED_AFFINE, tmp_path / "p_ddf.nii.gz")
    outs = {}
    for name, field, extra in (("ddf", ddf_vox, ["--itk-field", str(tmp_path / "conv_itk.nii.gz")]),
                               ("itk", case["field"], [])):
        assert main(["warp", "--image", fixed_path, "--ddf", field, "--out", str(tmp_path / f"{name}.nii.gz")] + extra) == 0
        outs[name] = nib.load(str(tmp_path / f"{name}.nii.gz")).get_fdata()
    printed = capsys.readouterr().out
    assert "field: MONAI DDF (voxels along the array axes)" in printed
    assert "field: ITK displacement field (LPS millimetres)" in printed
    assert np.abs(outs["ddf"] - case["ours"]).max() < 1e-6
    assert np.abs(outs["itk"] - outs["ddf"]).max() < TOL
    # the converted field is the same file content as the writer's
    a, b = nib.load(str(tmp_path / "conv_itk.nii.gz")), nib.load(case["field"])
    assert np.allclose(a.get_fdata(), b.get_fdata(), atol=1e-6) and np.allclose(a.affine, b.affine)


def test_itk_field_2d(tmp_path):
    shape = (24, 20)
    aff = np.eye(4)
    c, s = np.cos(0.4), np.sin(0.4)
    aff[:2, :2] = np.array([[c, -s], [s, c]]) @ np.diag([1.2, 0.8])
    aff[:2, 3] = [3.0, -7.0]
    i = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    img = (np.sin(i[0] / 3.0) * np.cos(i[1] / 4.0)).astype(np.float32)
    ddf = torch.from_numpy((1.5 * np.stack([np.sin(i[1] / 5.0), np.cos(i[0] / 6.0)])).astype(np.float32))
    path = write_itk_displacement_field(ddf, aff, tmp_path / "f2_itk.nii.gz")
    assert int(nib.load(path).header["intent_code"]) == 1007
    loaded = read_field(path)
    ours = Warp("bilinear", "zeros")(torch.from_numpy(img)[None, None], ddf[None])[0, 0].numpy()
    out = apply_field(torch.from_numpy(img)[None], aff, loaded.points)[0].numpy()
    assert np.abs(out - ours)[3:-3, 3:-3].max() < TOL


def test_simpleitk_applies_field_and_composite(case, tmp_path):
    if importlib.util.find_spec("SimpleITK") is None:
        pytest.skip("SimpleITK is not installed (optional): pip install SimpleITK to compare with it")
    import SimpleITK as sitk

    def to_sitk(array, affine):
        ref = _itk_image(array, affine)
        img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0)).astype(np.float32)))
        img.SetOrigin(tuple(ref.GetOrigin()))
        img.SetSpacing(tuple(ref.GetSpacing()))
        img.SetDirection(tuple(itk.array_from_matrix(ref.GetDirection()).ravel()))
        return img

    moving = to_sitk(case["moving"], FIXED_AFFINE)
    field = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(case["field"]), sitk.sitkVectorFloat64))
    res = np.transpose(sitk.GetArrayFromImage(sitk.Resample(moving, moving, field, sitk.sitkLinear, 0.0)), (2, 1, 0))
    assert np.abs(res - case["ours"])[INTERIOR].max() < TOL

    moving_arr, moving_affine, _, comp, _, ours = _composite_warped_by_us(case, tmp_path)
    res = sitk.Resample(to_sitk(moving_arr, moving_affine), to_sitk(np.zeros(SHAPE), FIXED_AFFINE),
                        sitk.ReadTransform(comp), sitk.sitkLinear, 0.0)
    assert np.abs(np.transpose(sitk.GetArrayFromImage(res), (2, 1, 0)) - ours)[INTERIOR].max() < TOL


def test_ants_applies_field_and_composite(case, tmp_path):
    if importlib.util.find_spec("ants") is None:
        pytest.skip("antspyx is not installed (optional; it pins older numpy/scipy): pip install antspyx to compare")
    import ants

    moving_path = _save_nifti(case["moving"], FIXED_AFFINE, tmp_path / "m.nii.gz")
    img = ants.image_read(moving_path)
    res = ants.apply_transforms(fixed=img, moving=img, transformlist=[case["field"]], interpolator="linear").numpy()
    assert np.abs(res - case["ours"])[INTERIOR].max() < TOL

    _, _, tfm, comp, mpath, ours = _composite_warped_by_us(case, tmp_path)
    fixed = ants.image_read(_save_nifti(np.zeros(SHAPE), FIXED_AFFINE, tmp_path / "f.nii.gz"))
    res = ants.apply_transforms(fixed=fixed, moving=ants.image_read(mpath), transformlist=[comp],
                                interpolator="linear").numpy()
    assert np.abs(res - ours)[INTERIOR].max() < TOL
    # the two files register writes beside the composite, field then affine (antsApplyTransforms -t F -t A): the same
    res = ants.apply_transforms(fixed=fixed, moving=ants.image_read(mpath), transformlist=[case["field"], tfm],
                                interpolator="linear").numpy()
    assert np.abs(res - ours)[INTERIOR].max() < TOL
