"""SACB-Net: k-means, the matching-score flow estimator, the SACB block and the network."""

from __future__ import annotations

import os

import pytest
import torch

from monai_ipear.networks.blocks.sacb import MatchingFlowEstimator, SpatialAwareConvBlock, kmeans
from monai_ipear.networks.nets.sacbnet import SACBNet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kmeans_separates_clear_clusters_and_is_deterministic():
    g = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 5.0]])
    truth = torch.arange(3).repeat_interleave(50)
    x = centres[truth] + 0.3 * torch.randn(150, 3, generator=g)
    labels, cents = kmeans(x, 3, seed=0)
    # each true cluster maps to exactly one label, and different clusters to different labels
    mapping = {int(t): set(labels[truth == t].tolist()) for t in range(3)}
    assert all(len(v) == 1 for v in mapping.values())
    assert len({next(iter(v)) for v in mapping.values()}) == 3
    for t in range(3):
        c = cents[next(iter(mapping[t]))]
        assert torch.allclose(c, x[truth == t].mean(0), atol=1e-5)
    labels2, cents2 = kmeans(x, 3, seed=0)
    assert torch.equal(labels, labels2) and torch.equal(cents, cents2)


def test_kmeans_runs_to_convergence_with_a_cap():
    """Default: Lloyd iterations until no label changes (a fixed point: the next update would repeat the centroids),
    as SACB-Net's reference (tol 1e-9, no practical limit); ``max_iters`` caps it; a fixed ``num_iters`` still works."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(400, 2, generator=g)  # no clear clusters: Lloyd needs many iterations
    labels, cents = kmeans(x, 7, seed=0)
    # converged: centroids are the means of their clusters and every point is nearest to its own centroid
    for k in range(7):
        if (labels == k).any():
            assert torch.allclose(cents[k], x[labels == k].mean(0), atol=1e-5)
    assert torch.equal(torch.cdist(x, cents).argmin(1), labels)
    long_labels, _ = kmeans(x, 7, num_iters=500, seed=0)
    assert torch.equal(labels, long_labels)
    one_labels, one_cents = kmeans(x, 7, num_iters=1, seed=0)
    capped_labels, capped_cents = kmeans(x, 7, seed=0, max_iters=1)
    assert torch.equal(one_labels, capped_labels) and torch.equal(one_cents, capped_cents)
    assert not torch.equal(one_labels, labels)  # one iteration is not converged on this data


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_matching_estimator_recovers_one_voxel_shift(spatial_dims):
    g = torch.Generator().manual_seed(0)
    size = (12,) * spatial_dims
    fixed = torch.randn(2, 16, *size, generator=g)
    # unit-norm features scaled by 10: the dot product peaks at the identical feature (Cauchy-Schwarz), sharply
    fixed = 10.0 * fixed / fixed.norm(dim=1, keepdim=True)
    est = MatchingFlowEstimator(spatial_dims)
    for axis in range(spatial_dims):
        moving = torch.roll(fixed, shifts=1, dims=2 + axis)  # moving(x + e_axis) = fixed(x)
        flow = est(moving, fixed)
        inner = (slice(None), slice(None)) + (slice(2, -2),) * spatial_dims
        expected = torch.zeros(spatial_dims)
        expected[axis] = 1.0
        err = (flow[inner] - expected.view(1, -1, *([1] * spatial_dims))).abs().max()
        assert err < 1e-3, f"axis {axis}: max error {err}"


def test_sacb_block_batch_equals_samples_and_uses_clusters():
    torch.manual_seed(0)
    block = SpatialAwareConvBlock(3, 8, num_clusters=4).eval()
    x = torch.randn(2, 8, 8, 8, 8)
    with torch.no_grad():
        both = block(x)
        one = block(x[:1])
        two = block(x[1:])
    assert torch.allclose(both[:1], one, atol=1e-5) and torch.allclose(both[1:], two, atol=1e-5)
    assert block.last_labels.shape == (1, 8, 8, 8)
    assert len(torch.unique(block.last_labels)) > 1  # several regions get their own kernel
    # with a single cluster the block is an ordinary conv (kernel mask and bias constant over space)
    one_cluster = SpatialAwareConvBlock(2, 4, num_clusters=1)
    y = torch.randn(1, 4, 10, 10)
    with torch.no_grad():
        out = one_cluster(y)
        proj = one_cluster.proj_in(y)
        cen = one_cluster.patch_means(proj).mean((2, 3))
        w = (one_cluster.kernel_mlp(cen)[0][None, None] * one_cluster.weight).reshape(4, 4, 3, 3)
        ref = torch.nn.functional.conv2d(proj, w, one_cluster.bias_mlp(cen)[0], padding=1)
    assert torch.allclose(out, one_cluster.act(ref) + y, atol=1e-4)


def test_sacbnet_parameter_count_and_batch():
    n = sum(p.numel() for p in SACBNet(3).parameters())
    assert abs(n - 1.106e6) / 1.106e6 < 0.05, n
    torch.manual_seed(0)
    net = SACBNet(2).eval()
    m, f = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        both = net(m, f)
        one = net(m[:1], f[:1])
    assert both.shape == (2, 2, 32, 32)
    assert torch.allclose(both[:1], one, atol=1e-3)  # float reordering in the grouped conv
    assert net.last_iterations.shape == (1, 5)
    net.train()
    out = net(m[:1, :, :20, :20], f[:1, :, :20, :20])  # padded to 32 and cropped back
    assert out.shape == (1, 2, 20, 20)
    out.abs().mean().backward()
    assert net.decoders[1].sacb.kernel_mlp[0].weight.grad is not None
    with pytest.raises(ValueError):
        net(m, f[:, :, :16])


def test_sacbnet_variant_config():
    path = os.path.join(ROOT, "configs", "train.json")
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([path, os.path.join(ROOT, "configs", "variants", "sacbnet.json")])
    parser["spatial_dims"] = 2
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, SACBNet) and net.spatial_dims == 2
