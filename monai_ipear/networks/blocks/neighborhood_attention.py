"""Neighborhood attention (Hassani et al., 2023) in plain PyTorch for 2D and 3D feature maps.

Written by hand because NATTEN, the library that implements it, ships no CPU wheels and is not a
dependency here; when ``natten`` is importable it can be used instead (``use_natten=True``), and a test
checks that both agree.

Border handling follows NATTEN: the window is *clamped*, i.e. shifted to stay inside the feature map,
so every query attends to exactly ``kernel_size ** spatial_dims`` real positions (no zero padding).
Along an axis shorter than the kernel the window covers the whole axis.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["NeighborhoodAttention", "neighborhood_indices", "natten_available"]


def natten_available() -> bool:
    try:
        import natten  # noqa: F401
    except ImportError:
        return False
    return True


def neighborhood_indices(size: int, kernel_size: int, device=None) -> list[torch.Tensor]:
    """Indices of the clamped neighborhood along one axis.

    Returns ``k_eff = min(kernel_size, size)`` index tensors of length ``size``; tensor ``o`` holds, for
    every query position ``i``, the position of its ``o``-th neighbor: ``clamp(i - r, 0, size - k_eff) + o``
    with ``r = k_eff // 2``.
    """
    k = min(kernel_size, size)
    r = k // 2
    start = (torch.arange(size, device=device) - r).clamp(0, size - k)
    return [start + o for o in range(k)]


class NeighborhoodAttention(nn.Module):
    """Multi-head neighborhood attention over a channels-last feature map.

    Args:
        spatial_dims: 2 or 3.
        channels: feature channels ``C`` (divisible by ``num_heads``).
        num_heads: attention heads.
        kernel_size: odd neighborhood size per axis.
        qkv_bias: bias in the query/key/value projection.
        use_natten: use NATTEN's kernels (must be importable); default plain PyTorch.

    Input ``(B, *spatial, C)`` channels-last; output the same shape. Queries are scaled by ``head_dim ** -0.5``;
    no relative position bias (as NAP/iPEAR use it).
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        num_heads: int,
        kernel_size: int = 3,
        qkv_bias: bool = True,
        use_natten: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}.")
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads}).")
        if use_natten and not natten_available():
            raise ImportError("use_natten=True but the natten package is not importable.")
        self.spatial_dims = spatial_dims
        self.channels = channels
        self.num_heads = num_heads
        self.kernel_size = kernel_size
        self.head_dim = channels // num_heads
        self.scale = self.head_dim**-0.5
        self.use_natten = use_natten
        self.qkv = nn.Linear(channels, 3 * channels, bias=qkv_bias)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.spatial_dims + 2 or x.shape[-1] != self.channels:
            raise ValueError(
                f"expected a channels-last tensor (B, *spatial[{self.spatial_dims}], {self.channels}), got {tuple(x.shape)}."
            )
        spatial = x.shape[1:-1]
        qkv = self.qkv(x).reshape(*x.shape[:-1], 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(-3)  # each (B, *spatial, heads, head_dim)
        if self.use_natten:
            out = self._natten(q, k, v)
        else:
            out = self._attend(q * self.scale, k, v, spatial)
        return self.proj(out.reshape(*x.shape[:-1], self.channels))

    def _attend(self, q, k, v, spatial) -> torch.Tensor:
        # One gathered copy of K (then V) per neighbor keeps memory at O(kernel^d) logits rather than
        # O(kernel^d) feature copies; gathering axis by axis reuses the partial gathers (3 + 9 + 27 index_selects
        # in 3D instead of 3 * 27).
        axes = [neighborhood_indices(s, self.kernel_size, q.device) for s in spatial]

        def neighbors(t: torch.Tensor, axis: int = 0):
            if axis == len(axes):
                yield t
                return
            for idx in axes[axis]:
                yield from neighbors(t.index_select(axis + 1, idx), axis + 1)

        logits = torch.stack([(q * kn).sum(-1) for kn in neighbors(k)], dim=-1)  # (B, *S, heads, n)
        attn = logits.float().softmax(dim=-1).to(v.dtype)
        out = torch.zeros_like(v)
        for j, vn in enumerate(neighbors(v)):
            out = out + attn[..., j : j + 1] * vn
        return out

    def _natten(self, q, k, v) -> torch.Tensor:  # pragma: no cover - needs natten
        import natten.functional as nf

        fn = nf.na3d if self.spatial_dims == 3 else nf.na2d
        return fn(q, k, v, kernel_size=self.kernel_size, scale=self.scale)
