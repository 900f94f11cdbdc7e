"""Neighborhood attention in plain PyTorch against a naive per-position loop."""

import itertools

import pytest
import torch

from monai_ipear.networks.blocks import NeighborhoodAttention, natten_available


def naive_na(module: NeighborhoodAttention, x: torch.Tensor) -> torch.Tensor:
    """Reference: for every query, loop over its clamped window (NATTEN's border rule)."""
    b, *spatial, c = x.shape
    h, d, k = module.num_heads, module.head_dim, module.kernel_size
    q, key, v = module.qkv(x).reshape(b, *spatial, 3, h, d).unbind(-3)
    out = torch.zeros(b, *spatial, h, d)
    for pos in itertools.product(*[range(s) for s in spatial]):
        windows = []
        for i, n in zip(pos, spatial):
            ke = min(k, n)
            start = min(max(i - ke // 2, 0), n - ke)
            windows.append(range(start, start + ke))
        neigh = list(itertools.product(*windows))
        for bb in range(b):
            for hh in range(h):
                qv = q[(bb, *pos, hh)] * d**-0.5
                logits = torch.stack([(qv * key[(bb, *nb, hh)]).sum() for nb in neigh])
                w = logits.softmax(0)
                out[(bb, *pos, hh)] = sum(wj * v[(bb, *nb, hh)] for wj, nb in zip(w, neigh))
    return module.proj(out.reshape(b, *spatial, c))


@pytest.mark.parametrize(
    "spatial_dims,size,kernel", [(2, (5, 6), 3), (2, (4, 7), 5), (3, (4, 5, 3), 3), (3, (3, 4, 2), 3)]
)
def test_plain_na_equals_naive_loop(spatial_dims, size, kernel):
    torch.manual_seed(0)
    na = NeighborhoodAttention(spatial_dims, channels=8, num_heads=2, kernel_size=kernel)
    x = torch.randn(2, *size, 8)
    with torch.no_grad():
        assert torch.allclose(na(x), naive_na(na, x), atol=1e-5)


def test_na_window_is_clamped_not_zero_padded():
    """At a corner, a clamped window holds k^d real positions: a uniform map stays exactly uniform."""
    torch.manual_seed(0)
    na = NeighborhoodAttention(3, channels=4, num_heads=1, kernel_size=3)
    x = torch.ones(1, 5, 5, 5, 4) * torch.randn(4)
    with torch.no_grad():
        out = na(x)
    assert torch.allclose(out, out[:, :1, :1, :1].expand_as(out), atol=1e-6)


def test_na_rejects_bad_configuration():
    with pytest.raises(ValueError, match="odd"):
        NeighborhoodAttention(3, 8, 2, kernel_size=4)
    with pytest.raises(ValueError, match="divisible"):
        NeighborhoodAttention(3, 6, 4)
    with pytest.raises(ValueError, match="channels-last"):
        NeighborhoodAttention(3, 8, 2)(torch.zeros(1, 8, 4, 4, 4))


def test_natten_agrees_with_plain_pytorch():
    if not natten_available() or not torch.cuda.is_available():
        pytest.skip("NATTEN is not installed or no CUDA device: NATTEN ships no CPU wheels (plain PyTorch path used)")
    torch.manual_seed(0)
    plain = NeighborhoodAttention(3, 16, 2).cuda()
    fast = NeighborhoodAttention(3, 16, 2, use_natten=True).cuda()
    fast.load_state_dict(plain.state_dict())
    x = torch.randn(2, 8, 9, 10, 16, device="cuda")
    with torch.no_grad():
        assert torch.allclose(plain(x), fast(x), atol=1e-4)


# --- the fast (shifted) path against the reference (gather) path ---------------------------------------------

from monai_ipear.networks.blocks import NABlock, NAEncoder  # noqa: E402
from monai_ipear.networks.blocks.neighborhood_attention import (  # noqa: E402
    clamped_window_pad,
    neighborhood_indices,
    shifted_neighborhood_attention,
)

SHAPES = [(2, (5, 6), 3), (2, (4, 7), 5), (2, (1, 5), 3), (3, (4, 5, 3), 3), (3, (3, 4, 2), 3), (3, (7, 6, 9), 3), (3, (9, 2, 1), 5)]


@pytest.mark.parametrize("size,kernel", [(1, 3), (2, 3), (3, 3), (4, 3), (7, 3), (4, 5), (9, 5), (6, 7)])
def test_clamped_window_pad_gives_the_clamped_window_as_a_set(size, kernel):
    x = torch.arange(size, dtype=torch.float64)[None]
    padded = clamped_window_pad(x, 1, kernel)[0].long()
    k = min(kernel, size)
    reference = torch.stack(neighborhood_indices(size, kernel), 1)  # (size, k)
    for i in range(size):
        assert sorted(padded[i : i + k].tolist()) == sorted(reference[i].tolist())


@pytest.mark.parametrize("spatial_dims,size,kernel", SHAPES)
def test_shifted_equals_gather_forward_and_backward(spatial_dims, size, kernel):
    torch.manual_seed(0)
    fast = NeighborhoodAttention(spatial_dims, 8, 2, kernel)
    ref = NeighborhoodAttention(spatial_dims, 8, 2, kernel, implementation="gather")
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, *size, 8, requires_grad=True)
    yf, yr = fast(x), ref(x)
    assert torch.allclose(yf, yr, atol=1e-5)
    g = torch.randn_like(yf)
    gf = torch.autograd.grad((yf * g).sum(), [x, *fast.parameters()])
    gr = torch.autograd.grad((yr * g).sum(), [x, *ref.parameters()])
    for a, b in zip(gf, gr):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


@pytest.mark.parametrize("spatial_dims,size,kernel", SHAPES)
def test_na_block_channels_first_path_equals_reference(spatial_dims, size, kernel):
    torch.manual_seed(1)
    fast = NABlock(spatial_dims, 8, 2, kernel)
    with torch.no_grad():  # non-trivial LayerNorm affine: it is folded into the projections on the fast path
        for p in fast.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ref = NABlock(spatial_dims, 8, 2, kernel, implementation="gather")
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, 8, *size, requires_grad=True)
    yf, yr = fast(x), ref(x)
    assert torch.allclose(yf, yr, atol=1e-5)
    g = torch.randn_like(yf)
    gf = torch.autograd.grad((yf * g).sum(), [x, *fast.parameters()])
    gr = torch.autograd.grad((yr * g).sum(), [x, *ref.parameters()])
    for a, b in zip(gf, gr):
        assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


@pytest.mark.parametrize("spatial_dims,size", [(2, (4, 5)), (3, (3, 4, 2))])
def test_shifted_backward_gradcheck(spatial_dims, size):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 3, *size, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: shifted_neighborhood_attention(a, b, c, spatial_dims, 3), (q, k, v))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_na_encoder_fast_equals_reference(spatial_dims):
    torch.manual_seed(0)
    size = (24, 20) if spatial_dims == 2 else (16, 12, 8)
    fast = NAEncoder(spatial_dims)
    ref = NAEncoder(spatial_dims)
    ref.load_state_dict(fast.state_dict())
    for m in ref.modules():
        if isinstance(m, NeighborhoodAttention):
            m.implementation = "gather"
    x = torch.rand(2, 1, *size)
    with torch.no_grad():
        for a, b in zip(fast(x), ref(x)):
            assert torch.allclose(a, b, atol=1e-5)


def test_na_rejects_unknown_implementation():
    with pytest.raises(ValueError, match="implementation"):
        NeighborhoodAttention(3, 8, 2, implementation="magic")
