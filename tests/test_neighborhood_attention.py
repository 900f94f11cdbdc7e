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
