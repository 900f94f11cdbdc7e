"""IIRP-Net's residual flow estimator (one pyramid-level decoder of RP-Net / IIRP-Net)."""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution

from ..utils import concat_channels
from .depth_split import depth_split_applies, few_output_conv
from .farm import ResidualPathway

__all__ = ["ResidualFlowEstimator"]


class ResidualFlowEstimator(nn.Module):
    """``concat(moving, fixed)`` -> conv 2C->q + LeakyReLU -> two residual units -> conv q->q/2 -> conv q/2->spatial_dims.

    Args:
        spatial_dims: 2 or 3.
        in_channels: encoder channels ``C`` at this level.
        channels: width ``q`` (IIRP-Net: 16/32/32/32, finest first).

    ``forward(moving, fixed)`` -> residual DDF ``(B, spatial_dims, *spatial)`` in voxels of this level.

    ``fast`` (default True): on CPU the head runs as :func:`~monai_ipear.networks.blocks.depth_split.depth_split_conv`,
    as FARM's few-output convolutions do (same values up to float rounding;
    :func:`~monai_ipear.networks.nets.use_reference_paths` turns it off).
    """

    fast = True

    def __init__(self, spatial_dims: int, in_channels: int, channels: int) -> None:
        super().__init__()
        self.body = ResidualPathway(spatial_dims, 2 * in_channels, channels)
        self.head = Convolution(spatial_dims, channels // 2, spatial_dims, kernel_size=3, conv_only=True)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        # as in FARM: the concatenation channels-last on CPU; nested calls without local names, so that each
        # full-resolution map is released once the next layer has read it
        channels_last = depth_split_applies(moving, self.fast)
        return few_output_conv(
            self.head, self.body.tail(self.body.cl1(concat_channels([moving, fixed], channels_last))), self.fast
        )
