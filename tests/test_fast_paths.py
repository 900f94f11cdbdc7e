"""Every fast path equals its reference path: fields within 1e-4 voxels (fp32) and equal update counts, in 2D and
3D with batch 2 on CPU; TCI's similarity is computed on the images' own extent (padding cropped off)."""

import pytest
import torch
import torch.nn.functional as F

import monai_ipear
from monai_ipear.controllers import TCI, FixedIterations, IterStop
from monai_ipear.controllers.similarity import PreparedSimilarity, global_ncc, global_ncc_iirp, negative_mse
from monai_ipear.networks.blocks.fields import FieldComposer, crop_to, resize_ddf, upsample_linear
from monai_ipear.networks.nets import use_reference_paths


def _blobs(spatial, shift, batch=2, seed=0):
    """Smooth random images in [0, 1]; the moving ones shifted by ``shift`` voxels along every axis."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 1, *[max(2, s // 4) for s in spatial], generator=g)
    mode = "bilinear" if len(spatial) == 2 else "trilinear"
    fixed = torch.nn.functional.interpolate(coarse, size=tuple(spatial), mode=mode, align_corners=True)
    moving = torch.roll(fixed, shifts=(shift,) * len(spatial), dims=tuple(range(2, 2 + len(spatial))))
    return moving, fixed


def _ipear(spatial_dims, controller, seed=0):
    torch.manual_seed(seed)
    net = monai_ipear.iPEAR(spatial_dims=spatial_dims, controller=controller)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".cl3.conv." in name:
                p.mul_(0.2)
    return net.eval()


@pytest.mark.parametrize("spatial_dims,size", [(2, (36, 30)), (3, (16, 20, 12))])
@pytest.mark.parametrize("controller", [TCI(), FixedIterations(2), IterStop()], ids=["tci", "fixed2", "iterstop"])
@pytest.mark.parametrize("slab_bytes", [None, 1], ids=["default-slabs", "one-plane-slabs"])
def test_ipear_fast_paths_equal_reference(spatial_dims, size, controller, slab_bytes, monkeypatch):
    """The whole network, fast paths against reference paths; the few-output convolutions also with slabs of one
    plane (what full-resolution volumes get; these small ones fit in one slab)."""
    if slab_bytes is not None:
        from monai_ipear.networks.blocks import depth_split

        monkeypatch.setattr(depth_split, "SLAB_BYTES", slab_bytes)
    moving, fixed = _blobs(size, 2)
    fast = _ipear(spatial_dims, controller)
    ref = use_reference_paths(_ipear(spatial_dims, controller))
    with torch.no_grad():
        ddf_fast, ddf_ref = fast(moving, fixed), ref(moving, fixed)
    assert torch.equal(fast.last_iterations, ref.last_iterations)
    assert (ddf_fast - ddf_ref).abs().max() <= 1e-4
    assert ddf_fast.abs().max() > 0.05  # the fields are not trivially zero
    for a, b in zip(fast.last_similarities, ref.last_similarities):
        assert torch.allclose(a, b, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("spatial_dims,size", [(2, (36, 30)), (3, (16, 20, 12))])
@pytest.mark.parametrize("slab_bytes", [None, 1], ids=["default-slabs", "one-plane-slabs"])
def test_rpnet_fast_paths_equal_reference(spatial_dims, size, slab_bytes, monkeypatch):
    """RP-Net under IterStop (IIRP-Net): its decoders' fast paths (the head depth-split, the concatenation
    channels-last and released early) against the reference paths: same fields, same update counts."""
    from monai_ipear.networks.blocks import depth_split
    from monai_ipear.networks.nets import RPNet

    if slab_bytes is not None:
        monkeypatch.setattr(depth_split, "SLAB_BYTES", slab_bytes)
    moving, fixed = _blobs(size, 2)
    nets = []
    for _ in range(2):
        torch.manual_seed(0)
        nets.append(RPNet(spatial_dims=spatial_dims, controller=IterStop()).eval())
    fast, ref = nets[0], use_reference_paths(nets[1])
    with torch.no_grad():
        ddf_fast, ddf_ref = fast(moving, fixed), ref(moving, fixed)
    assert torch.equal(fast.last_iterations, ref.last_iterations)
    assert (ddf_fast - ddf_ref).abs().max() <= 1e-4
    assert ddf_fast.abs().max() > 0.05  # the fields are not trivially zero


@pytest.mark.parametrize("spatial_dims,size", [(2, (36, 30)), (3, (16, 20, 12))])
def test_training_step_gradients_equal_reference(spatial_dims, size):
    moving, fixed = _blobs(size, 1)
    fast, ref = _ipear(spatial_dims, TCI()).train(), use_reference_paths(_ipear(spatial_dims, TCI())).train()
    grads = []
    for net in (fast, ref):
        net.zero_grad()
        ddf = net(moving, fixed)
        loss = (net.fields.warp(moving, ddf) - fixed).square().mean() + 0.1 * ddf.square().mean()
        loss.backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-3), (a - b).abs().max()


@pytest.mark.parametrize("in_channels,size", [(1, (2, 1, 9, 7)), (3, (2, 3, 6, 5, 7))])
def test_channels_last_training_block_equals_the_plain_block(in_channels, size, monkeypatch):
    from monai_ipear.networks.blocks.encoders import ConvGELUBlock

    torch.manual_seed(0)
    fast = ConvGELUBlock(len(size) - 2, in_channels, 4)
    plain = ConvGELUBlock(len(size) - 2, in_channels, 4)
    plain.load_state_dict(fast.state_dict())
    plain.fast = False
    x = torch.rand(*size) * 3 + 1  # a non-zero mean, as images have
    calls = []
    monkeypatch.setattr(fast, "_forward_channels_last", lambda t, f=fast._forward_channels_last: calls.append(1) or f(t))
    outs, grads = [], []
    for block in (fast, plain):
        xi = x.clone().requires_grad_(in_channels > 1)
        y = block(xi)
        (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        outs.append(y)
        grads.append([p.grad for p in block.parameters()] + ([xi.grad] if xi.requires_grad else []))
    assert calls == [1] and outs[0].is_contiguous()
    assert (outs[0] - outs[1]).abs().max() <= 1e-5
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
    with torch.no_grad():  # inference takes the plain path
        assert torch.equal(fast(x), plain(x)) and calls == [1]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the statistics in float32, as instance norm under autocast
        a, b = fast(x.requires_grad_()), plain(x)
    assert calls == [1, 1] and a.dtype == b.dtype and (a.float() - b.float()).abs().max() <= 0.05 * b.abs().max()


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (2, 3, 4, 5, 6)])
def test_training_instance_norm_equals_torch_in_values_and_gradients(shape):
    from monai_ipear.networks.blocks.encoders import _InstanceNorm

    torch.manual_seed(0)
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    y = (torch.randn(*shape, dtype=torch.float64) * 3 + 2).contiguous(memory_format=fmt).requires_grad_()
    out = _InstanceNorm.apply(y, 1e-5)
    assert out.is_contiguous(memory_format=fmt)  # the layout of its input, no channels-first copy
    assert torch.allclose(out, F.instance_norm(y, eps=1e-5), atol=1e-10)
    assert torch.autograd.gradcheck(lambda t: _InstanceNorm.apply(t, 1e-5), (y,))


@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("size", [(7, 9), (6, 5, 8), (1, 6, 5)])
def test_fast_warp_and_compose_equal_monai_warp(padding_mode, size):
    torch.manual_seed(0)
    fast, ref = FieldComposer(padding_mode), FieldComposer(padding_mode, fast=False)
    image, ddf = torch.rand(2, 3, *size), 2 * torch.randn(2, len(size), *size)
    assert torch.allclose(fast.warp(image, ddf), ref.warp(image, ddf), atol=1e-5)
    assert torch.allclose(fast.compose(ddf, 0.5 * ddf), ref.compose(ddf, 0.5 * ddf), atol=1e-4)
    labels = torch.randint(0, 5, (2, 1, *size)).float()
    assert torch.equal(fast.warp(labels, ddf, mode="nearest"), ref.warp(labels, ddf, mode="nearest"))


@pytest.mark.parametrize("size,factor", [((7, 9), 1), ((6, 5, 8), 1), ((3, 5, 4), 2)])
def test_fast_warp_gradients_equal_monai_warp(size, factor):
    # with gradients for the image (features in training) the fast path samples the image itself with a reversed
    # grid; without them it samples a reversed-axes view with the grid in axis order: both equal MONAI's Warp
    torch.manual_seed(0)
    fast, ref = FieldComposer("zeros"), FieldComposer("zeros", fast=False)
    full = [s * factor for s in size]
    image, ddf = torch.rand(2, 3, *full), 2 * torch.randn(2, len(size), *size)
    weights = torch.rand(2, 3, *full)
    grads = []
    for fc in (fast, ref):
        x, u = image.clone().requires_grad_(), ddf.clone().requires_grad_()
        out = fc.warp(x, u, factor=factor)
        (out * weights).sum().backward()
        grads.append((out.detach(), x.grad, u.grad))
        assert x.grad.is_contiguous()  # the image's gradient keeps the image's layout
    for a, b in zip(*grads):
        assert (a - b).abs().max() <= 1e-4 * max(1.0, b.abs().max().item())
    with torch.no_grad():
        assert (fast.warp(image, ddf, factor=factor) - grads[1][0]).abs().max() <= 1e-5


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("channels", [1, 3, 4, 6, 8])
@pytest.mark.parametrize("size", [(7, 9), (7, 5, 6)])
def test_threaded_grid_sample_equals_one_call(threads, channels, size, monkeypatch):
    # a batch of 1 is split into channel groups (every thread >= 2 channels) or slabs along the first axis (odd
    # sizes: the last slab is padded and cropped); values and gradients equal one grid_sample call
    from monai_ipear.networks.blocks import fields

    torch.manual_seed(0)
    image = torch.rand(1, channels, *size)
    grid = (torch.rand(1, *size, len(size)) * 2.4 - 1.2)
    weights = torch.rand(1, channels, *size)
    results = []
    for split in (True, False):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads if split else 1)
        x, g = image.clone().requires_grad_(), grid.clone().requires_grad_()
        out = fields._grid_sample(x, g, "zeros")
        (out * weights).sum().backward()
        results.append((out.detach(), x.grad, g.grad))
    assert results[0][0].shape == (1, channels, *size)
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1:], results[1][1:]):
        assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("shape,size", [((2, 3, 3, 5, 4), (6, 10, 8)), ((1, 3, 2, 3, 2), (16, 24, 16)),
                                        ((2, 2, 4, 1, 3), (7, 1, 5)), ((2, 3, 5, 4), (10, 8))])
@pytest.mark.parametrize("channels_last", [False, True])
def test_separable_upsampling_equals_the_trilinear_call(shape, size, channels_last, monkeypatch):
    from monai_ipear.networks.blocks import fields

    planewise = []  # which calls took the plane-by-plane path
    original = fields._linear_first_axis
    monkeypatch.setattr(fields, "_linear_first_axis", lambda y, n: planewise.append(n) or original(y, n))
    torch.manual_seed(0)
    x = torch.randn(*shape)
    if channels_last and x.ndim == 5:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    weights = torch.rand(*shape[:2], *size)
    outs = []
    for fn in (upsample_linear, lambda t, s: F.interpolate(t, size=s, mode=("bilinear", "trilinear")[t.ndim - 4], align_corners=True)):
        t = x.clone().requires_grad_()
        out = fn(t, size)
        (out * weights).sum().backward()
        outs.append((out.detach(), t.grad))
    assert outs[0][0].shape == (*shape[:2], *size)
    for a, b in zip(*outs):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())
    assert planewise == []  # with autograd: F.interpolate's differentiable pass
    with torch.no_grad():  # the CPU path without autograd: the first axis plane by plane
        planes = upsample_linear(x, size)
    assert planewise == ([size[0]] if x.ndim == 5 else [])
    assert planes.shape == outs[1][0].shape
    assert (planes - outs[1][0]).abs().max() <= 1e-6 * max(1.0, outs[1][0].abs().max().item())


@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("size,factor", [((5, 4), 4), ((3, 5, 4), 2), ((2, 3, 2), 8)])
def test_warp_of_a_coarse_field_equals_warp_of_the_upsampled_field(padding_mode, size, factor):
    # the full-resolution warp of a coarse field (what TCI evaluates after every update at a coarse level)
    torch.manual_seed(0)
    fast, ref = FieldComposer(padding_mode), FieldComposer(padding_mode, fast=False)
    full = [s * factor for s in size]
    image, ddf = torch.rand(2, 1, *full), 0.7 * torch.randn(2, len(size), *size)
    expected = ref.warp(image, resize_ddf(ddf, factor))
    assert (fast.warp(image, ddf, factor=factor) - expected).abs().max() <= 1e-5
    assert (fast.warp(image, ddf, factor=factor) - image).abs().max() > 0.05  # the field moves the image
    assert torch.equal(ref.warp(image, ddf, factor=factor), expected)  # the reference path is the plain one
    fine = resize_ddf(ddf, factor)
    assert torch.equal(fast.warp(image, fine, factor=1), fast.warp(image, fine))
    with pytest.raises(ValueError, match="do not match"):
        fast.warp(image, ddf)  # a coarse field without its factor


def test_identity_grids_are_kept_per_shape():
    # a pyramid under TCI alternates between a level's grid and the full-resolution grid after every update
    fc = FieldComposer()
    a, b = fc._identity_grid((6, 5, 4), torch.device("cpu")), fc._identity_grid((12, 10, 8), torch.device("cpu"))
    assert fc._identity_grid((6, 5, 4), "cpu")[0] is a[0] and fc._identity_grid((12, 10, 8), "cpu")[0] is b[0]
    # the scales too, per factor (no host-to-device copy per warp): voxels of this grid to the fine grid's units
    assert fc._identity_grid((6, 5, 4), "cpu")[1] is a[1]
    assert fc._identity_grid((6, 5, 4), "cpu", 2)[1] is fc._identity_grid((6, 5, 4), "cpu", 2)[1]
    assert torch.allclose(fc._identity_grid((6, 5, 4), "cpu", 2)[1].flatten(), torch.tensor([4 / 11, 4 / 9, 4 / 7]))
    for n in range(FieldComposer.GRID_CACHE_SIZE + 2):
        fc._identity_grid((n + 2, 3), "cpu")
    assert len(fc._grid_cache) == FieldComposer.GRID_CACHE_SIZE


@pytest.mark.parametrize("fn", [global_ncc, global_ncc_iirp, negative_mse])
def test_prepared_similarity_equals_plain(fn):
    torch.manual_seed(0)
    fixed, warped = torch.rand(3, 1, 9, 8, 7), torch.rand(3, 1, 9, 8, 7)
    prepared = PreparedSimilarity(fn, fixed)
    assert torch.equal(prepared(warped, torch.arange(3)), fn(warped, fixed))
    index = torch.tensor([0, 2])
    assert torch.equal(prepared(warped[index], index), fn(warped[index], fixed[index]))
    flat = torch.zeros_like(fixed)  # zero variance: 0, never NaN
    assert torch.equal(PreparedSimilarity(fn, flat)(warped, torch.arange(3)), fn(warped, flat))


@pytest.mark.parametrize("spatial_dims,size", [(2, (36, 30)), (3, (13, 20, 11))])
def test_similarity_sees_only_the_unpadded_extent(spatial_dims, size):
    """Sizes not divisible by 8 are padded inside the pyramid; the controller judges the original extent only:
    every similarity call gets the original size, and the last level-1 similarity equals the NCC of the
    returned (cropped) field applied to the unpadded pair."""
    moving, fixed = _blobs(size, 2)
    shapes = []

    def ncc(a, b):
        shapes.append((tuple(a.shape[2:]), tuple(b.shape[2:])))
        return global_ncc(a, b)

    net = _ipear(spatial_dims, TCI(similarity=ncc))
    with torch.no_grad():
        ddf = net(moving, fixed)
        s_direct = global_ncc(FieldComposer("zeros").warp(moving, ddf), fixed)
    assert shapes and all(a == tuple(size) and b == tuple(size) for a, b in shapes)
    kept = net.last_iterations[:, 0]
    s_last = net.last_similarities[0][torch.arange(2), kept]
    assert torch.allclose(s_last, s_direct, atol=1e-5)


def test_padded_and_unpadded_pair_give_the_same_similarities_and_decisions():
    """A pair that needs padding and the same pair on a grid that does not (its content placed in a larger, already
    divisible image whose extra region is zero in both images and ignored by a cropping similarity) must not be
    judged on the padding: with a network whose fields vanish (zero last convolutions), s is the NCC of the
    unpadded pair at every update and TCI's decisions follow from it."""
    size = (21, 19)
    moving, fixed = _blobs(size, 2)
    net = _ipear(2, TCI())
    with torch.no_grad():
        for name, p in net.named_parameters():
            if ".cl3.conv." in name:
                p.zero_()
        net(moving, fixed)
    expected = global_ncc(moving, fixed)
    padded_ncc = global_ncc(torch.nn.functional.pad(moving, (0, 5, 0, 3)), torch.nn.functional.pad(fixed, (0, 5, 0, 3)))
    assert not torch.allclose(expected, padded_ncc, atol=1e-4)  # the padding would change s
    for trace in net.last_similarities:
        computed = trace[:, 1:4]
        assert torch.allclose(computed, expected[:, None].expand_as(computed), atol=1e-6)
    assert torch.equal(net.last_iterations, torch.full((2, 4), 3))  # constant s: TCI stops at t = 3


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("slab_bytes", [1, 3000, 2**30])  # one plane per slab, uneven slabs, the whole volume
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("out_channels,in_channels,kernel,bias", [(1, 2, 7, False), (3, 24, 3, True)])
def test_depth_split_conv_slabs_equal_the_plain_convolution(
    monkeypatch, spatial_dims, slab_bytes, channels_last, out_channels, in_channels, kernel, bias
):
    """Without autograd the few-output convolution runs slab by slab (a batch of flat convolutions per slab, its
    shifted sums added into the output): every slab size and input layout gives the plain convolution."""
    from monai_ipear.networks.blocks import depth_split

    monkeypatch.setattr(depth_split, "SLAB_BYTES", slab_bytes)
    g = torch.Generator().manual_seed(5)
    size = (9, 11, 6)[:spatial_dims]
    x = torch.randn(2, in_channels, *size, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if spatial_dims == 2 else torch.channels_last_3d)
    w = torch.randn(out_channels, in_channels, *([kernel] * spatial_dims), generator=g)
    b = torch.randn(out_channels, generator=g) if bias else None
    conv = torch.nn.functional.conv2d if spatial_dims == 2 else torch.nn.functional.conv3d
    ref = conv(x, w, b, padding=kernel // 2)
    with torch.no_grad():
        out = depth_split.depth_split_conv(x, w, b)
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_crop_to_is_the_inverse_of_padding():
    x = torch.rand(2, 1, 5, 7)
    padded = torch.nn.functional.pad(x, (0, 1, 0, 3))
    assert torch.equal(crop_to(padded, (5, 7)), x)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("out_channels,in_channels,kernel", [(1, 2, 7), (3, 24, 3), (2, 5, 5)])
def test_depth_split_conv_equals_the_plain_convolution_with_gradients(spatial_dims, out_channels, in_channels, kernel):
    from monai_ipear.networks.blocks.depth_split import depth_split_conv

    g = torch.Generator().manual_seed(3)
    size = (9, 11, 6)[:spatial_dims]  # the last 3D axis is shorter than the 7-kernel
    x = torch.randn(2, in_channels, *size, generator=g, requires_grad=True)
    w = torch.randn(out_channels, in_channels, *([kernel] * spatial_dims), generator=g, requires_grad=True)
    b = torch.randn(out_channels, generator=g, requires_grad=True)
    conv = torch.nn.functional.conv2d if spatial_dims == 2 else torch.nn.functional.conv3d
    ref = conv(x, w, b, padding=kernel // 2)
    out = depth_split_conv(x, w, b)
    assert out.shape == ref.shape
    scale = ref.abs().max()
    assert (out - ref).abs().max() <= 1e-5 * scale
    grads = torch.autograd.grad((out * ref.detach()).sum(), (x, w, b))
    grads_ref = torch.autograd.grad((ref * ref.detach()).sum(), (x, w, b))
    for a, r in zip(grads, grads_ref):
        assert (a - r).abs().max() <= 1e-5 * r.abs().max()


@pytest.mark.parametrize("spatial_dims,size", [(2, (20, 18)), (3, (12, 10, 14))])
def test_farm_training_paths_give_the_reference_gradients(spatial_dims, size):
    """In training FARM makes R channels-last and SEB hands its pooling gradient back expanded: same gradients."""
    import copy

    from monai_ipear.networks.blocks.farm import FARM, SqueezeExcitationBlock
    from monai_ipear.networks.nets import use_channels_last

    torch.manual_seed(0)
    fast = use_channels_last(FARM(spatial_dims, 8, 16))
    ref = copy.deepcopy(fast)
    ref.fast = False
    assert fast.seb.fast and not ref.seb.fast
    m0, f = torch.randn(2, 8, *size), torch.randn(2, 8, *size)
    results = []
    for farm in (fast, ref):
        m = m0.clone().requires_grad_()
        y = farm(m, f)
        (y * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        results.append([m.grad] + [p.grad for p in farm.parameters()])
    for a, b in zip(*results):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-6, (a - b).abs().max()
    seb = SqueezeExcitationBlock(spatial_dims, 6, 2)
    x = torch.rand(2, 6, *size, requires_grad=True)
    (gx,) = torch.autograd.grad((seb(x) ** 2).sum(), x)
    seb.fast = False
    (gr,) = torch.autograd.grad((seb(x) ** 2).sum(), x)
    assert (gx - gr).abs().max() <= 1e-5 * gr.abs().max()


@pytest.mark.parametrize("spatial_dims,size", [(2, (20, 18)), (3, (12, 10, 14))])
def test_farm_fast_convolutions_and_channels_last_equal_reference(spatial_dims, size):
    """FARM's depth-split SAB / Cl3 convolutions and the channels-last decoder weights change no value."""
    import copy

    from monai_ipear.networks.blocks.farm import FARM
    from monai_ipear.networks.nets import use_channels_last

    torch.manual_seed(0)
    farm = FARM(spatial_dims, 8, 16)
    ref = copy.deepcopy(farm)
    ref.fast = False
    use_channels_last(farm)
    fmt = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
    assert farm.cl3.conv.weight.is_contiguous(memory_format=fmt) and not farm.sab.conv.conv.weight.is_contiguous()
    assert farm.sab.fast and not ref.sab.fast
    m, f = torch.randn(2, 8, *size), torch.randn(2, 8, *size)
    out, expected = farm(m, f), ref(m, f)
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert farm.state_dict().keys() == ref.state_dict().keys()
    net = monai_ipear.iPEAR(spatial_dims=spatial_dims)
    conv_weights = [mod.weight for mod in net.decoders.modules() if isinstance(mod, torch.nn.modules.conv._ConvNd)
                    and mod.weight.dim() == spatial_dims + 2]
    assert conv_weights and all(w.is_contiguous(memory_format=fmt) for w in conv_weights)
    use_reference_paths(net)
    assert all(w.is_contiguous() for w in conv_weights) and not any(m.fast for m in net.modules() if isinstance(m, FARM))


def test_keep_freed_cpu_memory_is_on_by_default_and_can_be_turned_off():
    import os
    import subprocess
    import sys

    code = "from monai_ipear.runtime import keep_freed_cpu_memory as k; print(k(), k())"
    env = {k: v for k, v in os.environ.items() if k != "MONAI_IPEAR_KEEP_FREED_MEMORY"}
    on = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    off = subprocess.run([sys.executable, "-c", code], env={**env, "MONAI_IPEAR_KEEP_FREED_MEMORY": "0"},
                         capture_output=True, text=True, check=True)
    expected = "True True" if sys.platform.startswith("linux") else "False False"
    assert on.stdout.split() == expected.split(), on.stderr
    assert off.stdout.split() == ["False", "False"], off.stderr
    bad = subprocess.run([sys.executable, "-c", code], env={**env, "MONAI_IPEAR_KEEP_FREED_MEMORY": "maybe"},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "MONAI_IPEAR_KEEP_FREED_MEMORY must be a boolean" in bad.stderr


def test_entry_points_switch_the_allocator_setting_on_as_programs_only():
    """``python -m monai_ipear`` and ``python -m monai_ipear.benchmark`` turn :func:`keep_freed_cpu_memory` on;
    the same functions called from Python with an argument list do not (a regression: the benchmark once tested
    ``argv is None`` after rebinding ``argv``, so the setting never applied to its runs)."""
    import os
    import subprocess
    import sys

    code = ("import runpy, sys\n"
            "from monai_ipear import runtime\n"
            "sys.argv = [sys.argv[1], '--help']\n"
            "try:\n"
            "    runpy.run_module(sys.argv[0], run_name='__main__')\n"
            "except SystemExit:\n"
            "    pass\n"
            "print('SETTING', runtime.keeps_freed_cpu_memory())\n")
    env = {k: v for k, v in os.environ.items() if k != "MONAI_IPEAR_KEEP_FREED_MEMORY"}
    expected = str(sys.platform.startswith("linux"))
    for module in ("monai_ipear", "monai_ipear.benchmark"):
        run = subprocess.run([sys.executable, "-c", code, module], env=env, capture_output=True, text=True)
        assert f"SETTING {expected}" in run.stdout, (module, run.stdout[-500:], run.stderr[-2000:])
    code_in_python = ("from monai_ipear import runtime\n"
                      "from monai_ipear.cli import cli_main\n"
                      "from monai_ipear.benchmark.__main__ import benchmark_main\n"
                      "cli_main(['--version'])\n"
                      "try:\n"
                      "    benchmark_main(['--help'])\n"
                      "except SystemExit:\n"
                      "    pass\n"
                      "print('SETTING', runtime.keeps_freed_cpu_memory())\n")
    run = subprocess.run([sys.executable, "-c", code_in_python], env=env, capture_output=True, text=True)
    assert "SETTING False" in run.stdout, (run.stdout[-500:], run.stderr[-2000:])


@pytest.mark.parametrize("spatial_dims,size", [(2, (12, 10)), (3, (8, 10, 6))])
def test_farm_without_autograd_reuses_buffers_with_the_same_values(spatial_dims, size):
    """Without autograd FARM's residual units, SEB and SAB work in place (lower peak memory): same outputs as with
    autograd and as the reference path, for every ablation variant, and the caller's tensors are never modified."""
    from monai_ipear.networks.blocks.farm import FARM, FARMSpatialAttention, SqueezeExcitationBlock

    torch.manual_seed(0)
    moving, fixed = torch.randn(2, 4, *size), torch.randn(2, 4, *size)
    kept = moving.clone(), fixed.clone()
    # every ablation variant: which pathway may overwrite R depends on which parts exist
    for use_seb, use_sab, use_rp in [(True, True, True), (False, True, True), (True, True, False), (False, True, False), (True, False, True)]:
        farm = FARM(spatial_dims, 4, 8, use_seb=use_seb, use_sab=use_sab, use_rp=use_rp)
        with_grad = farm(moving, fixed)
        assert with_grad.requires_grad
        with torch.no_grad():
            without = farm(moving, fixed)
            farm.fast = False
            reference = farm(moving, fixed)  # the plain convolutions on the concatenation
        assert torch.allclose(with_grad, without, atol=1e-6), (use_seb, use_sab, use_rp)
        assert torch.allclose(reference, without, atol=1e-5), (use_seb, use_sab, use_rp)
        assert torch.equal(moving, kept[0]) and torch.equal(fixed, kept[1])
    x = torch.randn(2, 6, *size)
    x_kept = x.clone()
    for block in (FARMSpatialAttention(spatial_dims), SqueezeExcitationBlock(spatial_dims, 6, 2)):
        with torch.no_grad():
            out = block(x)
            assert torch.equal(x, x_kept)  # not in place unless asked
            assert torch.equal(block(x, inplace=True), out) and torch.equal(x, out)
            x.copy_(x_kept)
        x_grad = x.clone().requires_grad_()
        # autograd: a copy (and SAB's convolution over the whole volume, not in slabs: equal up to float rounding)
        assert torch.allclose(block(x_grad, inplace=True), out, atol=1e-6) and torch.equal(x_grad.detach(), x_kept)


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc allocator settings: Linux only")
def test_kept_memory_stays_until_released():
    """With :func:`keep_freed_cpu_memory` a freed 300 MiB tensor stays resident (reused without page faults) until
    :func:`release_freed_cpu_memory` gives it back (the benchmark does so before its peak-memory child)."""
    import os
    import subprocess
    import sys

    code = ("import torch\n"
            "from monai_ipear import runtime\n"
            "def rss():\n"
            "    return int(open('/proc/self/statm').read().split()[1]) * 4096 // 2**20\n"
            "print(runtime.release_freed_cpu_memory(), runtime.keep_freed_cpu_memory())\n"
            "base = rss()\n"
            "x = torch.ones(300 * 2**20 // 4)\n"
            "small = torch.ones(10)\n"  # allocated after x: the heap top is not free, so nothing could shrink it
            "del x\n"
            "kept = rss() - base\n"
            "print(runtime.release_freed_cpu_memory(), kept, rss() - base)\n")
    env = {k: v for k, v in os.environ.items() if k != "MONAI_IPEAR_KEEP_FREED_MEMORY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["False", "True"]  # nothing to release before the setting is on
    released, kept, after = out[2] == "True", int(out[3]), int(out[4])
    assert released and kept >= 250 and after <= kept - 200, out


def test_reduced_precision_uses_the_package_dtype_and_warns_where_bfloat16_is_emulated(monkeypatch):
    """One precision setting for every autocast option: bfloat16 on CPU, float16 on CUDA; off is a plain context;
    on a CPU without AVX512-BF16 or AMX a warning says bfloat16 is emulated (slower)."""
    import warnings

    from monai_ipear.runtime import autocast_dtype, reduced_precision

    assert autocast_dtype("cuda") == torch.float16 and autocast_dtype("cpu") == torch.bfloat16
    with reduced_precision(torch.device("cpu"), False):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with reduced_precision("cpu"):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with pytest.warns(UserWarning, match="emulated"):
        with reduced_precision("cpu"):
            pass


def test_benchmark_calls_use_the_package_reduced_precision():
    """The benchmark's timed inference call runs its network under the same reduced precision as ``register
    --autocast`` (bfloat16 on CPU) when asked, and in float32 otherwise."""
    from monai_ipear.benchmark.speed import _Call

    seen = []

    class Spy(torch.nn.Module):
        def forward(self, a, b):
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            return a

    a = torch.rand(1, 1, 4, 4, 4)
    _Call(Spy(), True, "cpu")(a, a)
    _Call(Spy(), False, "cpu")(a, a)
    assert seen == [torch.bfloat16, None]


@pytest.mark.parametrize("size", [(24, 24, 20), (64, 48)])
def test_decoders_without_autograd_hold_few_full_size_maps(monkeypatch, size):
    """Without autograd FARM and the residual decoder release their concatenation R as soon as it is read and make
    the few-output convolutions slab by slab: the tensors of one call peak at 2.5 (FARM) and 2 (residual decoder)
    R-sized maps, against 4.4 and 3 on the reference path (measured with PyTorch's profiler; slabs of one plane, as
    at full resolution), with the same outputs."""
    from monai_ipear.benchmark.memory import cpu_tensor_peak_bytes
    from monai_ipear.networks.blocks import depth_split
    from monai_ipear.networks.blocks.farm import FARM
    from monai_ipear.networks.blocks.flow_estimator import ResidualFlowEstimator
    from monai_ipear.networks.nets import use_channels_last

    monkeypatch.setattr(depth_split, "SLAB_BYTES", 1)
    torch.manual_seed(0)
    moving, fixed = torch.randn(2, 4, *size), torch.randn(2, 4, *size)
    r_bytes = 2 * moving.numel() * moving.element_size()
    for decoder, bound in ((FARM(len(size), 4, 8), 2.75), (ResidualFlowEstimator(len(size), 4, 8), 2.25)):
        use_channels_last(decoder.eval(), True)
        with torch.no_grad():
            fast_out = decoder(moving, fixed)
            fast_peak = cpu_tensor_peak_bytes(decoder, moving, fixed)
            decoder.fast = False
            reference_out = decoder(moving, fixed)
            reference_peak = cpu_tensor_peak_bytes(decoder, moving, fixed)
        name = type(decoder).__name__
        assert fast_peak is not None and reference_peak is not None, "the profiler gave no memory events"
        assert fast_peak <= bound * r_bytes, (name, fast_peak / r_bytes)
        assert reference_peak >= fast_peak + 0.75 * r_bytes, (name, fast_peak / r_bytes, reference_peak / r_bytes)
        assert torch.allclose(fast_out, reference_out, atol=1e-5), name
