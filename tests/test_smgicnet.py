"""SM-GICNet: velocity integration, the consistency losses (GradICON included) and the network."""

from __future__ import annotations

import math
import os

import pytest
import torch
from monai.networks.blocks import DVF2DDF

from monai_ipear.losses.smgicnet import (
    GradICONLoss,
    InverseConsistencyLoss,
    MultiLevelNCCLoss,
    SMGICNetLoss,
    SymmetricConsistencyLoss,
    composed_displacement,
)
from monai_ipear.networks.blocks.fields import FieldComposer
from monai_ipear.networks.nets.smgicnet import SMGICNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smooth_velocity(spatial_dims: int, n: int, amplitude: float = 2.0) -> torch.Tensor:
    g = torch.meshgrid(*[torch.arange(n, dtype=torch.float32)] * spatial_dims, indexing="ij")
    comps = [
        amplitude * torch.sin(2 * math.pi * g[(i + 1) % spatial_dims] / n) * torch.cos(2 * math.pi * g[i] / n)
        for i in range(spatial_dims)
    ]
    return torch.stack(comps)[None]


@pytest.mark.parametrize("spatial_dims,n,tol", [(2, 32, 0.05), (3, 16, 0.2)])
def test_integrating_v_then_minus_v_is_identity(spatial_dims, n, tol):
    """exp(v) o exp(-v) = id: interior error below ``tol`` voxels for |v| <= 2 voxels (7 squaring steps)."""
    v = smooth_velocity(spatial_dims, n)
    integrate = DVF2DDF(num_steps=7, padding_mode="border")
    fwd, inv = integrate(v), integrate(-v)
    comp = composed_displacement(fwd, inv, FieldComposer("border"))
    inner = (slice(None), slice(None)) + (slice(2, -2),) * spatial_dims
    assert comp[inner].abs().max() < tol
    assert fwd.abs().max() > 1.0  # the field itself is far from the identity
    not_inverse = composed_displacement(fwd, fwd, FieldComposer("border"))
    assert not_inverse[inner].abs().max() > 10 * tol


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_gradicon_zero_for_exact_inverse_positive_otherwise(spatial_dims):
    size = (12,) * spatial_dims
    t = torch.tensor([1.5, -0.5, 0.25][:spatial_dims]).view(1, spatial_dims, *([1] * spatial_dims))
    ab, ba = t.expand(2, spatial_dims, *size).clone(), -t.expand(2, spatial_dims, *size).clone()
    gradicon, icon = GradICONLoss(), InverseConsistencyLoss()
    assert float(gradicon(ab, ba)) < 1e-10  # a translation and its exact inverse
    assert float(icon(ab, ba)) < 1e-10
    assert float(icon(ab, ab)) > 1.0  # not inverse: the composition is a translation by 2t
    assert float(gradicon(ab, ab)) < 1e-10  # ... which GradICON, a gradient term, does not penalise
    u = smooth_velocity(spatial_dims, 12, amplitude=1.5).expand(2, -1, *size)
    assert float(gradicon(u, -u)) > 1e-2  # -u is not the inverse of a non-uniform u


def test_gradicon_matches_jacobian_of_known_composition():
    """A linear displacement u(x) = a * x composed with zero: J - I = a * I, so the loss is d * a^2."""
    a, n = 0.1, 10
    g = torch.meshgrid(torch.arange(n, dtype=torch.float32), torch.arange(n, dtype=torch.float32), indexing="ij")
    u = (a * torch.stack(g))[None]
    zero = torch.zeros_like(u)
    assert abs(float(GradICONLoss()(u, zero)) - 2 * a**2) < 1e-5


def test_symmetric_consistency_and_multilevel_ncc_values():
    torch.manual_seed(0)
    img = torch.rand(1, 1, 16, 16)
    u = torch.zeros(1, 2, 16, 16)
    sym = SymmetricConsistencyLoss()
    assert float(sym(img, u, u)) == 0.0
    assert float(sym(img, u, u + 1.0)) > 1e-3
    ncc = MultiLevelNCCLoss(kernel_size=5, level_weights=[1.0, 0.5])
    levels = [img, torch.nn.functional.avg_pool2d(img, 2)]
    assert abs(float(ncc(levels, levels)) + 1.5) < 1e-3  # LNCC of identical images is 1 per level


def test_smgicnet_forward_outputs_and_loss():
    torch.manual_seed(0)
    net = SMGICNet(2, channels=8, levels=3)
    m, f = torch.rand(2, 1, 24, 24), torch.rand(2, 1, 24, 24)
    ddf = net(m, f)
    assert ddf.shape == (2, 2, 24, 24)
    out = net.last_outputs
    assert len(out["levels"]) == 3 and out["levels"][2]["ddf"].shape == (2, 2, 6, 6)
    assert torch.allclose(out["ddf"], net.integrate(out["velocity"]))
    assert torch.allclose(out["ddf_inverse"], net.integrate(-out["velocity"]))
    loss_fn = SMGICNetLoss(net, kernel_size=5)
    warped = FieldComposer().warp(m, ddf)
    loss = loss_fn(warped, f, ddf)
    assert torch.isfinite(loss) and set(loss_fn.last_terms) == {"ncc", "smooth", "symmetric", "inverse", "gradicon"}
    loss.backward()
    assert net.units[0].gate.psi[0].conv.weight.grad is not None  # the finest level's attention gate is trained
    assert net.units[1].gate is None
    net.eval()
    with torch.no_grad():
        both, one = net(m, f), net(m[1:], f[1:])
    assert torch.allclose(both[1:], one, atol=1e-5)
    # the backward prediction is the forward one with the images swapped
    with torch.no_grad():
        swapped = net(f, m)
    assert torch.allclose(net.last_outputs["ddf_backward"][:, :, :24, :24], both, atol=1e-5)
    assert swapped.shape == both.shape


def test_smgicnet_variant_config():
    path = os.path.join(ROOT, "configs", "train.json")
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([path, os.path.join(ROOT, "configs", "variants", "smgicnet.json")])
    parser["spatial_dims"] = 2
    net = parser.get_parsed_content("network_def")
    loss = parser.get_parsed_content("loss")
    assert isinstance(net, SMGICNet) and isinstance(loss, SMGICNetLoss) and loss.network[0] is net
    m, f = torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)
    ddf = net(m, f)
    assert torch.isfinite(loss(FieldComposer().warp(m, ddf), f, ddf))


def test_smgicnet_velocity_increment_bound():
    """range_flow bounds each increment by range_flow * (size - 1) / 2 voxels per axis (softsign), monotonically."""
    net = SMGICNet(2, channels=4, levels=2, range_flow=0.2)
    raw = torch.tensor([-1e6, -1.0, 0.0, 1.0, 1e6]).view(1, 1, 5, 1).expand(1, 2, 5, 9)
    dv = net._bound(raw)
    assert torch.allclose(dv[0, 0, :, 0], 0.2 * 2.0 * torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]), atol=1e-5)
    assert torch.allclose(dv[0, 1, :, 0], 0.2 * 4.0 * torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]), atol=1e-5)
    assert torch.equal(SMGICNet(2, range_flow=None)._bound(raw), raw)
