"""FARM, the Fused Attention-Residual Module of iPEAR, and its named parts.

``R = concat(warped moving features, fixed features)`` (2C channels) feeds two pathways:

- attention pathway: :class:`SqueezeExcitationBlock` (SEB, channel weights) then
  :class:`FARMSpatialAttention` (SAB);
- residual pathway :class:`ResidualPathway` (RP): Cl1 conv 2C->q + LeakyReLU, two residual units,
  Cl2 conv q->q/2;

and Cl3, a conv (2C + q/2) -> spatial_dims, turns their concatenation into the residual field.
Switches ``use_seb``, ``use_sab``, ``use_rp`` reproduce the paper's Table 5 ablation; with all three off
FARM is the single conv Cl3 on ``R``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import ChannelSELayer, Convolution

from ...booleans import as_bool
from ..utils import channels_last_format, cpu_training, records_grad, tracing

__all__ = [
    "FARM",
    "SqueezeExcitationBlock",
    "FARMSpatialAttention",
    "ResidualPathway",
    "ResidualPathwayUnit",
    "depth_split_conv",
]

LEAKY = ("leakyrelu", {"negative_slope": 0.1})
LEAKY_INPLACE = ("leakyrelu", {"negative_slope": 0.1, "inplace": True})  # on the output of the convolution before it


def depth_split_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``conv(x, weight, bias)`` with stride 1 and "same" zero padding, for an odd kernel ``k`` along the first
    spatial axis, computed as one convolution whose kernels are flat along that axis (``k * out_channels``
    outputs) followed by ``k`` shifted sums along it.

    Why by hand: the CPU convolutions of oneDNN use a small part of the vector units when a layer has 1-3
    output channels; FARM has two such layers at full resolution. Measured on the 2-core development CPU at
    160x192x160 (channels-last, batch 1): SAB's 7x7x7 2->1 convolution 0.31 s -> 0.06 s, Cl3's 24->3 convolution
    0.26 s -> 0.12 s. The result equals the plain convolution up to float rounding (tested).

    Args:
        x: ``(B, in_channels, *spatial)``.
        weight: ``(out_channels, in_channels, k, *kernel)``, odd sizes.
        bias: ``(out_channels,)`` or None.
    """
    out_c, in_c, k = weight.shape[:3]
    nd = weight.dim() - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    p = k // 2
    # index kd * out_c + o holds weight[o, :, kd]
    flat = weight.permute(2, 0, 1, *range(3, weight.dim())).reshape(k * out_c, in_c, 1, *weight.shape[3:])
    if weight.dim() == 5:
        flat = flat.contiguous(memory_format=torch.channels_last_3d)
    y = conv(x, flat, None, padding=(0, *[s // 2 for s in weight.shape[3:]]))
    out = y[:, p * out_c:(p + 1) * out_c].clone()
    for kd in range(k):
        o = kd - p  # out[d] += y_kd[d + o]
        if o > 0:
            out[:, :, :-o] += y[:, kd * out_c:(kd + 1) * out_c, o:]
        elif o < 0:
            out[:, :, -o:] += y[:, kd * out_c:(kd + 1) * out_c, :o]
    if bias is not None:
        out += bias.view(1, out_c, *([1] * nd))  # ``out`` is this function's own tensor (autograd-safe)
    return out


def _may_overwrite(*tensors: torch.Tensor) -> bool:
    """Whether an op may overwrite these tensors: autograd records none of them and no graph is being captured
    (FARM's in-place paths without autograd; same values, fewer full-size maps alive at once)."""
    return not tracing() and not records_grad(*tensors)


def _depth_split_applies(x: torch.Tensor, fast: bool) -> bool:
    """Whether FARM's few-output convolutions run as :func:`depth_split_conv` (CPU, eager mode, ``fast``)."""
    return fast and x.device.type == "cpu" and not tracing()


def _few_output_conv(conv: Convolution, x: torch.Tensor, fast: bool) -> torch.Tensor:
    """A MONAI ``Convolution`` (stride 1, same padding) with :func:`depth_split_conv` on CPU when ``fast``."""
    if not _depth_split_applies(x, fast):
        return conv(x)
    layer = conv.conv
    y = depth_split_conv(x, layer.weight, layer.bias)
    return conv.adn(y) if "adn" in conv._modules else y


class _SpatialMean(torch.autograd.Function):
    """Mean over the spatial axes ``(B, C, *spatial)`` -> ``(B, C)`` whose gradient is the *expanded* (not
    materialised) ``g / N``.

    Why by hand: the backward of PyTorch's mean and adaptive average pooling writes the full-size gradient
    channels-first (0.49 s for 16 x 160x192x160 on the development CPU), which autograd then adds to SEB's
    channels-last product gradient in a mixed-layout pass; an expanded gradient is folded into that sum.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.mean(tuple(range(2, x.ndim)))

    @staticmethod
    def backward(ctx, g):
        return (g / math.prod(ctx.shape[2:])).view(*g.shape, *[1] * (len(ctx.shape) - 2)).expand(ctx.shape)


class SqueezeExcitationBlock(ChannelSELayer):
    """SEB: global average pool -> FC 2C->max(2C//r, 1) -> LeakyReLU(0.1) -> FC -> sigmoid -> ``x * S``.

    MONAI's :class:`~monai.networks.blocks.ChannelSELayer` with the paper's reduction and activation;
    the hidden width is at least one unit. ``fast`` (default True): while autograd records, the pooling's gradient
    is handed back expanded (:class:`_SpatialMean`; same values).
    """

    fast = True

    def __init__(self, spatial_dims: int, in_channels: int, r: int = 16) -> None:
        super().__init__(spatial_dims, in_channels, r=max(1, min(r, in_channels)), acti_type_1=LEAKY)

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``x`` ``(B, C, *spatial)`` times its channel weights; ``inplace``: the caller gives ``x`` away, which is
        then multiplied in place where no autograd records it (MONAI's ``ChannelSELayer`` without its residual
        option)."""
        expanded_grad = self.fast and records_grad(x) and not tracing()
        if not inplace and not expanded_grad:
            return super().forward(x)
        b, c = x.shape[:2]
        pooled = _SpatialMean.apply(x) if expanded_grad else self.avg_pool(x).view(b, c)
        weights = self.fc(pooled).view([b, c] + [1] * (x.ndim - 2))
        return x.mul_(weights) if inplace and _may_overwrite(x, weights) else x * weights


class FARMSpatialAttention(nn.Module):
    """SAB.

    ``mode="spatial"`` (default; the paper's name, text and Figure B): average- and max-pool across
    channels -> 2-channel map -> conv (``kernel_size``) -> sigmoid -> multiply every channel (CBAM style).

    ``mode="channel"`` (the literal reading of the paper's equations 7-9, which pool over space): average-
    and max-pool over space -> a 2-row descriptor per channel -> 1D conv (``kernel_size``) along the channel
    axis -> sigmoid -> multiply per channel.
    """

    fast = True
    """spatial mode on CPU: the convolution by :func:`depth_split_conv` (``False``: the plain convolution)."""

    def __init__(self, spatial_dims: int, kernel_size: int = 7, mode: str = "spatial") -> None:
        super().__init__()
        if mode not in ("spatial", "channel"):
            raise ValueError(f"SAB mode must be 'spatial' or 'channel', got {mode!r}.")
        self.mode = mode
        dims = spatial_dims if mode == "spatial" else 1
        self.conv = Convolution(dims, 2, 1, kernel_size=kernel_size, act="sigmoid", norm=None, bias=False)

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``x`` ``(B, C, *spatial)`` times its attention weights; ``inplace``: the caller gives ``x`` away, which is
        then multiplied in place where no autograd records it."""
        if self.mode == "spatial":
            pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
            weights = _few_output_conv(self.conv, pooled, self.fast)
        else:
            flat = x.flatten(2)  # (B, C, N)
            pooled = torch.stack([flat.mean(-1), flat.amax(-1)], dim=1)  # (B, 2, C)
            weights = self.conv(pooled).squeeze(1)  # (B, C)
            weights = weights.view(*weights.shape, *([1] * (x.ndim - 2)))
        return x.mul_(weights) if inplace and _may_overwrite(x, weights) else x * weights


class ResidualPathwayUnit(nn.Module):
    """``LeakyReLU(conv3(x) + x)`` (IIRP-Net's ``ConvResBlock``)."""

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        self.conv = Convolution(spatial_dims, channels, channels, kernel_size=3, conv_only=True)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if not _may_overwrite(x, y):
            return self.act(y + x)
        # the sum and the activation reuse the convolution's output (the decoders' peak memory at full resolution)
        return F.leaky_relu(y.add_(x), self.act.negative_slope, inplace=True)


class ResidualPathway(nn.Module):
    """RP: Cl1 conv in->q + LeakyReLU(0.1), two :class:`ResidualPathwayUnit`, Cl2 conv q->q/2 (no activation).

    This is also the body of IIRP-Net's residual flow estimator.
    """

    def __init__(self, spatial_dims: int, in_channels: int, channels: int) -> None:
        super().__init__()
        self.cl1 = Convolution(spatial_dims, in_channels, channels, kernel_size=3, act=LEAKY_INPLACE, norm=None)
        self.res1 = ResidualPathwayUnit(spatial_dims, channels)
        self.res2 = ResidualPathwayUnit(spatial_dims, channels)
        self.cl2 = Convolution(spatial_dims, channels, channels // 2, kernel_size=3, conv_only=True)
        self.out_channels = channels // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cl2(self.res2(self.res1(self.cl1(x))))


class FARM(nn.Module):
    """Fused Attention-Residual Module: one pyramid-level decoder of iPEAR.

    Args:
        spatial_dims: 2 or 3.
        in_channels: encoder channels ``C`` at this level (each of the two inputs has ``C``).
        channels: residual-pathway width ``q`` (iPEAR default per level 16/32/32/32, finest first).
        se_reduction: SEB reduction ``r``.
        sab_kernel_size: SAB conv kernel.
        sab_mode: ``"spatial"`` (default) or ``"channel"``, see :class:`FARMSpatialAttention`.
        use_seb, use_sab, use_rp: ablation switches (paper Table 5).

    ``forward(moving, fixed)``: two ``(B, C, *spatial)`` feature maps (moving already warped by the current
    field) -> residual DDF ``(B, spatial_dims, *spatial)`` in voxels of this level.

    ``fast`` (default True): on CPU, SAB's and Cl3's few-output convolutions run as :func:`depth_split_conv`, and
    in training R is made channels-last and SEB's pooling hands its gradient back expanded (same values;
    :func:`~monai_ipear.networks.nets.use_reference_paths` turns it off).
    """

    @property
    def fast(self) -> bool:
        return self._fast

    @fast.setter
    def fast(self, value: bool) -> None:
        self._fast = bool(value)
        if isinstance(self.sab, FARMSpatialAttention):
            self.sab.fast = self._fast
        if isinstance(self.seb, SqueezeExcitationBlock):
            self.seb.fast = self._fast

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        channels: int,
        se_reduction: int = 16,
        sab_kernel_size: int = 7,
        sab_mode: str = "spatial",
        use_seb: bool = True,
        use_sab: bool = True,
        use_rp: bool = True,
    ) -> None:
        super().__init__()
        c2 = 2 * in_channels
        use_seb, use_sab, use_rp = as_bool(use_seb, "use_seb"), as_bool(use_sab, "use_sab"), as_bool(use_rp, "use_rp")
        self.seb = SqueezeExcitationBlock(spatial_dims, c2, se_reduction) if use_seb else nn.Identity()
        self.sab = FARMSpatialAttention(spatial_dims, sab_kernel_size, sab_mode) if use_sab else nn.Identity()
        self.rp = ResidualPathway(spatial_dims, c2, channels) if use_rp else None
        cl3_in = c2 + (self.rp.out_channels if self.rp is not None else 0)
        self.cl3 = Convolution(spatial_dims, cl3_in, spatial_dims, kernel_size=3, conv_only=True)
        self.fast = True

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        r = torch.cat([moving, fixed], dim=1)
        if self._fast and cpu_training(r):
            # training on CPU: R channels-last like the convolutions that read it (channels-last weights), so that
            # the gradients of its two pathways are summed in one layout (a mixed-layout sum of two 2C-channel
            # gradients cost 0.35 s at level 1, 160x192x160, on the development CPU)
            r = r.contiguous(memory_format=channels_last_format(r.ndim))
        if self.rp is None:
            return _few_output_conv(self.cl3, self._attention(r, own=True), self._fast)
        if not _depth_split_applies(r, self._fast):
            return self.cl3(torch.cat([self._attention(r, own=False), self.rp(r)], dim=1))
        # Cl3 of the concatenation = the sum of Cl3's two weight blocks applied to each part: no 3C/2-channel copy.
        # The residual pathway runs first, so that the attention pathway may then work in R's own memory (without
        # autograd): at most one 2C-channel map besides the pathway's own is alive at full resolution.
        weight, c = self.cl3.conv.weight, r.shape[1]
        out = depth_split_conv(self.rp(r), weight[:, c:])
        return out.add_(depth_split_conv(self._attention(r, own=True), weight[:, :c], self.cl3.conv.bias))

    def _attention(self, r: torch.Tensor, own: bool) -> torch.Tensor:
        """SEB then SAB on ``R``; ``own``: nothing reads ``R`` afterwards, so it may be overwritten."""
        fused = self.seb(r, inplace=own) if isinstance(self.seb, SqueezeExcitationBlock) else self.seb(r)
        if isinstance(self.sab, FARMSpatialAttention):  # SEB's output is ours to overwrite, R (no SEB) only if own
            return self.sab(fused, inplace=own or fused is not r)
        return self.sab(fused)
