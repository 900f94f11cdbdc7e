"""Registration metrics against values computed by hand on tiny volumes."""

import math

import pytest
import torch

from monai_ipear.engines import ddf_to_mm, summarize_rows
from monai_ipear.metrics import folding_percentage, jacobian_determinant, label_overlap_metrics, pair_registration_metrics


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_identity_field_folds_nothing(spatial_dims):
    ddf = torch.zeros(2, spatial_dims, *([12] * spatial_dims))
    det = jacobian_determinant(ddf)
    assert det.shape == (2, 1, *([12] * spatial_dims))
    assert torch.allclose(det, torch.ones_like(det))
    assert torch.equal(folding_percentage(ddf), torch.zeros(2))


def test_affine_field_determinant_is_exact():
    # u(x) = A x  ->  J = I + A everywhere (central and one-sided differences are exact for linear fields)
    a = torch.tensor([[0.1, 0.2, 0.0], [-0.3, 0.05, 0.1], [0.0, 0.2, -0.4]])
    grid = torch.stack(torch.meshgrid(*[torch.arange(10.0)] * 3, indexing="ij"))
    ddf = torch.einsum("ij,j...->i...", a, grid)[None]
    expected = torch.linalg.det(torch.eye(3) + a)
    assert torch.allclose(jacobian_determinant(ddf), expected.expand(1, 1, 10, 10, 10), atol=1e-5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_constructed_fold_gives_known_percentage(spatial_dims):
    # u_0 = -2 x_0 where x_1 < 2 (a quarter of the 8 columns), else 0: det = 1 - 2 = -1 there, 1 elsewhere.
    size = [8] * spatial_dims
    x0 = torch.arange(8.0).view(8, *([1] * (spatial_dims - 1))).expand(*size)
    cols = torch.arange(8).view(1, 8, *([1] * (spatial_dims - 2))).expand(*size)
    ddf = torch.zeros(1, spatial_dims, *size)
    ddf[0, 0] = torch.where(cols < 2, -2.0 * x0, torch.zeros_like(x0))
    det = jacobian_determinant(ddf)[0, 0]
    assert torch.allclose(det[cols < 2], torch.tensor(-1.0))
    assert torch.allclose(det[cols >= 2], torch.tensor(1.0))
    assert folding_percentage(ddf).item() == pytest.approx(25.0)
    mask = (cols < 4)[None, None].float()  # half of the mask folds
    assert folding_percentage(ddf, mask).item() == pytest.approx(50.0)


def test_dice_of_known_overlaps():
    fixed = torch.zeros(1, 8, 8, 8)
    warped = torch.zeros(1, 8, 8, 8)
    fixed[0, 0:4, 0:4, 0:4] = 1  # 64 voxels
    warped[0, 0:4, 0:4, 0:2] = 1  # 32 voxels, all inside -> Dice = 2*32 / 96
    fixed[0, 5:8, 5:8, 5:8] = 2
    warped[0, 5:8, 5:8, 5:8] = 2  # identical -> 1
    warped[0, 7, 0, 0] = 3  # only in the warped map: not scored by default
    res = label_overlap_metrics(warped, fixed, surface=False)
    assert sorted(res) == [1, 2]
    assert res[1]["dice"] == pytest.approx(2 / 3, abs=1e-6)
    assert res[2]["dice"] == pytest.approx(1.0)
    flat = pair_registration_metrics(torch.zeros(1, 3, 8, 8, 8), warped_label=warped[None], fixed_label=fixed[None],
                                     surface=False)
    assert flat["dice_mean"] == pytest.approx((2 / 3 + 1) / 2, abs=1e-6)
    assert flat["folding_pct"] == 0.0


def test_surface_distances_are_spacing_aware():
    fixed = torch.zeros(1, 12, 12, 12)
    warped = torch.zeros(1, 12, 12, 12)
    fixed[0, 3:7, 3:9, 3:9] = 1
    warped[0, 5:9, 3:9, 3:9] = 1  # shifted 2 voxels along axis 0
    same = label_overlap_metrics(fixed, fixed, spacing=[1.0, 1.0, 1.0])[1]
    assert same["hd95"] == pytest.approx(0.0) and same["assd"] == pytest.approx(0.0)
    iso = label_overlap_metrics(warped, fixed, spacing=[1.0, 1.0, 1.0])[1]
    aniso = label_overlap_metrics(warped, fixed, spacing=[2.5, 1.0, 1.0])[1]
    assert iso["hd95"] == pytest.approx(2.0)  # the shifted faces are 2 voxels apart
    assert aniso["hd95"] == pytest.approx(5.0)  # ... 2 voxels of 2.5 mm
    # side-face distances mix axes, so ASSD grows with the axis-0 spacing but by less than its factor
    assert 0 < iso["assd"] < 2.0 and iso["assd"] < aniso["assd"] < 2.5 * iso["assd"]


def test_mse_and_summary_by_hand():
    warped = torch.zeros(1, 1, 4, 4)
    fixed = torch.zeros(1, 1, 4, 4)
    fixed[..., :2, :] = 1.0  # half the pixels differ by 1 -> MSE 0.5
    assert pair_registration_metrics(torch.zeros(1, 2, 4, 4), warped, fixed)["mse"] == pytest.approx(0.5)
    s = summarize_rows([{"pair": "a", "x": 1.0}, {"pair": "b", "x": 3.0}, {"pair": "c", "x": float("nan")}])
    assert s == {"x": {"mean": 2.0, "std": 1.0, "n": 2}}


def test_ddf_to_mm_uses_affine_linear_part():
    ddf = torch.ones(3, 2, 2, 2)
    affine = torch.diag(torch.tensor([2.0, 3.0, 0.5, 1.0], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([10.0, -4.0, 7.0])  # the translation does not move displacements
    mm = ddf_to_mm(ddf, affine)
    assert torch.allclose(mm[:, 0, 0, 0], torch.tensor([2.0, 3.0, 0.5]))
    assert not math.isnan(float(mm.sum()))
