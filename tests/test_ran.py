"""Residual Aligner Network: the RA accumulator, the RA module as a pyramid decoder, the network."""

from __future__ import annotations

import os

import pytest
import torch

from monai_ipear.networks.blocks import ConvEncoder
from monai_ipear.networks.blocks.residual_aligner import MotionAwareEncoder, RAAccumulator, ResidualAligner
from monai_ipear.networks.nets import RAN, PyramidRegistrationNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_accumulator_one_hot_confidence_returns_selected_head(spatial_dims):
    torch.manual_seed(0)
    heads, size = 6, (6,) * spatial_dims
    fields = torch.randn(2, heads, spatial_dims, *size)
    selected = torch.tensor([4, 1])
    weights = torch.nn.functional.one_hot(selected, heads).float().view(2, heads, *([1] * spatial_dims))
    weights = weights.expand(2, heads, *size)
    acc = RAAccumulator(spatial_dims, heads)
    expected = fields[torch.arange(2), selected]
    assert torch.allclose(acc(fields, weights), expected)
    # the learned correction of the previous field starts at zero
    previous = torch.randn(2, spatial_dims, *size)
    assert torch.allclose(acc(fields, weights, previous), expected)
    # a trained (non-zero) correction depends on the previous field; without one the heads alone are returned
    torch.nn.init.normal_(acc.correction[-1].conv.weight, std=0.1)
    assert not torch.allclose(acc(fields, weights, previous), expected)
    assert torch.allclose(acc(fields, weights), expected)


def test_accumulator_correction_is_shared_by_components():
    """Swapping two displacement components of heads and previous field swaps the output components."""
    torch.manual_seed(1)
    acc = RAAccumulator(2, 3)
    torch.nn.init.normal_(acc.correction[-1].conv.weight, std=0.1)
    fields, w, prev = torch.randn(1, 3, 2, 8, 8), torch.rand(1, 3, 8, 8), torch.randn(1, 2, 8, 8)
    out = acc(fields, w, prev)
    swapped = acc(fields.flip(2), w, prev.flip(1))
    assert torch.allclose(swapped, out.flip(1), atol=1e-6)


def test_ra_module_receives_previous_field_in_pyramid():
    seen = []

    class Spy(ResidualAligner):
        def forward(self, moving, fixed, previous=None):
            seen.append(None if previous is None else previous.detach().clone())
            return super().forward(moving, fixed, previous)

    torch.manual_seed(0)
    enc = ConvEncoder(2, 1, (4, 8))
    net = PyramidRegistrationNet(enc, [Spy(2, 4), Spy(2, 8)], spatial_dims=2)
    m, f = torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)
    out = net(m, f)
    assert len(seen) == 2
    assert seen[0] is None  # the coarsest level's first update starts from identity
    assert seen[1] is not None and seen[1].shape == (1, 2, 16, 16) and seen[1].abs().sum() > 0
    assert out.shape == (1, 2, 16, 16)
    masks = net.decoders[0].last_head_masks
    assert masks.shape == (1, 6, 16, 16) and torch.allclose(masks.sum(1), torch.ones(1, 16, 16), atol=1e-5)


def test_motion_aware_encoder_dilation_widens_receptive_field():
    torch.manual_seed(0)
    enc = MotionAwareEncoder(2, 1, (4, 4))
    wide = enc.levels[1][1]
    assert wide.conv2.conv.dilation == (3, 3)
    # impulse response of level 2: dilated convs reach 1 + 1 + 3 = 5 voxels from the centre at half resolution
    x = torch.zeros(1, 1, 32, 32, requires_grad=True)
    y = enc(x)[1]
    y[0, :, 8, 8].sum().backward()
    reach = (x.grad[0, 0].abs() > 0).nonzero()
    assert int(reach[:, 0].max()) - int(reach[:, 0].min()) + 1 > 16  # wider than three undilated 3x3 convs (14)


def test_ran_batch_equals_samples_and_trains():
    torch.manual_seed(0)
    net = RAN(2).eval()
    m, f = torch.rand(2, 1, 24, 24), torch.rand(2, 1, 24, 24)
    with torch.no_grad():
        both = net(m, f)
        one = net(m[1:], f[1:])
    assert both.shape == (2, 2, 24, 24)
    assert torch.allclose(both[1:], one, atol=1e-5)
    assert net.last_iterations.shape == (1, 4)
    net.train()
    net(m, f).pow(2).mean().backward()
    assert net.decoders[0].accumulator.correction[-1].conv.weight.grad is not None
    assert sum(p.numel() for p in RAN(3).parameters()) == 344988


def test_ran_variant_config():
    path = os.path.join(ROOT, "configs", "train.json")
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([path, os.path.join(ROOT, "configs", "variants", "ran.json")])
    parser["spatial_dims"] = 2
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, RAN) and net.spatial_dims == 2
