"""The papers' gradient smoothness term against known fields, and against MONAI's DiffusionLoss."""

import pytest
import torch
from monai.losses import DiffusionLoss

from monai_ipear.losses import GradientSmoothnessLoss, RegistrationLoss


def _linear_field(spatial_dims: int, size: int, a: float) -> torch.Tensor:
    """Channel 0 = a * x_0 (a stretch along axis 0), other channels 0."""
    x = torch.arange(size, dtype=torch.float32).view(size, *([1] * (spatial_dims - 1)))
    u = torch.zeros(2, spatial_dims, *([size] * spatial_dims))
    u[:, 0] = a * x.expand(*([size] * spatial_dims))
    return u


def _checkerboard(spatial_dims: int, size: int, amplitude: float) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.arange(size)] * spatial_dims, indexing="ij")
    parity = (sum(grids) % 2).float()
    return (amplitude * parity).expand(1, spatial_dims, *parity.shape).clone()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_gradient_loss_on_a_linear_field(spatial_dims):
    # forward differences: a on channel 0 along axis 0, zero elsewhere -> mean a^2 / D per axis term, / D over axes
    a = 0.5
    loss = GradientSmoothnessLoss()(_linear_field(spatial_dims, 12, a))
    assert loss.item() == pytest.approx(a**2 / spatial_dims**2, rel=1e-6)
    assert GradientSmoothnessLoss("l1")(_linear_field(spatial_dims, 12, a)).item() == pytest.approx(
        a / spatial_dims**2, rel=1e-6
    )


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_gradient_loss_sees_a_checkerboard_that_diffusion_misses(spatial_dims):
    # every forward difference of a period-2 checkerboard is +-amplitude: the loss is amplitude^2
    u = _checkerboard(spatial_dims, 8, 1 / 3)
    assert GradientSmoothnessLoss()(u).item() == pytest.approx(1 / 9, rel=1e-6)
    # MONAI's DiffusionLoss takes central differences, which vanish on it
    assert DiffusionLoss()(u).item() == pytest.approx(0.0, abs=1e-7)


def test_diffusion_is_spatial_dims_times_stronger_on_a_smooth_field():
    u = _linear_field(3, 16, 0.3)
    ratio = DiffusionLoss()(u) / GradientSmoothnessLoss()(u)
    assert ratio.item() == pytest.approx(3.0, rel=1e-3)


def test_registration_loss_uses_the_gradient_term_by_default_and_weights_it():
    torch.manual_seed(0)
    fixed = torch.rand(1, 1, 16, 16, 16)
    ddf = _linear_field(3, 16, 0.2)[:1]
    default = RegistrationLoss(smooth_weight=2.0)
    total = default(fixed, fixed, ddf)
    assert default.last_terms["regularization"] == pytest.approx(0.04 / 9, rel=1e-5)
    assert total.item() == pytest.approx(default.last_terms["similarity"] + 2.0 * 0.04 / 9, rel=1e-5)
    diffusion = RegistrationLoss(regularization="diffusion")
    diffusion(fixed, fixed, ddf)
    assert diffusion.last_terms["regularization"] == pytest.approx(3 * 0.04 / 9, rel=1e-3)
    with pytest.raises(ValueError, match="regularization"):
        RegistrationLoss(regularization="bending")
