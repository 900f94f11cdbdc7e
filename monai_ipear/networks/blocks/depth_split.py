"""Convolutions with few output channels (1-3) at full resolution, as flat convolutions plus shifted sums.

FARM's SAB (2 -> 1, 7x7x7) and Cl3 (-> spatial_dims) and the residual decoder's head (q/2 -> spatial_dims) run at
the finest pyramid level. :func:`depth_split_conv` computes them on CPU; :func:`few_output_conv` applies it to a
MONAI :class:`~monai.networks.blocks.Convolution`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution

from ..utils import records_grad, tracing

__all__ = ["depth_split_conv", "few_output_conv", "depth_split_applies", "SLAB_BYTES"]

#: the working set of one slab of :func:`depth_split_conv` without autograd (its input planes or its flat
#: convolution's output planes, the larger); chosen on the development CPU (32 MiB L3, glibc's allocator defaults):
#: 2, 4 and 8 MiB ran alike from 40x48x40 to 160x192x160, 16 MiB slower.
SLAB_BYTES = 4 * 2**20


def depth_split_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``conv(x, weight, bias)`` with stride 1 and "same" zero padding, for an odd kernel ``k`` along the first
    spatial axis, computed as one convolution whose kernels are flat along that axis (``k * out_channels``
    outputs) followed by ``k`` shifted sums along it.

    Why by hand: the CPU convolutions of oneDNN use a small part of the vector units when a layer has 1-3 output
    channels (on the 2-core development CPU at 160x192x160, 2 threads, allocator setting on: Cl3's 24 -> 3
    convolution 228 ms plain channels-last, 151 ms split). Without autograd (2D and 3D inputs) the first spatial
    axis is cut into slabs of a few planes (:data:`SLAB_BYTES`): each slab's planes run as a batch of flat
    convolutions of one dimension less and their shifted sums are added into the output while the slab is in cache,
    so the full-size ``k * out_channels`` map of the flat convolution (SAB's 7 channels, Cl3's 9: 131 and 169 MiB at
    160x192x160) is never made. Its time, measured there (batch 1, 2 threads, one process, whole volume -> slabs):
    with the package's allocator setting (:func:`~monai_ipear.runtime.keep_freed_cpu_memory`, the command-line
    tools) about the same (SAB's 2 -> 1 7x7x7 75 -> 57 ms, 8 -> 3 channels 63 -> 60 ms, 16 -> 3 channels-last 83 ->
    89 ms), with glibc's defaults (calls from Python) about half (127 -> 62, 173 -> 78, 156 -> 100 ms), the fresh
    full-size map's page faults saved. With autograd the whole volume runs as one flat convolution (slabs would
    record a graph node per shifted sum and slab). The result equals the plain convolution up to float rounding
    (tested, values and gradients).

    Args:
        x: ``(B, in_channels, *spatial)``.
        weight: ``(out_channels, in_channels, k, *kernel)``, odd sizes.
        bias: ``(out_channels,)`` or None.
    """
    nd = weight.dim() - 2
    if nd >= 2 and not records_grad(x, weight) and not tracing():
        return _depth_split_slabs(x, weight, bias)
    flat = _flat_kernels(weight).unsqueeze(2)  # (k * out_c, in_c, 1, *kernel[1:]): flat along the first axis
    if nd == 3:
        flat = flat.contiguous(memory_format=torch.channels_last_3d)
    y = (F.conv1d, F.conv2d, F.conv3d)[nd - 1](x, flat, None, padding=(0, *[s // 2 for s in weight.shape[3:]]))
    out = _output(y, weight, bias, x.shape[2])
    _add_shifted(out, y, 0, weight.shape[2])
    return out


def _flat_kernels(weight: torch.Tensor) -> torch.Tensor:
    """``(k * out_c, in_c, *kernel[1:])``: index ``kd * out_c + o`` holds ``weight[o, :, kd]``."""
    out_c, in_c, k = weight.shape[:3]
    return weight.permute(2, 0, 1, *range(3, weight.dim())).reshape(k * out_c, in_c, *weight.shape[3:])


def _output(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, depth: int) -> torch.Tensor:
    """The output ``(B, out_c, depth, *rest)`` before the shifted sums: the bias, or zeros (``y``'s dtype)."""
    out_c = weight.shape[0]
    out = y.new_zeros(y.shape[0], out_c, depth, *y.shape[3:])
    if bias is not None:
        out += bias.to(out.dtype).view(1, out_c, *([1] * (out.ndim - 2)))
    return out


def _add_shifted(out: torch.Tensor, y: torch.Tensor, s0: int, k: int) -> None:
    """Add the flat convolution's outputs ``y`` ``(B, k * out_c, d, *rest)`` of the input planes ``[s0, s0 + d)``
    into ``out``: ``out[:, :, j] += y_kd[:, :, j + kd - k // 2 - s0]`` wherever that plane is one of them."""
    out_c, depth, s1 = out.shape[1], out.shape[2], s0 + y.shape[2]
    for kd in range(k):
        o = kd - k // 2
        j0, j1 = max(0, s0 - o), min(depth, s1 - o)
        if j1 > j0:
            out[:, :, j0:j1] += y[:, kd * out_c:(kd + 1) * out_c, j0 + o - s0:j1 + o - s0]


def _depth_split_slabs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`depth_split_conv` slab by slab (no autograd; 2D and 3D): the input planes ``[s0, s1)`` as a batch of
    ``(nd - 1)``-dimensional flat convolutions, added into the output before the next slab is made."""
    out_c, in_c, k = weight.shape[:3]
    nd = weight.dim() - 2
    conv = (F.conv1d, F.conv2d)[nd - 2]
    flat = _flat_kernels(weight)
    if nd == 3:
        flat = flat.contiguous(memory_format=torch.channels_last)
    padding = [s // 2 for s in weight.shape[3:]]
    b, depth, rest = x.shape[0], x.shape[2], tuple(x.shape[3:])
    plane = b * math.prod(rest) * x.element_size() * max(k * out_c, in_c)
    step = max(1, min(depth, SLAB_BYTES // max(plane, 1)))
    out = None
    for s0 in range(0, depth, step):
        d = min(depth, s0 + step) - s0
        # (B, C, d, *rest) -> (B * d, C, *rest): a view for channels-last input, a copy of the slab otherwise
        planes = x[:, :, s0:s0 + d].movedim(2, 1).reshape(b * d, in_c, *rest)
        y = conv(planes, flat, None, padding=padding).view(b, d, k * out_c, *rest).movedim(1, 2)
        if out is None:
            out = _output(y, weight, bias, depth)
        _add_shifted(out, y, s0, k)
    return out


def depth_split_applies(x: torch.Tensor, fast: bool) -> bool:
    """Whether few-output convolutions run as :func:`depth_split_conv` (CPU, eager mode, ``fast``)."""
    return fast and x.device.type == "cpu" and not tracing()


def few_output_conv(conv: Convolution, x: torch.Tensor, fast: bool) -> torch.Tensor:
    """A MONAI ``Convolution`` (stride 1, same padding) with :func:`depth_split_conv` on CPU when ``fast``."""
    if not depth_split_applies(x, fast):
        return conv(x)
    layer = conv.conv
    y = depth_split_conv(x, layer.weight, layer.bias)
    return conv.adn(y) if "adn" in conv._modules else y
