"""The registration pipeline behind ``register`` and the bundle's pipeline run, and the packaged model file.

Tiny synthetic "brains" (an ellipsoid with an asymmetric texture, defined in world millimetres) are sampled on
grids in axial, coronal and sagittal storage with anisotropic spacing; the moving scan is the same brain under a
known affine and a known smooth deformation, in other intensity units. The learned model cannot be expected to
recover a given deformation, so a stand-in network returns the known deformation (expressed on the pipeline's
working grid); the affine part comes from the real pre-alignment (elastix).
"""

import contextlib
import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.networks.blocks import Warp

from monai_ipear.cli import cli_main as main
from monai_ipear.pipeline import RegistrationPipeline, index_grid, warp_to_fixed
from monai_ipear.preprocessing.elastix import has_elastix
from monai_ipear.pretrained import DEFAULT_MODEL_PATH, load_pretrained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_elastix = pytest.mark.skipif(not has_elastix(), reason="itk-elastix not installed (pip install itk-elastix)")

# signed permutations: array axis j -> world axis perm[j] with sign
STORAGE = {
    "axial": ((0, 1, 2), (1, 1, 1)),  # RAS
    "coronal": ((0, 2, 1), (1, 1, -1)),  # array axes: x, z, -y
    "sagittal": ((1, 2, 0), (-1, 1, 1)),  # IXI-like PSR: -y, z, x
}
CENTRE = np.array([3.0, -5.0, 8.0])
RADII = np.array([26.0, 31.0, 23.0])


def make_affine(storage: str, spacing, shape, centre=(0.0, 0.0, 0.0)) -> np.ndarray:
    perm, sign = STORAGE[storage]
    a = np.zeros((4, 4))
    for j in range(3):
        a[perm[j], j] = sign[j] * spacing[j]
    a[3, 3] = 1.0
    a[:3, 3] = np.asarray(centre) - a[:3, :3] @ ((np.asarray(shape) - 1) / 2.0)
    return a


def world_points(affine, shape) -> np.ndarray:
    idx = index_grid(shape).numpy().reshape(3, -1).astype(np.float64)
    return (affine[:3, :3] @ idx + affine[:3, 3:]).reshape(3, *shape)


def brain(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Phantom intensity (arbitrary units) and brain mask at world points ``x`` ``(3, ...)``."""
    q = (x - CENTRE.reshape(3, *[1] * (x.ndim - 1))) / RADII.reshape(3, *[1] * (x.ndim - 1))
    r2 = (q ** 2).sum(0)
    inside = 1.0 / (1.0 + np.exp(-12.0 * (0.8 - r2)))  # dark rim inside the mask, as CSF around a brain

    def blob(c, s):
        c = np.asarray(c, dtype=float).reshape(3, *[1] * (x.ndim - 1))
        return np.exp(-((x - c) ** 2).sum(0) / (2 * s * s))

    tex = 0.55 + 0.35 * blob((15, 5, 15), 9) - 0.3 * blob((-8, -15, 2), 7) + 0.25 * blob((-12, 10, 16), 6) \
        - 0.35 * blob((2, -3, 10), 5) + 0.3 * blob((10, -20, -5), 6) + 0.15 * np.sin(x[0] / 6.0) * np.cos(x[1] / 8.0)
    return 10.0 + 100.0 * inside * tex, r2 < 1.0


def deformation(x: np.ndarray, amplitude: float) -> np.ndarray:
    """A smooth displacement (mm) at world points ``x``."""
    return amplitude * np.stack([np.sin(x[1] / 4.0 + 0.3), np.cos(x[2] / 5.0) * np.sin(x[0] / 4.5),
                                 np.sin((x[0] + x[1]) / 4.0)])  # periods ~25-30 mm: little for an affine to absorb


def true_map(x: np.ndarray, affine_true: np.ndarray, amplitude: float) -> np.ndarray:
    """Fixed world -> moving world: ``A (x + d(x))``."""
    y = x + deformation(x, amplitude)
    return np.einsum("ij,j...->i...", affine_true[:3, :3], y) + affine_true[:3, 3].reshape(3, 1, 1, 1)


def inverse_map(z: np.ndarray, affine_true: np.ndarray, amplitude: float) -> np.ndarray:
    inv = np.linalg.inv(affine_true)
    y = np.einsum("ij,j...->i...", inv[:3, :3], z) + inv[:3, 3].reshape(3, 1, 1, 1)
    x = y.copy()
    for _ in range(30):  # fixed point of x + d(x) = y (d is a contraction here)
        x = y - deformation(x, amplitude)
    return x


def rotation(deg_x, deg_y, deg_z, scale=1.0, shift=(0.0, 0.0, 0.0)) -> np.ndarray:
    rx, ry, rz = np.deg2rad([deg_x, deg_y, deg_z])
    mx = np.array([[1, 0, 0], [0, np.cos(rx), -np.sin(rx)], [0, np.sin(rx), np.cos(rx)]])
    my = np.array([[np.cos(ry), 0, np.sin(ry)], [0, 1, 0], [-np.sin(ry), 0, np.cos(ry)]])
    mz = np.array([[np.cos(rz), -np.sin(rz), 0], [np.sin(rz), np.cos(rz), 0], [0, 0, 1]])
    a = np.eye(4)
    a[:3, :3] = scale * mz @ my @ mx
    a[:3, 3] = shift
    return a


def make_pair(fixed_storage, fixed_spacing, moving_storage, moving_spacing, affine_true, amplitude,
              fov=(84.0, 92.0, 80.0), moving_gain=(3.0, 50.0)):
    f_shape = tuple(int(round(fov[STORAGE[fixed_storage][0][j]] / fixed_spacing[j])) for j in range(3))
    m_shape = tuple(int(round(fov[STORAGE[moving_storage][0][j]] / moving_spacing[j])) for j in range(3))
    a_f = make_affine(fixed_storage, fixed_spacing, f_shape, centre=(1.0, -2.0, 3.0))
    a_m = make_affine(moving_storage, moving_spacing, m_shape, centre=(4.0, -6.0, 9.0))
    f_val, f_mask = brain(world_points(a_f, f_shape))
    m_val, m_mask = brain(inverse_map(world_points(a_m, m_shape), affine_true, amplitude))
    gain, offset = moving_gain
    mt = lambda arr, aff: MetaTensor(torch.as_tensor(arr, dtype=torch.float32)[None], affine=torch.as_tensor(aff))
    return {"fixed": mt(f_val, a_f), "fixed_mask": mt(f_mask, a_f), "moving": mt(gain * m_val + offset, a_m),
            "moving_mask": mt(m_mask, a_m), "moving_label": mt(m_mask * (1 + (m_val > 50)), a_m),
            "affine_true": affine_true, "amplitude": amplitude}


class ZeroField(torch.nn.Module):
    def forward(self, moving, fixed):
        return torch.zeros(moving.shape[0], moving.ndim - 2, *moving.shape[2:])


class KnownField(torch.nn.Module):
    """Returns the known deformation ``d`` (world mm) as a field on the pipeline's working grid (voxels)."""

    def __init__(self, amplitude):
        super().__init__()
        self.amplitude, self.pipeline = amplitude, None

    def forward(self, moving, fixed):
        a_w = self.pipeline.last["working_affine"]
        x = world_points(a_w, moving.shape[2:])
        d = deformation(x, self.amplitude)
        u = np.einsum("ij,j...->i...", np.linalg.inv(a_w[:3, :3]), d)
        self.last_iterations = torch.tensor([[1, 2, 3, 4]])
        return torch.as_tensor(u, dtype=torch.float32)[None]


def expected_field(pair) -> np.ndarray:
    a_f = np.asarray(pair["fixed"].affine, dtype=np.float64)
    shape = pair["fixed"].shape[1:]
    z = true_map(world_points(a_f, shape), pair["affine_true"], pair["amplitude"])
    inv = np.linalg.inv(a_f)
    p = np.einsum("ij,j...->i...", inv[:3, :3], z) + inv[:3, 3].reshape(3, 1, 1, 1)
    return p - index_grid(shape).numpy()


def ncc(a, b, mask):
    a, b = a[mask], b[mask]
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


CASES = [  # fixed storage, fixed spacing (anisotropic), moving storage, moving spacing
    ("axial", (1.5, 2.5, 2.0), "sagittal", (2.0, 2.0, 2.0)),
    ("coronal", (2.0, 1.6, 2.4), "axial", (2.5, 2.0, 1.5)),
    ("sagittal", (2.0, 2.0, 2.0), "coronal", (1.6, 2.2, 2.0)),
]


@needs_elastix
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_known_affine_and_deformation_recovered_end_to_end(case):
    f_st, f_sp, m_st, m_sp = case
    pair = make_pair(f_st, f_sp, m_st, m_sp, rotation(6.0, -4.0, 8.0, 1.04, (5.0, -4.0, 3.0)), amplitude=1.5)
    net = KnownField(pair["amplitude"])
    pipe = RegistrationPipeline(network=net, prealign="affine", device="cpu")
    net.pipeline = pipe
    out = pipe(pair["fixed"], pair["moving"], pair["fixed_mask"], pair["moving_mask"], pair["moving_label"])
    mask = pair["fixed_mask"][0].numpy() > 0
    a_f = np.asarray(pair["fixed"].affine)
    to_mm = lambda field: np.linalg.norm(np.einsum("ij,j...->i...", a_f[:3, :3], field), axis=0)[mask]
    # 1. the known deformation is carried exactly through every grid: with the estimated affine T,
    #    A_F (x + ddf(x)) == T (A_F x + d(A_F x)) (only trilinear interpolation of the working field differs)
    carried = dict(pair, affine_true=out["prealign"])
    assert to_mm(out["ddf"].numpy() - expected_field(carried)).max() < 0.5
    # 2. the affine is recovered by the pre-alignment (on a deformed image: within 3/4 of a working voxel, 2 mm)
    err = to_mm(out["ddf"].numpy() - expected_field(pair))
    assert err.mean() < 1.5 and np.percentile(err, 95) < 2.5, (err.mean(), np.percentile(err, 95))
    untreated = to_mm(-expected_field(pair))  # the displacement to recover: several mm
    assert untreated.mean() > 4.0 * err.mean()
    warped = out["warped_image"][0].numpy()
    assert ncc(warped, pair["fixed"][0].numpy(), mask) > 0.9
    assert out["iterations"] == [1, 2, 3, 4] and out["ddf"].shape == (3, *mask.shape)
    assert out["folding_pct"] == 0.0
    assert "updates per level 1..4: 1/2/3/4" in out["summary"]


@needs_elastix
def test_affine_prealignment_alone_recovers_a_known_affine():
    pair = make_pair("sagittal", (2.0, 2.0, 2.0), "axial", (1.8, 2.2, 2.0),
                     rotation(-7.0, 5.0, 10.0, 0.95, (-6.0, 5.0, 4.0)), amplitude=0.0)
    out = RegistrationPipeline(network=ZeroField(), device="cpu")(pair["fixed"], pair["moving"], pair["fixed_mask"],
                                                                   pair["moving_mask"])
    mask = pair["fixed_mask"][0].numpy() > 0
    a_f = np.asarray(pair["fixed"].affine)
    err = np.linalg.norm(np.einsum("ij,j...->i...", a_f[:3, :3], out["ddf"].numpy() - expected_field(pair)), axis=0)[mask]
    untreated = np.linalg.norm(np.einsum("ij,j...->i...", a_f[:3, :3], expected_field(pair)), axis=0)[mask]
    # elastix (Mattes MI, the training data's pre-alignment) within about half a working voxel (2 mm) on this
    # small phantom, where the motion to recover is about 10 mm
    assert err.mean() < 1.2 and np.percentile(err, 95) < 2.0, (err.mean(), np.percentile(err, 95))
    assert untreated.mean() > 8.0
    # the world map fixed -> moving: rotation/scale entries within 0.05, translation within 1.5 mm
    assert np.abs(out["prealign"][:3, :3] - pair["affine_true"][:3, :3]).max() < 0.05
    assert np.abs(out["prealign"][:3, 3] - pair["affine_true"][:3, 3]).max() < 1.5


def test_composed_field_reproduces_warped_image_and_keeps_units(tmp_path):
    """Moving on the fixed grid: ``Warp`` with the written field == the written warped image; values in the
    moving file's own units; the written affine is the fixed file's."""
    pair = make_pair("sagittal", (2.0, 2.0, 2.0), "sagittal", (2.0, 2.0, 2.0), np.eye(4), amplitude=2.0,
                     moving_gain=(2.5, 400.0))
    a_f = np.asarray(pair["fixed"].affine)
    moving_on_fixed = pair["moving"].clone()
    moving_on_fixed.affine = torch.as_tensor(a_f)  # same grid as the fixed image (centres differ by design above)
    net = KnownField(2.0)
    pipe = RegistrationPipeline(network=net, prealign="none", device="cpu")
    net.pipeline = pipe
    out = pipe(pair["fixed"], moving_on_fixed, pair["fixed_mask"], None, None)
    paths = pipe.write(out, str(tmp_path), "pair")
    warped_file = nib.load(paths["warped"])
    ddf_file = nib.load(paths["ddf"])
    assert np.allclose(warped_file.affine, a_f, atol=1e-5) and np.allclose(ddf_file.affine, a_f, atol=1e-5)
    ddf = torch.as_tensor(ddf_file.get_fdata(), dtype=torch.float32).permute(3, 0, 1, 2)
    by_warp = Warp("bilinear", "zeros")(moving_on_fixed.as_tensor()[None], ddf[None])[0, 0].numpy()
    assert np.allclose(by_warp, warped_file.get_fdata(), rtol=1e-5, atol=1e-2)  # float32 of values ~700
    # units: the warped intensities are the moving file's (gain 2.5, offset 400), not [0, 1]
    mask = pair["fixed_mask"][0].numpy() > 0
    assert warped_file.get_fdata()[mask].min() >= 399.0 and warped_file.get_fdata().max() > 500.0
    # identity: no pre-alignment, zero field -> the moving image itself, exactly
    ident = RegistrationPipeline(network=ZeroField(), prealign="none", device="cpu")(pair["fixed"], moving_on_fixed)
    assert torch.allclose(ident["warped_image"], moving_on_fixed.as_tensor(), atol=1e-3)
    assert float(ident["ddf"].abs().max()) < 1e-4


@needs_elastix
def test_field_warps_the_raw_moving_file_on_another_grid(tmp_path):
    """IXI-like: raw moving file on its own grid (same shape, other affine): ``warp`` with the written field
    (the CLI command) reproduces the written warped image and label."""
    pair = make_pair("sagittal", (2.0, 2.0, 2.0), "sagittal", (2.0, 2.0, 2.0), rotation(5, 0, -6, 1.0, (4, 3, -2)),
                     amplitude=1.5)
    files = {}
    for k in ("fixed", "moving", "fixed_mask", "moving_mask", "moving_label"):
        files[k] = str(tmp_path / f"{k}.nii.gz")
        arr = pair[k][0].numpy()
        nib.save(nib.Nifti1Image(arr.astype(np.int16 if "mask" in k or "label" in k else np.float32),
                                 np.asarray(pair[k].affine)), files[k])
    net = KnownField(1.5)
    pipe = RegistrationPipeline(network=net, device="cpu")
    net.pipeline = pipe
    written = pipe.run_files(files["fixed"], files["moving"], str(tmp_path / "out"), files["fixed_mask"],
                             files["moving_mask"], files["moving_label"])
    assert written["warped"].endswith("moving_to_fixed_warped.nii.gz")
    fixed_affine = nib.load(files["fixed"]).affine
    for key in ("warped", "ddf", "warped_label"):
        assert np.allclose(nib.load(written[key]).affine, fixed_affine, atol=1e-5), key
    assert nib.load(written["warped_label"]).get_data_dtype() == np.int16
    for image, out_name, extra in ((files["moving"], "w.nii.gz", []), (files["moving_label"], "l.nii.gz", ["--label"])):
        assert main(["warp", "--image", image, "--ddf", written["ddf"], "--out", str(tmp_path / out_name)] + extra) == 0
    assert np.allclose(nib.load(str(tmp_path / "w.nii.gz")).get_fdata(), nib.load(written["warped"]).get_fdata(), rtol=1e-5, atol=1e-2)
    assert np.array_equal(nib.load(str(tmp_path / "l.nii.gz")).get_fdata(), nib.load(written["warped_label"]).get_fdata())
    summary = json.loads(open(written["summary_json"]).read())
    assert summary["iterations_per_level"] == [1, 2, 3, 4] and summary["summary"] == written["summary"]
    # the same composed field for ITK (5D vector NIfTI, intent 1007, LPS mm): ITK's resampler applies it to the raw
    # moving file on its own grid and gives the written warped image (inside the brain; borders: padding differs)
    import itk

    itk_file = nib.load(written["ddf_itk"])
    assert itk_file.shape == pair["fixed"].shape[1:] + (1, 3) and int(itk_file.header["intent_code"]) == 1007
    field = itk.imread(written["ddf_itk"])
    transform = itk.DisplacementFieldTransform[itk.D, 3].New()
    field_d = itk.image_from_array(itk.array_from_image(field).astype(np.float64), is_vector=True)
    field_d.CopyInformation(field)
    transform.SetDisplacementField(field_d)
    by_itk = itk.resample_image_filter(itk.imread(files["moving"], itk.F), transform=transform,
                                       use_reference_image=True, reference_image=itk.imread(files["fixed"], itk.F))
    by_itk = np.transpose(itk.array_from_image(by_itk), (2, 1, 0))
    mask = pair["fixed_mask"][0].numpy() > 0
    warped = nib.load(written["warped"]).get_fdata()
    assert np.abs(by_itk - warped)[mask].max() < 1e-5 * np.abs(warped[mask]).max(), np.abs(by_itk - warped)[mask].max()
    assert np.abs(warped - nib.load(files["moving"]).get_fdata())[mask].max() > 10.0  # the field moves the image


def test_warp_to_fixed_equals_monai_warp_on_the_same_grid():
    g = torch.Generator().manual_seed(0)
    img = MetaTensor(torch.rand(2, 9, 10, 11, generator=g), affine=torch.as_tensor(make_affine("coronal", (1, 2, 3), (9, 10, 11))))
    ddf = 2.0 * torch.randn(3, 9, 10, 11, generator=g)
    for mode in ("bilinear", "nearest"):
        ours = warp_to_fixed(img, ddf, img.affine, mode)
        ref = Warp(mode, "zeros")(img.as_tensor()[None], ddf[None])[0]
        assert torch.allclose(ours, ref, atol=1e-5), mode


def test_shipped_weights_load_and_give_a_finite_field():
    assert os.path.isfile(DEFAULT_MODEL_PATH) and os.path.getsize(DEFAULT_MODEL_PATH) < 3 * 2**20
    obj = torch.load(DEFAULT_MODEL_PATH, map_location="cpu", weights_only=True)
    assert all(v.dtype == torch.float16 for v in obj["state_dict"].values() if torch.is_floating_point(v))
    with open(os.path.splitext(DEFAULT_MODEL_PATH)[0] + ".json") as f:
        meta_json = json.load(f)
    assert meta_json == {k: v for k, v in obj.items() if k != "state_dict"}
    assert meta_json["spacing"] == [2.0, 2.0, 2.0] and meta_json["preprocessing"]["intensity"]["upper_percentile"] == 99.5
    with pytest.warns(UserWarning, match="placeholder") if obj.get("placeholder") else _nothing():
        net, meta = load_pretrained()
    assert type(net).__name__ == meta["network"] == "iPEAR"
    assert all(p.dtype == torch.float32 for p in net.parameters())
    g = torch.Generator().manual_seed(0)
    moving, fixed = torch.rand(1, 1, 32, 32, 32, generator=g), torch.rand(1, 1, 32, 32, 32, generator=g)
    with torch.no_grad():
        ddf = net(moving, fixed)
    assert ddf.shape == (1, 3, 32, 32, 32) and bool(torch.isfinite(ddf).all())
    assert net.last_iterations.shape == (1, 4) and int(net.last_iterations.min()) >= 1


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_register_cli_uses_the_packaged_model_and_bundle_runs_the_same_pipeline(tmp_path, capsys):
    pair = make_pair("sagittal", (2.0, 2.0, 2.0), "axial", (2.0, 2.0, 2.0), np.eye(4), amplitude=1.0,
                     fov=(60.0, 70.0, 56.0))
    files = {}
    for k in ("fixed", "moving", "fixed_mask", "moving_mask"):
        files[k] = str(tmp_path / f"{k}.nii.gz")
        nib.save(nib.Nifti1Image(pair[k][0].numpy().astype(np.float32), np.asarray(pair[k].affine)), files[k])
    out = tmp_path / "cli"
    capsys.readouterr()
    rc = main(["register", "--fixed", files["fixed"], "--moving", files["moving"], "--fixed-mask", files["fixed_mask"],
               "--moving-mask", files["moving_mask"], "--prealign", "none", "--out-dir", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert rc == 0
    line = [ln for ln in printed.splitlines() if ln.startswith("summary: ")]
    assert len(line) == 1 and "updates per level 1..4" in line[0] and "folding" in line[0]
    assert sorted(os.listdir(out)) == ["moving_to_fixed_ddf.nii.gz", "moving_to_fixed_ddf_itk.nii.gz",
                                       "moving_to_fixed_summary.json", "moving_to_fixed_warped.nii.gz"]
    assert np.allclose(nib.load(str(out / "moving_to_fixed_ddf.nii.gz")).affine, nib.load(files["fixed"]).affine, atol=1e-5)
    from monai.bundle import run

    bundle_out = tmp_path / "bundle"
    run(config_file=os.path.join(REPO, "configs", "inference.json"), bundle_root=str(tmp_path), device="cpu",
        fixed_image=files["fixed"], moving_image=files["moving"], fixed_mask=files["fixed_mask"],
        moving_mask=files["moving_mask"], prealign="none", output_dir=str(bundle_out),
        meta_file=os.path.join(REPO, "configs", "metadata.json"), logging_file=os.path.join(REPO, "configs", "logging.conf"))
    for suffix in ("ddf", "ddf_itk", "warped"):
        a = nib.load(str(out / f"moving_to_fixed_{suffix}.nii.gz")).get_fdata()
        b = nib.load(str(bundle_out / f"moving_to_fixed_{suffix}.nii.gz")).get_fdata()
        assert np.allclose(a, b, atol=1e-5), suffix
    # masks only with the packaged model; unknown --prealign refused
    assert main(["register", "--fixed", files["fixed"], "--moving", files["moving"], "--prealign", "rigid",
                 "--out-dir", str(out)]) == 2


@needs_elastix
def test_pretrained_comparison_command_on_tiny_subjects(tmp_path, capsys):
    from monai_ipear.studies.pretrained_comparison import comparison_main, format_comparison, run_comparison

    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    shape = (40, 36, 42)
    for k, a_true in enumerate([np.eye(4), rotation(4, -3, 5, 1.03, (3, -2, 2)), rotation(-5, 2, -4, 0.97, (-3, 2, -1))]):
        a = make_affine("sagittal", (2.0, 2.0, 2.0), shape, centre=(2.0 * k, -3.0, 1.0))
        x = inverse_map(world_points(a, shape), a_true, 0.0)
        val, mask = brain(x)
        lab = mask * (1 + (x[0] > CENTRE[0]) + 2 * (x[1] > CENTRE[1]) + 4 * (val > 70))
        nib.save(nib.Nifti1Image((2.0 * val).astype(np.float32), a), str(tmp_path / "images" / f"s{k}_T1.nii.gz"))
        nib.save(nib.Nifti1Image(lab.astype(np.int16), a), str(tmp_path / "labels" / f"s{k}_label.nii.gz"))
    subjects = [{"image": str(tmp_path / "images" / f"s{k}_T1.nii.gz"), "label": str(tmp_path / "labels" / f"s{k}_label.nii.gz")}
                for k in range(3)]
    # the learned part is a zero field here (the placeholder weights are random and slow to iterate)
    pipe = RegistrationPipeline(network=ZeroField(), device="cpu")
    result = run_comparison(subjects, pipeline=pipe, elastix_iterations=16, max_pairs=1, log=lambda *_: None)
    text = format_comparison(result, "cmd")
    assert set(result["rows"]) == {"register", "elastix-affine", "elastix-bspline"} and len(result["pairs"]) == 1
    for m in ("register", "elastix-affine", "elastix-bspline"):
        assert len(result["rows"][m]) == 1
        for r in result["rows"][m]:
            assert 0.0 <= r["dice"] <= 1.0 and r["time_s"] > 0 and 0.0 <= r["folding_pct"] <= 100.0 and r["labels"] >= 4
    # affine registration of these affinely related subjects overlaps the labels well, through both code paths
    for m in ("register", "elastix-affine"):
        assert statistics_mean([r["dice"] for r in result["rows"][m]]) > 0.75, m
    assert "| elastix affine + B-spline |" in text and "time / register" in text
    assert "ANTs SyN: " in text  # used, or skipped with the reason
    # the command: subject discovery, Markdown and JSON outputs
    out = tmp_path / "cmp.md"
    res = comparison_main(["--data-dir", str(tmp_path), "--last", "2", "--methods", "elastix-affine", "--max-pairs", "1",
                           "--elastix-iterations", "8", "--out", str(out)])
    assert res["pairs"] == ["s2_T1_to_s1_T1"] and "| elastix affine |" in out.read_text()
    assert json.loads((tmp_path / "cmp.json").read_text())["pairs"] == res["pairs"]
    # register-autocast: the same network under autocast, its agreement with register in a note
    spy = _PrecisionSpy()
    pipe = RegistrationPipeline(network=spy, device="cpu")
    both = run_comparison(subjects, ["register", "register-autocast"], pipeline=pipe, max_pairs=2, log=lambda *_: None)
    assert spy.seen == [(False, None), (True, torch.bfloat16)] * 2 and pipe.autocast is False
    text = format_comparison(both)
    assert "| `register --autocast` (packaged iPEAR, TCI, bfloat16 autocast, affine pre-alignment) |" in text
    assert "`--autocast` against float32, pair by pair: largest Dice difference 0.0000 (mean 0.0000)" in text
    # a registration that raises mid-loop (here the autocast row) leaves the caller's pipeline at its own setting
    pipe = RegistrationPipeline(network=_FailsUnderAutocast(), device="cpu")
    with pytest.raises(RuntimeError, match="under autocast"):
        run_comparison(subjects, ["register", "register-autocast"], pipeline=pipe, max_pairs=1, log=lambda *_: None)
    assert pipe.autocast is False
    # ``iterations`` reaches the network during the comparison only; the caller's controller comes back, also when a
    # registration raises
    for network, raises in ((_PrecisionSpy(), False), (_FailsUnderAutocast(), True)):
        own = network.controller = object()
        pipe = RegistrationPipeline(network=network, device="cpu")
        with pytest.raises(RuntimeError, match="under autocast") if raises else contextlib.nullcontext():
            run_comparison(subjects, ["register", "register-autocast"], pipeline=pipe, max_pairs=1, log=lambda *_: None,
                           iterations=2)
        assert [type(c).__name__ for c in network.controllers_seen] == ["FixedIterations"] * (1 if raises else 2)
        assert network.controllers_seen[0].k_max == 2 and network.controller is own


def statistics_mean(values):
    return float(np.mean(values))


def test_register_iterations_option_sets_the_updates_per_level(tmp_path, capsys):
    """``--iterations k``: k updates at every level (the summary says so, and the field is the network's under
    FixedIterations(k), also through the bundle's register run); anything else is a one-line error."""
    from monai_ipear import FixedIterations
    from monai_ipear.pipeline import RegistrationPipeline

    pair = make_pair("axial", (2.0, 2.0, 2.0), "axial", (2.0, 2.0, 2.0), np.eye(4), amplitude=1.0, fov=(48.0, 56.0, 48.0))
    files = {k: str(tmp_path / f"{k}.nii.gz") for k in ("fixed", "moving")}
    for k, path in files.items():
        nib.save(nib.Nifti1Image(pair[k][0].numpy().astype(np.float32), np.asarray(pair[k].affine)), path)
    fields = {}
    for spec in ("1", "2"):
        out = tmp_path / f"k{spec}"
        assert main(["register", "--fixed", files["fixed"], "--moving", files["moving"], "--prealign", "none",
                     "--out-dir", str(out), "--device", "cpu", "--iterations", spec]) == 0
        summary = json.loads((out / "moving_to_fixed_summary.json").read_text())
        assert summary["iterations_per_level"] == [int(spec)] * 4, summary
        fields[spec] = nib.load(str(out / "moving_to_fixed_ddf.nii.gz")).get_fdata()
    assert np.abs(fields["1"] - fields["2"]).max() > 1e-3  # the option reached the network
    direct = RegistrationPipeline(prealign="none", device="cpu")
    direct.network.controller = FixedIterations(2)
    result = direct(files["fixed"], files["moving"])
    assert np.allclose(np.moveaxis(result["ddf"].numpy(), 0, -1), fields["2"], atol=1e-4)
    from monai.bundle import run  # the bundle's register run takes the same setting

    run(config_file=os.path.join(REPO, "configs", "inference.json"), bundle_root=str(tmp_path), device="cpu",
        fixed_image=files["fixed"], moving_image=files["moving"], prealign="none", output_dir=str(tmp_path / "bundle"),
        meta_file=os.path.join(REPO, "configs", "metadata.json"), logging_file=os.path.join(REPO, "configs", "logging.conf"),
        **{"registration_pipeline#iterations": 2})
    assert np.allclose(nib.load(str(tmp_path / "bundle" / "moving_to_fixed_ddf.nii.gz")).get_fdata(), fields["2"], atol=1e-5)
    capsys.readouterr()
    assert main(["register", "--fixed", files["fixed"], "--moving", files["moving"], "--out-dir", str(tmp_path / "x"),
                 "--iterations", "0"]) == 2
    assert "--iterations: iterations must be 'tci' or a whole number" in capsys.readouterr().err


class _PrecisionSpy(torch.nn.Module):
    """A stand-in network that records whether it ran under autocast, and in which dtype; returns a zero field in
    the autocast dtype (as a network's convolutions would)."""

    def __init__(self):
        super().__init__()
        self.seen = []
        self.controllers_seen = []

    def forward(self, moving, fixed):
        on = torch.is_autocast_enabled("cpu")
        self.seen.append((on, torch.get_autocast_dtype("cpu") if on else None))
        if hasattr(self, "controller"):  # a test gave it iteration control: which controller ran
            self.controllers_seen.append(self.controller)
        return torch.zeros(moving.shape[0], 3, *moving.shape[2:], dtype=torch.bfloat16 if on else torch.float32)


class _FailsUnderAutocast(_PrecisionSpy):
    def forward(self, moving, fixed):
        if torch.is_autocast_enabled("cpu"):
            raise RuntimeError("fails under autocast")
        return super().forward(moving, fixed)


def test_autocast_option_runs_the_network_in_reduced_precision(tmp_path, capsys):
    """``autocast``: the pipeline's and the evaluator's network calls run under bfloat16 autocast on CPU (fields come
    back float32); override strings are read as booleans ('false' stays off); ``register --autocast`` and the
    bundle's ``autocast`` give the same field, which differs from float32 by rounding only."""
    from types import SimpleNamespace

    from monai_ipear.engines import RegistrationEvalIteration

    pair = make_pair("axial", (2.0, 2.0, 2.0), "axial", (2.0, 2.0, 2.0), np.eye(4), amplitude=1.0, fov=(48.0, 56.0, 48.0))
    for flag, expected in ((True, (True, torch.bfloat16)), ("false", (False, None)), ("true", (True, torch.bfloat16))):
        spy = _PrecisionSpy()
        out = RegistrationPipeline(network=spy, prealign="none", device="cpu", autocast=flag)(pair["fixed"], pair["moving"])
        assert spy.seen == [expected] and out["working_ddf"].dtype == torch.float32
        spy = _PrecisionSpy()
        engine = SimpleNamespace(network=spy, amp=flag, state=SimpleNamespace(device=torch.device("cpu")))
        batch = {"moving_image": torch.rand(1, 1, 8, 8, 8), "fixed_image": torch.rand(1, 1, 8, 8, 8)}
        assert RegistrationEvalIteration()(engine, batch)["ddf"].dtype == torch.float32 and spy.seen == [expected]
    with pytest.raises(ValueError, match="autocast must be a boolean"):
        RegistrationPipeline(network=_PrecisionSpy(), prealign="none", device="cpu", autocast="maybe")

    files = {k: str(tmp_path / f"{k}.nii.gz") for k in ("fixed", "moving")}
    for k, path in files.items():
        nib.save(nib.Nifti1Image(pair[k][0].numpy().astype(np.float32), np.asarray(pair[k].affine)), path)
    fields = {}
    for name, extra in (("fp32", []), ("bf16", ["--autocast"])):
        out = tmp_path / name
        assert main(["register", "--fixed", files["fixed"], "--moving", files["moving"], "--prealign", "none",
                     "--out-dir", str(out), "--device", "cpu", "--iterations", "2"] + extra) == 0
        fields[name] = nib.load(str(out / "moving_to_fixed_ddf.nii.gz")).get_fdata()
    difference = np.abs(fields["fp32"] - fields["bf16"]).max()
    assert 1e-6 < difference < 0.5, difference  # reduced precision reached the network; rounding, not a new field
    from monai.bundle import run

    run(config_file=os.path.join(REPO, "configs", "inference.json"), bundle_root=str(tmp_path), device="cpu",
        fixed_image=files["fixed"], moving_image=files["moving"], prealign="none", output_dir=str(tmp_path / "bundle"),
        meta_file=os.path.join(REPO, "configs", "metadata.json"), logging_file=os.path.join(REPO, "configs", "logging.conf"),
        autocast=True, **{"registration_pipeline#iterations": 2})
    assert np.allclose(nib.load(str(tmp_path / "bundle" / "moving_to_fixed_ddf.nii.gz")).get_fdata(), fields["bf16"], atol=1e-5)
    capsys.readouterr()
    assert main(["register", "--fixed", files["fixed"], "--moving", files["moving"], "--out-dir", str(tmp_path / "x"),
                 "--autocast", "maybe"]) == 2
    assert "--autocast must be a boolean" in capsys.readouterr().err


def test_comparison_table_names_the_register_iteration_control():
    from monai_ipear.studies.pretrained_comparison import format_comparison

    row = {"dice": 0.7, "hd95": 3.0, "folding_pct": 0.05, "time_s": 1.5, "iterations": [2, 2, 2, 2]}
    result = {"rows": {"register": [row, row]}, "notes": [], "pairs": ["a_to_b", "b_to_a"]}
    assert "`register` (packaged iPEAR, TCI, affine pre-alignment) |" in format_comparison(result)
    for k, label in (("2", "`register --iterations 2` (packaged iPEAR, 2 updates per level"), ("tci", ", TCI, ")):
        assert label in format_comparison({**result, "register_iterations": k})
    # --model: the row names the file, not the packaged model
    named = format_comparison({**result, "register_model": "tuned.pt"})
    assert "`register` (iPEAR `tuned.pt`, TCI, affine pre-alignment) |" in named and "packaged" not in named
    assert "(iPEAR `tuned.pt`, 4 updates per level" in format_comparison(
        {**result, "register_model": "tuned.pt", "register_iterations": "4"})


def test_export_writes_the_training_facts_onto_the_model_card(tmp_path):
    # `python -m monai_ipear.pretrained`: learning rates and decoder passes as given (the packaged model's card says
    # which steps were unrolled), a checkpoint dict's model weights, the float16 agreement check
    from monai_ipear.networks import iPEAR
    from monai_ipear.pretrained import export_main

    torch.manual_seed(1)
    ckpt = tmp_path / "checkpoint.pt"
    torch.save({"model": iPEAR(spatial_dims=3).state_dict(), "optimizer": {}}, ckpt)
    out = tmp_path / "model.pt"
    meta = export_main(["--checkpoint", str(ckpt), "--out", str(out), "--steps", "12", "--lr", "1e-4, then 3e-5",
                        "--passes", "one pass per level for steps 1-6, then unrolled under TCI", "--check-shape",
                        "16x16x16"])
    recipe = meta["training"]["recipe"]
    assert "Adam lr 1e-4, then 3e-5" in recipe and recipe.endswith("one pass per level for steps 1-6, then unrolled under TCI")
    assert meta["training"]["steps"] == 12 and meta["placeholder"] is False
    assert 0 <= meta["fp16_field_difference"]["max_abs_voxels"] < 0.1
    loaded, meta2 = load_pretrained(str(out))
    assert meta2["training"]["recipe"] == recipe
    assert meta["training"]["recipe"].count("decoder pass") == 0  # the default wording is replaced, not appended
    default = export_main(["--placeholder", "--out", str(tmp_path / "p.pt"), "--check-shape", "16x16x16"])
    assert default["training"]["recipe"].endswith("batch 1, one decoder pass per level")
