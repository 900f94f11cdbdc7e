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
from ..utils import concat_channels, records_grad, tracing
from .depth_split import depth_split_applies, depth_split_conv, few_output_conv

__all__ = [
    "FARM",
    "SqueezeExcitationBlock",
    "FARMSpatialAttention",
    "ResidualPathway",
    "ResidualPathwayUnit",
]

LEAKY = ("leakyrelu", {"negative_slope": 0.1})
LEAKY_INPLACE = ("leakyrelu", {"negative_slope": 0.1, "inplace": True})  # on the output of the convolution before it


def _may_overwrite(*tensors: torch.Tensor) -> bool:
    """Whether an op may overwrite these tensors: autograd records none of them and no graph is being captured
    (FARM's in-place paths without autograd; same values, fewer full-size maps alive at once)."""
    return not tracing() and not records_grad(*tensors)


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
            weights = few_output_conv(self.conv, pooled, self.fast)
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
        return self.tail(self.cl1(x))

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """Everything after Cl1: ``x`` ``(B, q, *spatial)`` (Cl1's output) -> ``(B, q/2, *spatial)``. Each map is
        released once the next one is made, so a caller that hands ``x`` over (no reference of its own) keeps two
        q-channel maps alive at a time, not three."""
        x = self.res1(x)
        x = self.res2(x)
        return self.cl2(x)


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
    R is made channels-last, and in training SEB's pooling hands its gradient back expanded (same values;
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
        split = depth_split_applies(moving, self._fast)
        # on CPU R is made channels-last like the convolutions that read it (channels-last weights): in training the
        # gradients of its two pathways are then summed in one layout (a mixed-layout sum of two 2C-channel gradients
        # cost 0.35 s at level 1, 160x192x160, on the development CPU); at inference Cl1 makes no channels-last copy
        # beside it (SEB's and SAB's reductions read it more slowly, +43 ms per level-1 call; the call's time was
        # unchanged in A/B runs)
        r = concat_channels([moving, fixed], channels_last=split)
        if self.rp is None:
            return few_output_conv(self.cl3, self._attention(r, own=True), self._fast)
        if not split:
            return self.cl3(torch.cat([self._attention(r, own=False), self.rp(r)], dim=1))
        # Cl3 of the concatenation = the sum of Cl3's two weight blocks applied to each part: no 3C/2-channel copy.
        # Without autograd R's memory is reused and released early: Cl1 reads R first, the attention pathway then
        # works in R's own memory, and R (this function's only reference) is dropped before the residual units run:
        # at full resolution at most two 2C- or q-channel maps are alive at once (a level-1 call at 160x192x160 on
        # the development CPU: tensor peak 900 -> 675 MiB with R channels-last).
        weight, c = self.cl3.conv.weight, r.shape[1]
        pathway = [self.rp.cl1(r)]  # a list, so that Cl1's output is handed over below without a reference kept here
        out = depth_split_conv(self._attention(r, own=True), weight[:, :c], self.cl3.conv.bias)
        del r
        return out.add_(depth_split_conv(self.rp.tail(pathway.pop()), weight[:, c:]))

    def _attention(self, r: torch.Tensor, own: bool) -> torch.Tensor:
        """SEB then SAB on ``R``; ``own``: nothing reads ``R`` afterwards, so it may be overwritten."""
        fused = self.seb(r, inplace=own) if isinstance(self.seb, SqueezeExcitationBlock) else self.seb(r)
        if isinstance(self.sab, FARMSpatialAttention):  # SEB's output is ours to overwrite, R (no SEB) only if own
            return self.sab(fused, inplace=own or fused is not r)
        return self.sab(fused)
