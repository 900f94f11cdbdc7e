"""Residual Aligner Network (RAN, Zheng et al., Medical Image Analysis 2024) blocks: the motion-aware encoder
block and the residual-aligner (RA) module with its multi-head field, confidence, head masks and learned
accumulator of the previous field."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution
from monai.networks.layers import Norm, Pool

from .encoders import FeaturePyramidEncoder

__all__ = ["MotionAwareBlock", "MotionAwareEncoder", "RAAccumulator", "ResidualAligner"]

LEAKY02 = ("leakyrelu", {"negative_slope": 0.2})


class MotionAwareBlock(nn.Module):
    """RAN's residual block with growing dilation: ``y = act(IN(conv_d1(x)))``, then
    ``act(IN(conv_d3(act(IN(conv_d2(y))))) + y)`` (LeakyReLU 0.2, InstanceNorm; reference dilations 1, 1, 3)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, dilations: Sequence[int] = (1, 1, 3)):
        super().__init__()
        d0, d1, d2 = dilations
        self.conv0 = Convolution(spatial_dims, in_channels, out_channels, kernel_size=3, dilation=d0, act=LEAKY02, norm="instance")
        self.conv1 = Convolution(spatial_dims, out_channels, out_channels, kernel_size=3, dilation=d1, act=LEAKY02, norm="instance")
        self.conv2 = Convolution(spatial_dims, out_channels, out_channels, kernel_size=3, dilation=d2, act=None, norm="instance")
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv0(x)
        return self.act(self.conv2(self.conv1(y)) + y)


class MotionAwareEncoder(FeaturePyramidEncoder):
    """RAN's motion-aware encoder: a conv block at full resolution, then per coarser level AvgPool(2) and a
    :class:`MotionAwareBlock` (dilated convolutions at reduced resolution, so that each voxel sees large motions).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        channels: per level, finest first.
        dilations: dilations of the three convs of each :class:`MotionAwareBlock`.

    Output: list of ``(B, channels[l], *spatial / 2**l)``, finest first.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        channels: Sequence[int] = (8, 16, 16, 32),
        dilations: Sequence[int] = (1, 1, 3),
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = tuple(channels)
        first = Convolution(spatial_dims, in_channels, channels[0], kernel_size=3, act=LEAKY02, norm="instance")
        self.levels = nn.ModuleList([first])
        for i, o in zip(self.out_channels[:-1], self.out_channels[1:]):
            self.levels.append(
                nn.Sequential(Pool["avg", spatial_dims](2), MotionAwareBlock(spatial_dims, i, o, dilations))
            )


class RAAccumulator(nn.Module):
    """The RA module's learned accumulator.

    ``fused = sum_h w_h * field_h`` (confidence-weighted heads) plus, when the previous field is given, a learned
    correction computed per displacement component from ``[w_h * field_h,c for every head h] + [previous_c]``
    (``num_heads + 1`` channels, convolution weights shared by the components, as RAN folds the components into
    the batch). The correction's last conv starts at zero, so an untrained accumulator is the weighted sum.

    ``forward(head_fields (B, H, D, *spatial), weights (B, H, *spatial), previous (B, D, *spatial) | None)``
    -> ``(B, D, *spatial)``.
    """

    def __init__(self, spatial_dims: int, num_heads: int, hidden: int = 8) -> None:
        super().__init__()
        self.correction = nn.Sequential(
            Convolution(spatial_dims, num_heads + 1, hidden, kernel_size=3, act=("leakyrelu", {"negative_slope": 0.01}), norm=None),
            Convolution(spatial_dims, hidden, 1, kernel_size=3, conv_only=True),
        )
        last = self.correction[-1].conv
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(
        self, head_fields: torch.Tensor, weights: torch.Tensor, previous: torch.Tensor | None = None
    ) -> torch.Tensor:
        weighted = head_fields * weights[:, :, None]
        fused = weighted.sum(1)
        if previous is None:
            return fused
        b, h, d = head_fields.shape[:3]
        spatial = head_fields.shape[3:]
        inp = torch.cat([weighted, previous[:, None]], 1).transpose(1, 2).reshape(b * d, h + 1, *spatial)
        return fused + self.correction(inp).reshape(b, d, *spatial)


class ResidualAligner(nn.Module):
    """The residual-aligner (RA) module, usable as a decoder of :class:`PyramidRegistrationNet`.

    From the (instance-normalised) warped-moving and fixed features a dilated correspondence trunk predicts
    ``num_heads`` displacement fields (one per separable motion), confidence logits, head masks
    ``softmax_h(logits)`` and a non-negative confidence scale ``ReLU(conv(logits))``; :class:`RAAccumulator` fuses
    the heads weighted by ``mask * scale`` with the previous field.

    The pyramid passes the field the level currently holds as ``previous`` because the module sets
    ``takes_previous_field = True``; the output is the residual that the pyramid composes onto that field.

    Args:
        spatial_dims: 2 or 3.
        in_channels: feature channels ``C`` of this level.
        num_heads: heads of the multi-head field (RAN: 6).
        channels: trunk width (RAN: ``3**d - d**2``, i.e. 18 in 3D; at least 8 here).
        dilation: dilation of the trunk's first two convs (RAN grows it at coarser levels).

    ``forward(moving, fixed, previous=None)``: ``(B, C, *spatial)`` features (and ``(B, d, *spatial)``) -> residual
    DDF ``(B, spatial_dims, *spatial)``. ``last_head_masks`` ``(B, H, *spatial)`` and ``last_confidence``
    ``(B, 1, *spatial)`` keep the last call's masks and scale.
    """

    takes_previous_field = True

    def __init__(
        self, spatial_dims: int, in_channels: int, num_heads: int = 6, channels: int | None = None, dilation: int = 1
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.num_heads = num_heads
        ch = channels or max(8, 3**spatial_dims - spatial_dims**2)
        act = ("leakyrelu", {"negative_slope": 0.01})
        self.norm = Norm[Norm.INSTANCE, spatial_dims](in_channels, affine=True)
        self.trunk_in = Convolution(spatial_dims, 2 * in_channels, ch, kernel_size=3, dilation=dilation, act=act, norm=None)
        self.trunk_res = nn.Sequential(
            Convolution(spatial_dims, ch, ch, kernel_size=3, dilation=dilation, act=act, norm=None),
            Convolution(spatial_dims, ch, ch, kernel_size=3, conv_only=True),
        )
        self.act = nn.LeakyReLU(0.01)
        self.field_head = nn.Sequential(
            Convolution(spatial_dims, ch, 3**spatial_dims, kernel_size=3, act=act, norm=None),
            Convolution(spatial_dims, 3**spatial_dims, num_heads * spatial_dims, kernel_size=1, conv_only=True),
        )
        self.confidence_head = nn.Sequential(
            Convolution(spatial_dims, ch, ch, kernel_size=3, act=act, norm="instance"),
            Convolution(spatial_dims, ch, num_heads, kernel_size=1, conv_only=True),
        )
        self.scale = Convolution(spatial_dims, num_heads, 1, kernel_size=1, conv_only=True)
        self.accumulator = RAAccumulator(spatial_dims, num_heads)
        self.last_head_masks: torch.Tensor | None = None
        self.last_confidence: torch.Tensor | None = None

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
        x = self.trunk_in(torch.cat([self.norm(fixed), self.norm(moving)], 1))
        x = self.act(self.trunk_res(x) + x)
        b = x.shape[0]
        heads = self.field_head(x).reshape(b, self.num_heads, self.spatial_dims, *x.shape[2:])
        logits = self.confidence_head(x)
        masks = logits.softmax(1)
        confidence = torch.relu(self.scale(self.act(logits)))
        self.last_head_masks, self.last_confidence = masks, confidence
        return self.accumulator(heads, masks * confidence, previous)
