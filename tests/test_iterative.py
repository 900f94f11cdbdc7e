"""IterativeRegistration: any (moving, fixed) -> DDF network refined by composition under a controller."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from monai.networks.nets import LocalNet, VoxelMorph, VoxelMorphUNet

from monai_ipear import TCI, FieldComposer, FixedIterations, IterativeRegistration, IterStop, global_ncc, simulate_controller


class Translation(nn.Module):
    """A 'network' predicting a constant displacement ``shift`` (voxels) whatever the input."""

    def __init__(self, spatial_dims: int, shift: float) -> None:
        super().__init__()
        self.spatial_dims, self.shift = spatial_dims, shift

    def forward(self, moving, fixed):
        return torch.full((moving.shape[0], self.spatial_dims, *moving.shape[2:]), self.shift)


def voxelmorph(seed: int = 0) -> VoxelMorph:
    torch.manual_seed(seed)
    backbone = VoxelMorphUNet(3, 2, unet_out_channels=8, channels=(8, 8, 8, 8), final_conv_channels=(8,))
    net = VoxelMorph(backbone=backbone, integration_steps=7, spatial_dims=3)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv3d)]
    with torch.no_grad():  # random init predicts ~0.05 voxels; scale the flow head to about a voxel
        convs[-1].weight.mul_(30.0)
    return net.eval()


def pair(spatial_dims: int, batch: int = 2, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 1) + (size,) * spatial_dims
    pool = nn.functional.avg_pool3d if spatial_dims == 3 else nn.functional.avg_pool2d
    m = pool(torch.rand(shape, generator=g), 3, 1, 1)
    return m, pool(torch.roll(m, 1, dims=2) + 0.1 * torch.rand(shape, generator=g), 3, 1, 1)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_translations_compose(spatial_dims):
    """k updates of a constant 0.5-voxel translation give 0.5 k voxels away from the far border."""
    net = IterativeRegistration(Translation(spatial_dims, 0.5), FixedIterations(3), spatial_dims=spatial_dims).eval()
    m, f = pair(spatial_dims)
    ddf = net(m, f)
    inner = ddf[(slice(None), slice(None)) + (slice(0, 8),) * spatial_dims]
    torch.testing.assert_close(inner, torch.full_like(inner, 1.5))
    assert net.last_iterations.tolist() == [[3], [3]] and net.last_iterations.dtype == torch.long


def test_voxelmorph_fixed_iterations_equals_manual_composition():
    vm = voxelmorph()
    net = IterativeRegistration(vm, FixedIterations(3)).eval()
    m, f = pair(3)
    with torch.no_grad():
        ddf = net(m, f)
        fields = FieldComposer("zeros")
        u = vm(m, f)[1]
        assert u.abs().max() > 0.3  # a non-trivial field
        for _ in range(2):
            u = fields.compose(u, vm(fields.warp(m, u), f)[1])
    torch.testing.assert_close(ddf, u, atol=1e-5, rtol=0)
    assert net.last_iterations.tolist() == [[3], [3]]
    assert net.last_similarities[0].shape == (2, 4)


def test_voxelmorph_under_tci_records_iterations_per_sample():
    vm = voxelmorph(seed=1)
    tci = TCI()
    net = IterativeRegistration(vm, tci).eval()
    m, f = pair(3, batch=2, seed=3)
    with torch.no_grad():
        ddf = net(m, f)
    its, trace = net.last_iterations, net.last_similarities[0]
    assert its.shape == (2, 1) and ((its >= 3) & (its <= tci.k_max)).all()
    for b in range(2):
        k = int(its[b, 0])
        # the recorded trace drives the controller to exactly the recorded decision
        assert simulate_controller(tci, trace[b, 1 : k + 1].tolist()) == (k, k)
        assert torch.isnan(trace[b, k + 1 :]).all()
        # a batch gives what each sample gives alone
        with torch.no_grad():
            alone = net(m[b : b + 1], f[b : b + 1])
        torch.testing.assert_close(alone, ddf[b : b + 1], atol=1e-5, rtol=0)
        assert int(net.last_iterations[0, 0]) == k
    # the last trace value is the NCC of the returned field
    fields = FieldComposer("zeros")
    expected = global_ncc(fields.warp(m, ddf), f)
    got = torch.stack([trace[b, int(its[b, 0])] for b in range(2)])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_localnet_concat_mode_and_iterstop_2d():
    torch.manual_seed(0)
    local = LocalNet(spatial_dims=2, in_channels=2, num_channel_initial=4, extract_levels=(0, 1, 2), out_channels=2)
    net = IterativeRegistration(local, IterStop(), spatial_dims=2, input_mode="concat").eval()
    m, f = pair(2, batch=3)
    with torch.no_grad():
        ddf = net(m, f)
    assert ddf.shape == (3, 2, 16, 16)
    assert net.last_iterations.shape == (3, 1) and (net.last_iterations <= 10).all()


def test_training_mode_is_one_pass_and_differentiable():
    vm = voxelmorph()
    net = IterativeRegistration(vm, TCI()).train()
    m, f = pair(3, batch=1)
    ddf = net(m, f)
    ddf.abs().mean().backward()
    assert net.last_iterations.tolist() == [[1]]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vm.parameters())


def test_bad_inputs():
    net = IterativeRegistration(Translation(3, 1.0), FixedIterations(2))
    with pytest.raises(ValueError, match="shapes differ"):
        net(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 9))
    with pytest.raises(ValueError, match="must return a DDF"):
        IterativeRegistration(Translation(2, 1.0), spatial_dims=3)(torch.rand(1, 1, 8, 8, 8), torch.rand(1, 1, 8, 8, 8))
    with pytest.raises(ValueError, match="input_mode"):
        IterativeRegistration(Translation(3, 1.0), input_mode="stack")
