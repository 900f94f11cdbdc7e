"""DDF conventions: translation by a known field, composition, upsampling, padding."""

import pytest
import torch

from monai_ipear.networks.blocks import FieldComposer, crop_to, pad_to_divisible, resize_ddf


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("axis", [0, 1])
def test_known_translation_moves_image_by_that_many_voxels(spatial_dims, axis):
    torch.manual_seed(0)
    size = (12, 10, 9)[:spatial_dims]
    image = torch.rand(2, 1, *size)
    ddf = torch.zeros(2, spatial_dims, *size)
    ddf[:, axis] = 2.0
    warped = FieldComposer("zeros").warp(image, ddf)
    # pull convention: warped(x) = image(x + 2 e_axis)
    n = size[axis]
    assert torch.allclose(warped.narrow(axis + 2, 0, n - 2), image.narrow(axis + 2, 2, n - 2), atol=1e-5)
    assert torch.equal(warped.narrow(axis + 2, n - 2, 2), torch.zeros_like(warped.narrow(axis + 2, n - 2, 2)))


def _smooth_field(spatial_dims, size, amplitude, seed):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, spatial_dims, *[3] * spatial_dims, generator=g) * amplitude
    mode = "bilinear" if spatial_dims == 2 else "trilinear"
    return torch.nn.functional.interpolate(coarse, size=size, mode=mode, align_corners=True)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_composition_equals_warping_twice(spatial_dims):
    size = (24, 22, 20)[:spatial_dims]
    grids = torch.meshgrid(*[torch.linspace(0, 3.14, s) for s in size], indexing="ij")
    image = sum(torch.sin(g) for g in grids)[None, None]
    u = _smooth_field(spatial_dims, size, 1.5, 1)
    delta = _smooth_field(spatial_dims, size, 1.5, 2)
    fc = FieldComposer("border")
    twice = fc.warp(fc.warp(image, u), delta)
    once = fc.warp(image, fc.compose(u, delta))
    naive = fc.warp(image, u + delta)
    inner = (slice(None), slice(None)) + tuple(slice(3, s - 3) for s in size)
    err = (once - twice)[inner].abs().max()
    assert err < 0.02
    assert (naive - twice)[inner].abs().max() > 5 * err  # adding fields is not composing them
    assert torch.equal(fc.compose(None, delta), delta)
    assert torch.equal(fc.compose(torch.zeros_like(delta), delta), delta)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_resize_ddf_doubles_grid_and_values(spatial_dims):
    ddf = torch.full((1, spatial_dims, *[4] * spatial_dims), 1.5)
    up = resize_ddf(ddf, 2)
    assert up.shape[2:] == (8,) * spatial_dims and torch.allclose(up, torch.full_like(up, 3.0))
    ramp = torch.arange(4.0).view(1, 1, 4, *[1] * (spatial_dims - 1)).expand(1, spatial_dims, *[4] * spatial_dims)
    up = resize_ddf(ramp.contiguous(), 2)
    # align_corners=True: the end points map onto each other (value x2)
    assert up[0, 0, 0].max() == 0 and torch.isclose(up[0, 0, -1].min(), torch.tensor(6.0))


def test_pad_and_crop_round_trip():
    x = torch.rand(2, 1, 13, 16, 9)
    padded, size = pad_to_divisible(x, 8)
    assert padded.shape == (2, 1, 16, 16, 16) and size == (13, 16, 9)
    assert torch.equal(crop_to(padded, size), x)
    assert padded[:, :, 13:].abs().sum() == 0
