"""SM-GICNet: velocity integration, the consistency losses (GradICON included) and the network."""

from __future__ import annotations

import math
import os

import pytest
import torch
from monai.networks.blocks import DVF2DDF

from monai_ipear.engines import LevelwiseTraining
from monai_ipear.losses.smgicnet import (
    FieldSmoothnessLoss,
    GradICONLoss,
    InverseConsistencyLoss,
    MultiLevelConsistencyLoss,
    MultiLevelNCCLoss,
    SMGICNetLoss,
    SymmetricConsistencyLoss,
    composed_displacement,
)
from monai_ipear.networks.blocks.fields import FieldComposer, resize_ddf
from monai_ipear.networks.nets.smgicnet import SMGICAttentionGate, SMGICNet, haar_split

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
    # per-level windows (finest first) and missing levels (None) are skipped
    assert MultiLevelNCCLoss([9, 3]).kernel(1, (8, 8)) == 3 and MultiLevelNCCLoss([9, 3]).kernel(0, (6, 6)) == 5
    assert abs(float(MultiLevelNCCLoss(5)([None, levels[1]], [None, levels[1]])) + 0.5) < 1e-3


def test_multilevel_consistency_and_weighted_smoothness_values():
    n, a = 8, 0.5
    img = torch.arange(n, dtype=torch.float32).view(1, 1, n, 1).expand(2, 1, n, n).clone()
    zero = torch.zeros(2, 2, n, n)
    shift = zero.clone()
    shift[:, 0] = 1.0  # one voxel along axis 0
    ml = MultiLevelConsistencyLoss()
    assert float(ml(img, zero, zero)) == 0.0
    # warping a ramp by one voxel changes every voxel by 1 except the last row (border padding)
    assert abs(float(ml(img, shift, zero)) - (n - 1) / n) < 1e-5
    lin = torch.zeros(1, 2, n, n)
    lin[0, 0] = a * torch.arange(n, dtype=torch.float32)[:, None]
    smooth = FieldSmoothnessLoss()
    assert abs(float(smooth(lin)) - a**2 / 4) < 1e-6  # forward differences: a^2 on one of 2 channels, 1 of 2 axes
    assert abs(float(smooth(lin, 2 * lin, weights=[2.0, 0.5])) - (2.0 + 0.5 * 4) * a**2 / 4) < 1e-6


def test_haar_split_values():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2).repeat(2, 3, 2, 2)
    low, high = haar_split(x)
    assert low.shape == (2, 3, 2, 2) and torch.allclose(low, torch.full_like(low, 2.5))
    assert torch.allclose(high, torch.full_like(high, (1 - 2 - 3 + 4) / 4))
    x3 = torch.zeros(1, 1, 2, 2, 2)
    x3[0, 0, 1, 1, 1] = 8.0
    low3, high3 = haar_split(x3)
    assert float(low3) == 1.0 and float(high3) == -1.0  # sign (-1)^(1+1+1)


def test_attention_gate_values():
    gate = SMGICAttentionGate(2, 4)
    with torch.no_grad():
        for conv in (gate.w_g, gate.w_x, gate.psi):
            conv.conv.weight.zero_()
        gate.w_g.conv.bias.zero_()
        gate.w_x.conv.bias.zero_()
        gate.psi.conv.bias.copy_(torch.tensor([0.0, 100.0, -100.0, 0.0]))
    x = torch.randn(2, 4, 4, 4)
    out = gate(torch.randn(2, 4, 8, 8), x)
    torch.testing.assert_close(out, x * torch.tensor([0.5, 1.0, 0.0, 0.5]).view(1, 4, 1, 1))


def test_set_stage_freezes_coarser_levels_and_outputs_active_field():
    torch.manual_seed(0)
    net = SMGICNet(2, channels=4, levels=3, depth=1)
    m, f = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    trainable = lambda: [any(p.requires_grad for p in u.parameters()) for u in net.units]  # noqa: E731
    net.set_stage(1)
    assert trainable() == [False, False, True]  # finest first: only the coarsest level trains
    ddf = net(m, f)
    assert len(net.last_outputs["levels"]) == 1 and net.last_outputs["ddf"].shape == (2, 2, 4, 4)
    torch.testing.assert_close(ddf, resize_ddf(net.last_outputs["ddf"], 4))  # upsampled to full resolution
    net.set_stage(2)
    assert trainable() == [False, True, False]
    ddf = net(m, f)
    ddf.pow(2).mean().backward()
    assert net.units[2].inp[0].conv.weight.grad is None and net.units[1].inp[0].conv.weight.grad is not None
    net.set_stage(3, freeze_coarser=False)
    assert trainable() == [True, True, True] and net.last_iterations.shape == (2, 2)
    with pytest.raises(ValueError):
        net.set_stage(4)


def test_levelwise_training_handler_schedule():
    from ignite.engine import Engine

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = []

        def set_stage(self, stage, freeze_coarser=True):
            self.calls.append((stage, freeze_coarser))

    handler = LevelwiseTraining(Recorder(), epochs=(4, 4, 6, 6))
    assert [handler.stage_of_epoch(e) for e in (1, 4, 5, 8, 9, 14, 15, 20, 21)] == [1, 1, 2, 2, 3, 3, 4, 4, 4]
    rec = Recorder()
    engine = Engine(lambda e, b: None)
    LevelwiseTraining(rec, epochs=(1, 2, 1), unfreeze_after_iterations=2).attach(engine)
    engine.run([0, 1, 2], max_epochs=4)  # 3 iterations per epoch
    assert rec.calls == [(1, True), (1, False), (2, True), (2, False), (3, True), (3, False)]
    with pytest.raises(ValueError):
        LevelwiseTraining(rec, epochs=(0, 1))


@pytest.mark.parametrize("spatial_dims, size", [(2, 16), (3, 8)])
def test_smgicnet_forward_outputs_and_loss(spatial_dims, size):
    torch.manual_seed(0)
    net = SMGICNet(spatial_dims, channels=4, levels=3, depth=1)
    shape = (2, 1) + (size,) * spatial_dims
    m, f = torch.rand(shape), torch.rand(shape)
    ddf = net(m, f)
    assert ddf.shape == (2, spatial_dims) + (size,) * spatial_dims
    out = net.last_outputs
    assert len(out["levels"]) == 3 and out["levels"][2]["ddf"].shape[2:] == (size // 4,) * spatial_dims
    assert out["levels"][1]["moving_detail"] is not None and out["levels"][0]["moving_detail"] is None
    torch.testing.assert_close(out["ddf"], net.integrate(out["velocity"]))
    torch.testing.assert_close(out["ddf_inverse"], net.integrate(-out["velocity"]))
    loss_fn = SMGICNetLoss(net, kernel_size=[5, 5, 3])
    loss = loss_fn(FieldComposer().warp(m, ddf), f, ddf)
    assert set(loss_fn.last_terms) == {"ncc", "inverse_ncc", "smooth", "symmetric", "multilevel", "inverse", "gradicon"}
    expected = sum(loss_fn.weights[k] * v for k, v in loss_fn.last_terms.items())
    assert abs(float(loss.detach()) - expected) < 1e-5 and torch.isfinite(loss)
    loss.backward()
    assert net.units[0].gates[0].psi.conv.weight.grad is not None  # the finest level's attention gates train
    net.eval()
    with torch.no_grad():
        both, one = net(m, f), net(m[1:], f[1:])
    torch.testing.assert_close(both[1:], one, atol=1e-5, rtol=1e-4)
    with torch.no_grad():  # the backward prediction is the forward one with the images swapped
        net(m, f)
        backward = net.last_outputs["ddf_backward"]
        swapped = net(f, m)
    torch.testing.assert_close(backward, swapped, atol=1e-5, rtol=1e-4)


def test_smgicnet_parameter_count():
    """Each level network has 522,272 parameters at the finest level (5 inputs), as the reference's level-4 module's
    parameters used by its forward pass (counted by instantiating LSYLAB/SM-GICNet's model_stage.py)."""
    net = SMGICNet(3)
    assert [sum(p.numel() for p in u.parameters()) for u in net.units] == [522_272, 524_000, 524_000, 519_680]


def test_smgicnet_variant_config():
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([os.path.join(ROOT, "configs", "train.json"), os.path.join(ROOT, "configs", "variants", "smgicnet.json")])
    parser["spatial_dims"] = 2
    net = parser.get_parsed_content("network_def")
    loss = parser.get_parsed_content("loss")
    assert isinstance(net, SMGICNet) and isinstance(loss, SMGICNetLoss) and loss.network[0] is net
    assert net.levels == 4 and loss.weights["symmetric"] == 0.001 and loss.weights["multilevel"] == 0.0005
    assert parser.get_parsed_content("max_epochs") == 20
    levelwise = parser.get_parsed_content("levelwise")
    assert isinstance(levelwise, LevelwiseTraining) and levelwise.epochs == [4, 4, 6, 6]
    assert parser.get_parsed_content("extra_train_handlers")[-1] is levelwise
    assert "@extra_train_handlers" in parser["train"]["trainer"]["train_handlers"]  # reaches the trainer


def test_smgicnet_velocity_increment_bound():
    """range_flow bounds each increment by range_flow * (size - 1) / 2 voxels per axis (softsign), monotonically."""
    net = SMGICNet(2, channels=4, levels=2, range_flow=0.2)
    raw = torch.tensor([-1e6, -1.0, 0.0, 1.0, 1e6]).view(1, 1, 5, 1).expand(1, 2, 5, 9)
    dv = net._bound(raw)
    assert torch.allclose(dv[0, 0, :, 0], 0.2 * 2.0 * torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]), atol=1e-5)
    assert torch.allclose(dv[0, 1, :, 0], 0.2 * 4.0 * torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]), atol=1e-5)
    assert torch.equal(SMGICNet(2, range_flow=None)._bound(raw), raw)
