"""Neighborhood attention (Hassani et al., 2023) in plain PyTorch for 2D and 3D feature maps.

Written by hand because NATTEN, the library that implements it, ships no CPU wheels and is not a
dependency here; when ``natten`` is importable it can be used instead (``use_natten=True``), and a test
checks that both agree.

Border handling follows NATTEN: the window is *clamped*, i.e. shifted to stay inside the feature map,
so every query attends to exactly ``kernel_size ** spatial_dims`` real positions (no zero padding).
Along an axis shorter than the kernel the window covers the whole axis.

Two plain-PyTorch implementations compute the same function:

- ``implementation="shifted"`` (default, fast): no relative position bias means the attention of a query depends
  only on the *set* of its neighbors, not on their order. Padding every axis of the keys and values with copies of
  the positions a clamped window reaches instead (:func:`clamped_window_pad`: the low end with positions
  ``k-r .. k-1``, the high end with ``n-k .. n-r-2``) makes the plain shifted window ``i - r .. i + k - 1 - r`` of
  every query hold exactly its clamped window. The ``k^d`` neighbors are then shifted views of the padded tensor,
  no gathered copy of keys or values is made, and the work is done slab by slab along the first spatial axis so
  that it stays in cache. A custom autograd function gives the backward pass the same structure.
- ``implementation="gather"``: the reference, gathering the clamped windows with ``index_select``; the tests
  check that both agree.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn as nn

from ...booleans import as_bool
from ..utils import records_grad, tracing

__all__ = [
    "NeighborhoodAttention",
    "neighborhood_indices",
    "natten_available",
    "clamped_window_pad",
    "shifted_neighborhood_attention",
]

IMPLEMENTATIONS = ("shifted", "gather")


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


def _window_sizes(spatial: Sequence[int], kernel_size: int) -> list[tuple[int, int, int]]:
    """Per axis ``(k_eff, low pad r, high pad k_eff - 1 - r)``."""
    out = []
    for n in spatial:
        k = min(kernel_size, n)
        out.append((k, k // 2, k - 1 - k // 2))
    return out


def _pad_forward(x: torch.Tensor, spatial_dims: int, kernel_size: int) -> torch.Tensor:
    spatial = x.shape[x.ndim - spatial_dims :]
    sizes = _window_sizes(spatial, kernel_size)
    lead = (slice(None),) * (x.ndim - spatial_dims)
    out = x.new_empty((*x.shape[: x.ndim - spatial_dims], *[n + k - 1 for n, (k, _, _) in zip(spatial, sizes)]))
    out[lead + tuple(slice(lo, lo + n) for n, (_, lo, _) in zip(spatial, sizes))] = x
    # axis by axis: the pads of axis a copy positions of axis a over the full padded range of the axes before it
    # (already filled) and the interior of the axes after it
    for a, (k, lo, hi) in enumerate(sizes):
        n = spatial[a]
        before = tuple(slice(None) for _ in range(a))
        after = tuple(slice(l2, l2 + n2) for n2, (_, l2, _) in zip(spatial[a + 1 :], sizes[a + 1 :]))
        if lo:
            out[lead + before + (slice(0, lo),) + after] = out[lead + before + (slice(k, k + lo),) + after]
        if hi:
            out[lead + before + (slice(lo + n, lo + n + hi),) + after] = out[lead + before + (slice(lo + n - k, lo + n - k + hi),) + after]
    return out


def _pad_backward(g: torch.Tensor, spatial_dims: int, spatial: Sequence[int], kernel_size: int) -> torch.Tensor:
    sizes = _window_sizes(spatial, kernel_size)
    lead = (slice(None),) * (g.ndim - spatial_dims)
    g = g.clone()
    for a in reversed(range(spatial_dims)):
        k, lo, hi = sizes[a]
        n = spatial[a]
        before = tuple(slice(None) for _ in range(a))
        after = tuple(slice(l2, l2 + n2) for n2, (_, l2, _) in zip(spatial[a + 1 :], sizes[a + 1 :]))
        if lo:
            g[lead + before + (slice(k, k + lo),) + after] += g[lead + before + (slice(0, lo),) + after]
        if hi:
            g[lead + before + (slice(lo + n - k, lo + n - k + hi),) + after] += g[lead + before + (slice(lo + n, lo + n + hi),) + after]
    return g[lead + tuple(slice(lo, lo + n) for n, (_, lo, _) in zip(spatial, sizes))]


class _ClampedWindowPad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spatial_dims, kernel_size):
        ctx.spatial_dims, ctx.kernel_size = spatial_dims, kernel_size
        ctx.spatial = tuple(x.shape[x.ndim - spatial_dims :])
        return _pad_forward(x, spatial_dims, kernel_size)

    @staticmethod
    def backward(ctx, g):
        return _pad_backward(g, ctx.spatial_dims, ctx.spatial, ctx.kernel_size), None, None


def clamped_window_pad(x: torch.Tensor, spatial_dims: int, kernel_size: int) -> torch.Tensor:
    """Pad the last ``spatial_dims`` axes of ``x`` so that the plain shifted window of every position holds, as a set,
    its clamped window.

    Along an axis of size ``n`` with ``k = min(kernel_size, n)``, ``r = k // 2``: the low end receives copies of the
    positions ``k - r .. k - 1`` and the high end of ``n - k .. n - r - 2`` (what a clamped window reaches instead of
    the positions outside the map), so that in padded coordinates the window of position ``i`` is ``i .. i + k - 1``.
    Returns ``(..., n + k - 1, ...)`` per axis; differentiable.
    """
    if tracing() or not records_grad(x):
        return _pad_functional(x, int(spatial_dims), int(kernel_size)) if tracing() else _pad_forward(x, int(spatial_dims), int(kernel_size))
    return _ClampedWindowPad.apply(x, int(spatial_dims), int(kernel_size))


def _pad_functional(x: torch.Tensor, spatial_dims: int, kernel_size: int) -> torch.Tensor:
    """:func:`clamped_window_pad` by concatenation (out-of-place, for graph capture)."""
    spatial = x.shape[x.ndim - spatial_dims :]
    for a, (k, lo, hi) in enumerate(_window_sizes(spatial, kernel_size)):
        ax, n = x.ndim - spatial_dims + a, spatial[a]
        parts = ([x.narrow(ax, k - lo, lo)] if lo else []) + [x] + ([x.narrow(ax, n - k, hi)] if hi else [])
        if len(parts) > 1:
            x = torch.cat(parts, ax)
    return x


def _slab(spatial: Sequence[int], channels: int, target: int = 1 << 18) -> int:
    """Planes of the first spatial axis per slab: about ``target`` elements of one ``(..., d, slab, ...)`` operand."""
    plane = channels
    for s in spatial[1:]:
        plane *= s
    return max(1, min(spatial[0], target // max(plane, 1)))


def _windows(spatial, kernel_size, z0, z1):
    """Index tuples (into a padded ``(..., d, *padded)`` tensor) of every neighbor's shifted window for slab z0:z1."""
    ks = [k for k, _, _ in _window_sizes(spatial, kernel_size)]
    for off in itertools.product(*[range(k) for k in ks]):
        yield (Ellipsis, slice(z0 + off[0], z1 + off[0])) + tuple(slice(o, o + s) for o, s in zip(off[1:], spatial[1:]))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _shifted_forward(q, kp, vp, spatial_dims, kernel_size, save_attn):
    spatial = q.shape[q.ndim - spatial_dims :]
    lead = q.shape[: q.ndim - spatial_dims - 1]
    d_axis = q.ndim - spatial_dims - 1
    n = _numel([k for k, _, _ in _window_sizes(spatial, kernel_size)])
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    attn_all = q.new_empty((n, *lead, *spatial)) if save_attn else None
    step = _slab(spatial, _numel(q.shape[: d_axis + 1]))
    z_axis = d_axis + 1
    for z0 in range(0, spatial[0], step):
        z1 = min(spatial[0], z0 + step)
        qz = q.narrow(z_axis, z0, z1 - z0)
        logits = q.new_empty((n, *lead, *qz.shape[z_axis:]))
        tmp = torch.empty_like(qz, memory_format=torch.contiguous_format)
        wins = list(_windows(spatial, kernel_size, z0, z1))
        for j, w in enumerate(wins):
            torch.mul(qz, kp[w], out=tmp)
            torch.sum(tmp, d_axis, out=logits[j])
        attn = torch.softmax(logits, 0)
        oz = out.narrow(z_axis, z0, z1 - z0)
        torch.mul(attn[0].unsqueeze(d_axis), vp[wins[0]], out=oz)
        for j in range(1, n):
            oz.addcmul_(attn[j].unsqueeze(d_axis), vp[wins[j]])
        if save_attn:
            attn_all.narrow(z_axis, z0, z1 - z0).copy_(attn)
    return out, attn_all


def _shifted_backward(g, q, kp, vp, attn_all, spatial_dims, kernel_size):
    spatial = q.shape[q.ndim - spatial_dims :]
    d_axis = q.ndim - spatial_dims - 1
    z_axis = d_axis + 1
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dkp, dvp = torch.zeros_like(kp, memory_format=torch.contiguous_format), torch.zeros_like(vp, memory_format=torch.contiguous_format)
    step = _slab(spatial, _numel(q.shape[: d_axis + 1]))
    for z0 in range(0, spatial[0], step):
        z1 = min(spatial[0], z0 + step)
        qz, gz, attn = (t.narrow(t.ndim - spatial_dims, z0, z1 - z0) for t in (q, g, attn_all))
        wins = list(_windows(spatial, kernel_size, z0, z1))
        tmp = torch.empty_like(gz, memory_format=torch.contiguous_format)
        dattn = torch.empty_like(attn)
        for j, w in enumerate(wins):
            torch.mul(gz, vp[w], out=tmp)
            torch.sum(tmp, d_axis, out=dattn[j])
            dvp[w].addcmul_(attn[j].unsqueeze(d_axis), gz)
        dlogits = attn * (dattn - (attn * dattn).sum(0, keepdim=True))
        dqz = dq.narrow(z_axis, z0, z1 - z0)
        torch.mul(dlogits[0].unsqueeze(d_axis), kp[wins[0]], out=dqz)
        for j, w in enumerate(wins):
            if j:
                dqz.addcmul_(dlogits[j].unsqueeze(d_axis), kp[w])
            dkp[w].addcmul_(dlogits[j].unsqueeze(d_axis), qz)
    return dq, dkp, dvp


class _ShiftedNA(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kp, vp, spatial_dims, kernel_size):
        need_grad = any(ctx.needs_input_grad[:3])
        out, attn = _shifted_forward(q, kp, vp, spatial_dims, kernel_size, save_attn=need_grad)
        if need_grad:
            ctx.save_for_backward(q, kp, vp, attn)
        ctx.spatial_dims, ctx.kernel_size = spatial_dims, kernel_size
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        q, kp, vp, attn = ctx.saved_tensors
        dq, dkp, dvp = _shifted_backward(g.contiguous(), q, kp, vp, attn, ctx.spatial_dims, ctx.kernel_size)
        return dq, dkp, dvp, None, None


def shifted_neighborhood_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spatial_dims: int, kernel_size: int, padded: bool = False
) -> torch.Tensor:
    """Clamped-window neighborhood attention on channels-first maps, without gathered keys or values.

    Args:
        q: ``(*lead, head_dim, *spatial)`` queries, already scaled (``lead`` e.g. batch, heads).
        k, v: keys and values, ``(*lead, head_dim, *spatial)``, or already passed through
            :func:`clamped_window_pad` when ``padded`` (the projection commutes with the padding, so a caller may
            pad its input once instead of keys and values).
        spatial_dims: number of trailing spatial axes.
        kernel_size: window size per axis (an axis shorter than it is covered whole).

    Returns:
        ``(*lead, head_dim, *spatial)``: per query, the softmax of ``q . k`` over its clamped window times ``v``.
    """
    if not padded:
        k, v = clamped_window_pad(k, spatial_dims, kernel_size), clamped_window_pad(v, spatial_dims, kernel_size)
    if tracing():  # graph capture (jit.trace, torch.export, compile): plain differentiable ops, no autograd.Function
        return _shifted_functional(q, k, v, int(spatial_dims), int(kernel_size))
    if not records_grad(q, k, v):
        return _shifted_forward(q, k, v, int(spatial_dims), int(kernel_size), save_attn=False)[0]
    return _ShiftedNA.apply(q, k, v, int(spatial_dims), int(kernel_size))


def _shifted_functional(q, kp, vp, spatial_dims, kernel_size):
    """The same computation with out-of-place ops only (one slab), for graph capture."""
    d_axis = q.ndim - spatial_dims - 1
    spatial = q.shape[q.ndim - spatial_dims :]
    wins = list(_windows(spatial, kernel_size, 0, spatial[0]))
    attn = torch.stack([(q * kp[w]).sum(d_axis) for w in wins], 0).softmax(0)
    out = attn[0].unsqueeze(d_axis) * vp[wins[0]]
    for j in range(1, len(wins)):
        out = torch.addcmul(out, attn[j].unsqueeze(d_axis), vp[wins[j]])
    return out


class NeighborhoodAttention(nn.Module):
    """Multi-head neighborhood attention over a channels-last feature map.

    Args:
        spatial_dims: 2 or 3.
        channels: feature channels ``C`` (divisible by ``num_heads``).
        num_heads: attention heads.
        kernel_size: odd neighborhood size per axis.
        qkv_bias: bias in the query/key/value projection.
        use_natten: use NATTEN's kernels (must be importable); default plain PyTorch.
        implementation: plain-PyTorch path, ``"shifted"`` (default, fast) or ``"gather"`` (the reference); both
            compute the same function (see the module docstring).

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
        implementation: str = "shifted",
    ) -> None:
        super().__init__()
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}.")
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive, got {kernel_size}.")
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads}).")
        use_natten, qkv_bias = as_bool(use_natten, "use_natten"), as_bool(qkv_bias, "qkv_bias")
        if use_natten and not natten_available():
            raise ImportError("use_natten=True but the natten package is not importable.")
        self.spatial_dims = spatial_dims
        self.channels = channels
        self.num_heads = num_heads
        self.kernel_size = kernel_size
        self.head_dim = channels // num_heads
        self.scale = self.head_dim**-0.5
        self.use_natten = use_natten
        self.implementation = implementation
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
        elif self.implementation == "shifted":
            out = self._attend_shifted(q * self.scale, k, v)
        else:
            out = self._attend(q * self.scale, k, v, spatial)
        return self.proj(out.reshape(*x.shape[:-1], self.channels))

    def _attend_shifted(self, q, k, v) -> torch.Tensor:
        # (B, *S, heads, d) -> (B, heads, d, *S): the per-neighbor products reduce over a non-inner axis
        nd = self.spatial_dims
        q, k, v = (t.permute((0, nd + 1, nd + 2) + tuple(range(1, nd + 1))) for t in (q, k, v))
        out = shifted_neighborhood_attention(q, k, v, nd, self.kernel_size)
        return out.permute((0,) + tuple(range(3, nd + 3)) + (1, 2))

    @property
    def channels_first_path(self) -> bool:
        """True when :meth:`forward_channels_first` runs the fast path (``implementation="shifted"``, no NATTEN)."""
        return self.implementation == "shifted" and not self.use_natten

    def forward_channels_first(self, x: torch.Tensor, norm: nn.LayerNorm | None = None) -> torch.Tensor:
        """``NA(norm(x))`` on a channels-first map ``(B, C, *spatial)`` -> ``(B, C, *spatial)``, with no layout change.

        ``norm`` (a LayerNorm over channels) is applied per voxel; its affine part is folded into the projection
        of queries, keys and values. Keys and values are projected from the clamped-window padding of the normalized
        map (projection and padding commute), so no padded copy of keys or values is made.
        """
        if not self.channels_first_path:
            y = x.movedim(1, -1)
            return self.forward(norm(y) if norm is not None else y).movedim(-1, 1)
        b, c, *spatial = x.shape
        nd, h, d = self.spatial_dims, self.num_heads, self.head_dim
        w, bias = self.qkv.weight, self.qkv.bias
        if bias is None:
            bias = w.new_zeros(w.shape[0])
        if norm is not None:
            x = x - x.mean(1, keepdim=True)  # (torch.var_mean over a non-inner axis is several times slower)
            x = x * (x.square().mean(1, keepdim=True) + norm.eps).rsqrt()
            if norm.bias is not None:
                bias = bias + w @ norm.bias
            if norm.weight is not None:
                w = w * norm.weight
        wq, wkv = w[:c] * self.scale, w[c:]
        bq, bkv = bias[:c] * self.scale, bias[c:]
        q = torch.baddbmm(bq.view(1, c, 1), wq.expand(b, c, c), x.reshape(b, c, -1)).view(b, h, d, *spatial)
        xp = clamped_window_pad(x, nd, self.kernel_size)
        kv = torch.baddbmm(bkv.view(1, 2 * c, 1), wkv.expand(b, 2 * c, c), xp.reshape(b, c, -1))
        kv = kv.view(b, 2, h, d, *xp.shape[2:])
        out = shifted_neighborhood_attention(q, kv[:, 0], kv[:, 1], nd, self.kernel_size, padded=True)
        pw, pb = self.proj.weight, self.proj.bias
        out = torch.baddbmm(pb.view(1, c, 1), pw.expand(b, c, c), out.view(b, c, -1))
        return out.view(b, c, *spatial)

    def _attend(self, q, k, v, spatial) -> torch.Tensor:
        """Reference implementation: gathers the clamped windows (``implementation="gather"``)."""
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
