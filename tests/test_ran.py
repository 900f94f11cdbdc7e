"""Residual Aligner Network: the accumulator (equation 11) with known confidences, RA blocks, the network, its loss."""

from __future__ import annotations

import os

import pytest
import torch

from monai_ipear.losses import EdgeAwareSmoothnessLoss, MaskedLNCCLoss, RANLoss
from monai_ipear.networks.blocks.residual_aligner import (
    RASharedConvs,
    ResidualAligner,
    SampleNorm,
    boundary_limit,
    expand_heads,
    swap_branches,
)
from monai_ipear.networks.nets import RAN

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_expand_heads_layout_and_values():
    """(N, H, d) heads times per-head weights, then the head mean, per component folded into the batch."""
    fields = torch.arange(6, dtype=torch.float32).view(1, 3, 2, 1, 1).expand(1, 3, 2, 2, 2)  # (N=1, H=3, d=2)
    weights = torch.tensor([0.5, 0.0, 2.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    out = expand_heads(fields, weights)
    assert out.shape == (2, 4, 2, 2)
    # component 0: heads carry 0, 2, 4; component 1: 1, 3, 5
    assert torch.equal(out[0, :, 0, 0], torch.tensor([0.0, 0.0, 8.0, 2.0]))
    assert torch.equal(out[1, :, 0, 0], torch.tensor([0.5, 0.0, 10.0, 3.0]))
    # a single field (the previous level's) is broadcast to every head; its "mean" is itself
    prev = torch.tensor([3.0, -1.0]).view(1, 1, 2, 1, 1).expand(1, 1, 2, 2, 2)
    out = expand_heads(prev, weights)
    assert torch.equal(out[0, :, 1, 1], torch.tensor([1.5, 0.0, 6.0, 3.0]))
    assert torch.equal(out[1, :, 1, 1], torch.tensor([-0.5, 0.0, -2.0, -1.0]))


def _pass_previous_field(ra: ResidualAligner, shared: RASharedConvs, heads: int) -> None:
    """Make the accumulator output ``sum_h w_u,h * u`` (the confidence-weighted previous field) exactly:
    ``accumulate`` sums the weighted previous-field channels into +s / -s, ``acc_out`` returns (+s - -s) / 1.01,
    which undoes LeakyReLU(0.01) for either sign."""
    with torch.no_grad():
        w = torch.zeros_like(ra.accumulate.conv.weight)
        centre = tuple(k // 2 for k in w.shape[2:])
        for h in range(heads):  # previous-field block starts after the current (H + 1) channels
            w[(0, heads + 1 + h) + centre] = 1.0
            w[(1, heads + 1 + h) + centre] = -1.0
        ra.accumulate.conv.weight.copy_(w)
        ra.accumulate.conv.bias.zero_()
        wo = torch.zeros_like(shared.acc_out.conv.weight)
        wo[(0, 0) + centre] = 1 / 1.01
        wo[(0, 1) + centre] = -1 / 1.01
        shared.acc_out.conv.weight.copy_(wo)
        shared.acc_out.conv.bias.zero_()
        ra.scale.conv.weight.fill_(0.25)  # scale = ReLU(0.25 * sum_h LeakyReLU(c_u,h))
        ra.scale.conv.bias.zero_()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_accumulator_weights_previous_field_by_previous_confidence(spatial_dims):
    """Equation 11 with known confidences: the module returns the full field (not a residual) and the previous
    field enters scaled by ReLU(conv(act(previous confidence))) times the current head masks (which sum to 1)."""
    torch.manual_seed(0)
    heads, size = 3, (8,) * spatial_dims
    shared = RASharedConvs(spatial_dims, heads)
    ra = ResidualAligner(spatial_dims, 4, heads, atrous_rate=2)
    _pass_previous_field(ra, shared, heads)
    x = torch.randn(4, 4, *size)  # batch 2, two branches stacked
    prev = torch.randn(4, spatial_dims, *size)
    for conf_value, scale in ((2.0, 0.25 * 2.0 * heads), (0.4, 0.25 * 0.4 * heads), (-2.0, 0.0)):
        conf = torch.full((4, heads, *size), conf_value)
        _, field, new_conf = ra(x, shared, (prev, conf))
        torch.testing.assert_close(field, scale * prev, atol=1e-5, rtol=1e-5)
        assert new_conf.shape == (4, heads, *size)
    # a per-sample confidence gates each sample's previous field separately
    conf = torch.stack([torch.full((heads, *size), v) for v in (2.0, -2.0, 2.0, -2.0)])
    _, field, _ = ra(x, shared, (prev, conf))
    torch.testing.assert_close(field[0], 1.5 * prev[0], atol=1e-5, rtol=1e-5)
    assert float(field[1].abs().max()) < 1e-6
    masks = ra.last_head_masks
    torch.testing.assert_close(masks.sum(1), torch.ones(4, *size))


def test_first_and_later_ra_modules_check_previous():
    shared = RASharedConvs(2, 6)
    first, later = ResidualAligner(2, 4, first=True), ResidualAligner(2, 4)
    x = torch.randn(2, 4, 8, 8)
    with pytest.raises(ValueError):
        first(x, shared, (torch.zeros(2, 2, 8, 8), torch.zeros(2, 6, 8, 8)))
    with pytest.raises(ValueError):
        later(x, shared)
    out, field, conf = first(x, shared)
    assert out.shape == x.shape and field.shape == (2, 2, 8, 8) and conf.shape == (2, 6, 8, 8)


def test_boundary_limit_and_branch_swap_and_sample_norm():
    ddf = torch.tensor([[[[100.0, -100.0, 3.0]], [[100.0, -100.0, 3.0]]]])  # (1, 2, 1, 3): sizes 1 and 3
    lim = boundary_limit(ddf)
    assert lim[0, 0].tolist() == [[1.0, -1.0, 1.0]] and lim[0, 1].tolist() == [[5.0, -5.0, 3.0]]
    x = torch.arange(4.0).view(4, 1)
    assert swap_branches(x).flatten().tolist() == [2.0, 3.0, 0.0, 1.0]
    norm = SampleNorm()
    y = norm(torch.randn(3, 5, 6, 6) * torch.tensor([1.0, 5.0, 0.1]).view(3, 1, 1, 1) + 4)
    assert sum(p.numel() for p in norm.parameters()) == 2
    torch.testing.assert_close(y.mean((1, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    assert torch.allclose(y.std((1, 2, 3), unbiased=False), torch.ones(3), atol=2e-2)


NARROW = {"enc_channels": (2, 2, 4, 4), "dec_channels": (4, 4, 2, 2), "skip_channels": 2}  # keeps the suite fast


@pytest.mark.parametrize("spatial_dims, size", [(2, 32), (3, 16)])
def test_ran_batch_equals_samples_and_trains(spatial_dims, size):
    torch.manual_seed(0)
    net = RAN(spatial_dims, **NARROW).eval()
    assert float(net.out.conv.weight.abs().max()) < 1e-4  # near-identity start
    torch.nn.init.normal_(net.out.conv.weight, std=0.1)  # a trained-like output layer, so outputs are not ~0
    shape = (2, 1) + (size,) * spatial_dims
    m, f = torch.rand(shape), torch.rand(shape)
    with torch.no_grad():
        both = net(m, f)
        one = net(m[1:], f[1:])
    assert both.shape == (2, spatial_dims) + (size,) * spatial_dims
    torch.testing.assert_close(both[1:], one, atol=1e-5, rtol=1e-4)
    fields, confs = net.last_outputs["fields"], net.last_outputs["confidences"]
    assert len(fields) == 5 and len(confs) == 5  # five RA modules, four at 1/2, the last at full resolution
    assert fields[0].shape[2:] == (size // 2,) * spatial_dims and fields[-1].shape[2:] == (size,) * spatial_dims
    assert confs[-1].shape[1] == 6
    net.train()
    net(m, f).pow(2).mean().backward()
    assert net.shared.acc_out.conv.weight.grad is not None and net.aligners[0].match1.conv.weight.grad is not None
    assert net.encoder[0].conv0.conv.weight.grad.abs().sum() > 0


def test_ran_odd_sizes_are_padded_and_cropped():
    net = RAN(2, **NARROW).eval()
    with torch.no_grad():
        out = net(torch.rand(1, 1, 20, 27), torch.rand(1, 1, 20, 27))
    assert out.shape == (1, 2, 20, 27)


def test_ran_parameter_count_matches_reference_analytic_count():
    """738,065 in 3D: the reference RAN4 counted analytically from its Keras layer definitions (see
    docs/architecture.md), the encoder/decoder convs, the five RA modules, the shared ws_conv and the disp conv."""
    assert sum(p.numel() for p in RAN(3).parameters()) == 738_065
    assert sum(p.numel() for p in RAN(3).shared.parameters()) == 13_149 + 504 + 114 + 8_766 + 114 + 2_922 + 487


def test_edge_aware_smoothness_values():
    n, a = 8, 0.5
    g = torch.arange(n, dtype=torch.float32)
    u = torch.zeros(1, 2, n, n)
    u[0, 0] = a * g[:, None]  # component 0 linear along axis 0
    flat = torch.full((1, 1, n, n), 0.5)
    loss = EdgeAwareSmoothnessLoss(25.0)
    # no image gradient: weight 1; forward differences (0 at the first row) averaged over voxels, channels, axes
    assert abs(float(loss(u, flat)) - a * (n - 1) / n / 2 / 2) < 1e-6
    # a jump in the field across an image edge costs less than the same jump elsewhere
    img = torch.zeros(1, 1, n, n)
    img[:, :, 4:] = 1.0
    jump_at_edge, jump_elsewhere = torch.zeros(1, 2, n, n), torch.zeros(1, 2, n, n)
    jump_at_edge[:, 0, 4:] = 2.0
    jump_elsewhere[:, 0, 2:] = 2.0
    assert float(loss(jump_at_edge, img)) < 0.1 * float(loss(jump_elsewhere, img))
    w = loss.edge_weight(img)
    assert abs(float(w[0, 0, 4, 0]) - torch.exp(torch.tensor(-25.0 / 1.44)).item()) < 1e-8 and float(w[0, 0, 3, 0]) == 1.0


def test_masked_lncc_and_ran_loss():
    torch.manual_seed(0)
    img = torch.rand(2, 1, 16, 16) * 0.8 + 0.2
    img[:, :, :4] = 0.0  # background below the threshold
    masked = MaskedLNCCLoss(2, kernel_size=5, threshold=0.1)
    assert float(masked(img, img)) < -0.99
    loss = RANLoss(2, ncc_weight=2.0, smooth_weight=0.5, kernel_size=5)
    ddf = torch.zeros(2, 2, 16, 16)
    total = loss(img, img, ddf)
    assert abs(float(total) - 2.0 * loss.last_terms["similarity"]) < 1e-6 and loss.last_terms["regularization"] == 0.0


def test_ran_variant_config():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([os.path.join(ROOT, "configs", "train.json"), os.path.join(ROOT, "configs", "variants", "ran.json")])
    parser["spatial_dims"] = 2
    net = parser.get_parsed_content("network_def")
    loss = parser.get_parsed_content("loss")
    assert isinstance(net, RAN) and net.spatial_dims == 2
    assert isinstance(loss, RANLoss) and loss.ncc_weight == 2.0 and loss.smooth_weight == 0.5
    assert parser.get_parsed_content("lr") == 1e-4
