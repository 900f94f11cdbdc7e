"""The slice mosaic (trilinear sampling by PyTorch's 2D sampler) equals the 3D sampler, and PreparedWarp equals
FieldComposer.warp; iteration control's evaluations use it with the same similarities and decisions."""

import pytest
import torch
import torch.nn.functional as F

from monai_ipear.networks.blocks.fields import FieldComposer, resize_ddf
from monai_ipear.networks.blocks.slice_mosaic import SliceMosaic


def _voxel_coords(batch, spatial, spread, seed=0):
    g = torch.Generator().manual_seed(seed)
    axes = [torch.arange(s, dtype=torch.float32) for s in spatial]
    identity = torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]
    return identity + spread * torch.randn(batch, 3, *spatial, generator=g)


def _grid_sample_3d(image, coords):
    sizes = image.shape[2:]
    grid = torch.stack([coords[:, i] * (2.0 / (s - 1)) - 1.0 for i, s in enumerate(sizes)], dim=-1).flip(-1)
    return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=True)


@pytest.mark.parametrize("shape,across", [((2, 1, 7, 9, 5), None), ((1, 3, 6, 5, 8), None), ((1, 1, 6, 5, 8), 1),
                                          ((2, 2, 5, 4, 6), 3), ((1, 1, 2, 3, 2), None),
                                          ((1, 1, 43, 3, 2), 41)])  # 41 tiles a row: t / 41 rounds below 1 for t = 41
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_mosaic_sampling_equals_the_3d_sampler(shape, across, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # the slabs one sample is split into
    torch.manual_seed(0)
    image = torch.rand(*shape)
    b, _, d, h, w = shape
    coords = _voxel_coords(b, (d, h, w), spread=min(2.0, 0.3 * min(d, h, w)))  # inside, at the faces, far out
    # the edges of the zeros padding exactly: on the first/last slice, row, column and one voxel beyond them
    edges = torch.tensor([-1.0, 0.0, d - 1.0, float(d), -0.5, d - 0.5, -7.0, d + 3.0])
    coords[0, 0, 0, 0, : min(w, 8)] = edges[: min(w, 8)]
    coords[0, 1, 0, 1, : min(w, 4)] = torch.tensor([-1.0, float(h), h - 1.0, -0.25])[: min(w, 4)]
    coords[0, 2, 0, min(h, 2) - 1, : min(w, 4)] = torch.tensor([-1.0, float(w), w - 1.0, w - 0.75])[: min(w, 4)]
    expected = _grid_sample_3d(image, coords)
    mosaic = SliceMosaic(image, across)
    out = mosaic.sample(coords.clone())
    assert out.shape == expected.shape
    assert (out - expected).abs().max() <= 1e-5
    assert (expected == 0).any() and (expected > 0.1).any()  # zeros padding was exercised, and data
    index = torch.tensor([b - 1])  # a subset of the samples
    assert (mosaic.sample(coords[index].clone(), index) - expected[index]).abs().max() <= 1e-5


def test_mosaic_layout_holds_each_slice_twice_with_zero_borders():
    image = torch.arange(1, 2 * 3 * 4 + 1, dtype=torch.float32).view(1, 1, 2, 3, 4)
    m = SliceMosaic(image, across=2)
    assert (m.down, m.across) == (2, 2)  # tiles for slices -1, 0, 1, 2 in a 2 x 2 mosaic of 4 x 5 tiles
    assert m.mosaic.shape == (1, 2, 2 * 4, 2 * 5)
    tile = lambda ch, t: m.mosaic[0, ch, (t // 2) * 4 : (t // 2) * 4 + 4, (t % 2) * 5 : (t % 2) * 5 + 5]
    for t in range(4):
        for ch, slice_index in ((0, t - 1), (1, t)):
            expected = torch.zeros(4, 5)
            if 0 <= slice_index < 2:
                expected[1:, 1:] = image[0, 0, slice_index]
            assert torch.equal(tile(ch, t), expected)


def test_mosaic_rejects_other_shapes():
    with pytest.raises(ValueError, match="D, H, W"):
        SliceMosaic(torch.rand(1, 1, 5, 4))
    with pytest.raises(ValueError, match="coords must be"):
        SliceMosaic(torch.rand(2, 1, 3, 4, 5)).sample(torch.zeros(1, 3, 3, 4, 5))


@pytest.mark.parametrize("size,factor", [((6, 5, 8), 1), ((3, 5, 4), 2), ((2, 3, 2), 4)])
def test_prepared_warp_equals_warp(size, factor):
    torch.manual_seed(0)
    fc = FieldComposer("zeros")
    full = [s * factor for s in size]
    image, ddf = torch.rand(2, 1, *full), 0.8 * torch.randn(2, 3, *size)
    prepared = fc.prepare_warp(image)
    assert prepared.mosaic is not None
    expected = fc.warp(image, ddf, factor=factor)
    assert (prepared(ddf, factor=factor) - expected).abs().max() <= 1e-5
    assert (expected - image).abs().max() > 0.05  # the field moves the image
    index = torch.tensor([1])
    assert (prepared(ddf[index], index, factor=factor) - expected[index]).abs().max() <= 1e-5
    # the reference path's upsampled field, too
    assert (prepared(ddf, factor=factor) - FieldComposer("zeros", fast=False).warp(image, resize_ddf(ddf, factor))).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="do not match"):
        prepared(ddf, factor=factor + 1)  # a field and a factor that do not give the image's size


@pytest.mark.parametrize(
    "padding_mode,size,fast,grad",
    [("zeros", (7, 9), True, False), ("border", (4, 5, 6), True, False), ("zeros", (4, 5, 6), False, False),
     ("zeros", (4, 5, 6), True, True)],
    ids=["2d", "border", "reference", "autograd"],
)
def test_prepared_warp_is_the_plain_warp_elsewhere(padding_mode, size, fast, grad):
    torch.manual_seed(0)
    fc = FieldComposer(padding_mode, fast=fast)
    image, ddf = torch.rand(2, 1, *size), torch.randn(2, len(size), *size)
    prepared = fc.prepare_warp(image.requires_grad_(grad))
    assert prepared.mosaic is None
    out = prepared(ddf)
    assert torch.equal(out, fc.warp(image, ddf)) and out.requires_grad == grad
