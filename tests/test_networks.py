"""iPEAR, the pyramid network and its parts: parameter counts, gradients, batching, input checks."""

import pytest
import torch

from monai_ipear import FARM, TCI, FixedIterations, IterStop, PyramidRegistrationNet, RPNet, iPEAR
from monai_ipear.networks.blocks import ConvEncoder, ResidualFlowEstimator


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_match_the_papers():
    net = iPEAR(3)
    assert abs(n_params(net) - 508_700) / 508_700 < 0.02, n_params(net)
    assert n_params(net) == 512_055  # the figure quoted in docs/architecture.md
    assert n_params(RPNet(3)) == 419_964  # the published IIRP-Net checkpoint


@pytest.mark.parametrize("spatial_dims,size", [(2, 32), (3, 16)])
def test_forward_backward_reaches_every_parameter(spatial_dims, size):
    torch.manual_seed(0)
    for net in (iPEAR(spatial_dims), RPNet(spatial_dims)):
        net.train()
        moving, fixed = torch.rand(2, 2, 1, *[size] * spatial_dims)
        ddf = net(moving, fixed)
        assert ddf.shape == (2, spatial_dims, *[size] * spatial_dims)
        assert torch.equal(net.last_iterations, torch.ones(2, 4, dtype=torch.long))  # one pass per level in training
        (ddf.square().mean() + net.fields.warp(moving, ddf).mean()).backward()
        missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not missing, missing


@pytest.mark.parametrize("spatial_dims,size", [(2, 32), (3, 16)])
def test_tci_batch_equals_one_by_one(spatial_dims, size):
    torch.manual_seed(1)
    net = iPEAR(spatial_dims).eval()
    moving = torch.rand(3, 1, *[size] * spatial_dims)
    fixed = torch.roll(moving, shifts=(1, 2, 3)[:spatial_dims], dims=tuple(range(2, 2 + spatial_dims)))
    fixed[1] = torch.rand_like(fixed[1])  # samples of different difficulty
    with torch.no_grad():
        batch = net(moving, fixed)
        its, sims = net.last_iterations.clone(), [s.clone() for s in net.last_similarities]
        for b in range(3):
            single = net(moving[b : b + 1], fixed[b : b + 1])
            assert torch.allclose(single, batch[b : b + 1], atol=1e-5)
            assert torch.equal(net.last_iterations[0], its[b])
            for lvl in range(4):
                assert torch.allclose(net.last_similarities[lvl][0], sims[lvl][b], atol=1e-6, equal_nan=True)
    assert its.dtype == torch.long and its.shape == (3, 4)
    assert (its >= 3).all() and (its <= 10).all()  # TCI: window t = 3, k_max = 10
    for lvl in range(4):  # the trace holds exactly one similarity per update run
        assert torch.equal((~torch.isnan(sims[lvl][:, 1:])).sum(1), its[:, lvl])


def test_fixed_iterations_run_exactly_k_updates_per_level():
    net = iPEAR(2, controller=FixedIterations(3)).eval()
    with torch.no_grad():
        net(torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16))
    assert torch.equal(net.last_iterations, torch.full((2, 4), 3))


def test_one_controller_per_level():
    net = RPNet(2, controller=[FixedIterations(1), FixedIterations(2), FixedIterations(3), IterStop()]).eval()
    with torch.no_grad():
        net(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16))
    assert net.last_iterations[0, :3].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="one entry per level"):
        RPNet(2, controller=[TCI()] * 3).eval()(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16))


def test_unrolled_training_iterates_with_gradients():
    net = iPEAR(2, controller=FixedIterations(2), unroll_training=True).train()
    ddf = net(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16))
    assert torch.equal(net.last_iterations, torch.full((1, 4), 2))
    ddf.sum().backward()
    assert net.decoders[0].cl3.conv.weight.grad is not None


def test_sizes_not_divisible_are_padded_and_cropped():
    torch.manual_seed(0)
    net = iPEAR(3).eval()
    x = torch.rand(1, 1, 19, 21, 17)
    with torch.no_grad():
        ddf = net(x, torch.rand_like(x))
    assert ddf.shape == (1, 3, 19, 21, 17) and torch.isfinite(ddf).all()


def test_constant_image_never_gives_nan():
    net = iPEAR(3).eval()
    zeros = torch.zeros(2, 1, 16, 16, 16)
    with torch.no_grad():
        ddf = net(zeros, torch.full_like(zeros, 0.5))
    assert torch.isfinite(ddf).all()
    for trace in net.last_similarities:  # NCC of a constant image is 0: flat window, stop at t = 3
        assert torch.equal(trace[:, 1:4], torch.zeros(2, 3))
    assert torch.equal(net.last_iterations, torch.full((2, 4), 3))


@pytest.mark.parametrize(
    "moving_shape,fixed_shape,match",
    [
        ((1, 1, 16, 16, 16), (1, 1, 16, 16, 18), "shapes differ"),
        ((1, 2, 16, 16, 16), (1, 2, 16, 16, 16), "1 channel"),
        ((1, 16, 16, 16), (1, 16, 16, 16), "5 dimensions"),
        ((1, 1, 16, 4, 16), (1, 1, 16, 4, 16), "too small"),
        ((1, 1, 8, 8, 8), (1, 1, 8, 8, 8), "single voxel"),
    ],
)
def test_bad_inputs_raise_value_error_with_shapes(moving_shape, fixed_shape, match):
    net = iPEAR(3).eval()
    with pytest.raises(ValueError, match=match) as err:
        net(torch.rand(moving_shape), torch.rand(fixed_shape))
    assert str(tuple(moving_shape)) in str(err.value) or str(tuple(fixed_shape)) in str(err.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_refused(bad):
    x = torch.rand(1, 1, 16, 16, 16)
    y = x.clone()
    y[0, 0, 3, 3, 3] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        iPEAR(3).eval()(x, y)


def test_farm_switches_all_off_is_the_single_conv_cl3():
    farm = FARM(3, in_channels=8, channels=16, use_seb=False, use_sab=False, use_rp=False)
    assert n_params(farm) == n_params(farm.cl3) == 27 * 16 * 3 + 3
    x, y = torch.rand(2, 1, 8, 6, 6, 6)
    assert torch.allclose(farm(x, y), farm.cl3(torch.cat([x, y], 1)), atol=1e-6)
    full = FARM(3, 8, 16)
    assert {"seb", "sab", "rp", "cl3"} <= {n for n, _ in full.named_children()}
    # switching SEB / SAB off removes exactly their parameters
    assert n_params(full) - n_params(FARM(3, 8, 16, use_seb=False)) == n_params(full.seb)
    assert n_params(full) - n_params(FARM(3, 8, 16, use_sab=False)) == n_params(full.sab)


def test_sab_readings_differ_and_weight_as_described():
    torch.manual_seed(0)
    x = torch.rand(2, 6, 5, 5)
    spatial = FARM(2, 3, 4).sab
    channel = FARM(2, 3, 4, sab_mode="channel").sab
    ys, yc = spatial(x), channel(x)
    # spatial reading: one weight per position shared by all channels; channel reading: one per channel
    ratio_s, ratio_c = ys / x, yc / x
    assert torch.allclose(ratio_s, ratio_s[:, :1].expand_as(ratio_s), atol=1e-5)
    assert torch.allclose(ratio_c, ratio_c[..., :1, :1].expand_as(ratio_c), atol=1e-5)
    with pytest.raises(ValueError, match="SAB mode"):
        FARM(2, 3, 4, sab_mode="temporal")


def test_generic_pyramid_accepts_any_encoder_decoder_pair():
    enc = ConvEncoder(2, 1, (4, 8, 8))
    decs = [FARM(2, 4, 8), ResidualFlowEstimator(2, 8, 8), FARM(2, 8, 8)]
    net = PyramidRegistrationNet(enc, decs, TCI(k_max=4)).eval()
    with torch.no_grad():
        ddf = net(torch.rand(2, 1, 20, 20), torch.rand(2, 1, 20, 20))
    assert ddf.shape == (2, 2, 20, 20) and net.last_iterations.shape == (2, 3)
    with pytest.raises(ValueError, match="levels"):
        PyramidRegistrationNet(enc, decs[:2])


def test_autocast_gives_the_float32_decisions():
    torch.manual_seed(0)
    net = iPEAR(3).eval()
    x = torch.rand(2, 1, 16, 16, 16)
    y = torch.roll(x, 1, 2)
    with torch.no_grad():
        ref = net(x, y)
        its = net.last_iterations.clone()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x, y)
    assert out.dtype == torch.float32  # fields are composed in float32
    assert torch.equal(net.last_iterations, its)
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
