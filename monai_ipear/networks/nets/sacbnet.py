"""SACB-Net (Cheng et al., CVPR 2025) as a pyramid registration network of this package."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution
from monai.networks.layers import Pool

from ...controllers import IterationController
from ..blocks.encoders import FeaturePyramidEncoder
from ..blocks.sacb import MatchingFlowEstimator, SpatialAwareConvBlock
from .pyramid import PyramidRegistrationNet

__all__ = ["SACBEncoder", "SACBLevelDecoder", "SACBHead", "SACBNet"]

LEAKY = ("leakyrelu", {"negative_slope": 0.1})


def _double_conv(spatial_dims: int, in_channels: int, out_channels: int) -> nn.Sequential:
    """Two 3x3(x3) convs, each + InstanceNorm + LeakyReLU(0.1)."""
    return nn.Sequential(
        Convolution(spatial_dims, in_channels, out_channels, kernel_size=3, act=LEAKY, norm="instance"),
        Convolution(spatial_dims, out_channels, out_channels, kernel_size=3, act=LEAKY, norm="instance"),
    )


class SACBEncoder(FeaturePyramidEncoder):
    """SACB-Net's 5-level encoder (weight-shared for both images).

    Level 1: conv ``in -> c`` then two convs ``c -> 2c`` (full resolution); levels 2..5: AvgPool(2) then two convs,
    to ``4c, 8c, 16c, 16c``. Every conv: 3x3(x3) + InstanceNorm + LeakyReLU(0.1).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        base_channels: ``c`` (paper: 4, giving 8/16/32/64/64).

    Output: list of 5 maps ``(B, channels[l], *spatial / 2**l)``, finest first; ``out_channels`` lists them.
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, base_channels: int = 4) -> None:
        super().__init__()
        c = base_channels
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = (2 * c, 4 * c, 8 * c, 16 * c, 16 * c)
        first = Convolution(spatial_dims, in_channels, c, kernel_size=3, act=LEAKY, norm="instance")
        self.levels = nn.ModuleList([nn.Sequential(first, _double_conv(spatial_dims, c, 2 * c))])
        for i, o in zip(self.out_channels[:-1], self.out_channels[1:]):
            self.levels.append(nn.Sequential(Pool["avg", spatial_dims](2), _double_conv(spatial_dims, i, o)))


class SACBLevelDecoder(nn.Module):
    """One coarse SACB-Net level: the same :class:`SpatialAwareConvBlock` on both feature maps, then
    :class:`MatchingFlowEstimator`. ``forward(moving, fixed)`` -> residual DDF ``(B, spatial_dims, *spatial)``."""

    def __init__(self, spatial_dims: int, channels: int, num_clusters: int = 7, seed: int = 0, radius: int = 1):
        super().__init__()
        self.sacb = SpatialAwareConvBlock(spatial_dims, channels, num_clusters=num_clusters, seed=seed)
        self.matching = MatchingFlowEstimator(spatial_dims, radius)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return self.matching(self.sacb(moving), self.sacb(fixed))


class SACBHead(nn.Module):
    """SACB-Net's full-resolution head: two convs on each feature map (shared), then two convs on their
    concatenation and a plain conv to ``spatial_dims`` channels (the residual DDF)."""

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        self.refine = _double_conv(spatial_dims, channels, channels)
        self.fuse = _double_conv(spatial_dims, 2 * channels, channels)
        self.out = Convolution(spatial_dims, channels, spatial_dims, kernel_size=3, conv_only=True)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return self.out(self.fuse(torch.cat([self.refine(fixed), self.refine(moving)], 1)))


class SACBNet(PyramidRegistrationNet):
    """SACB-Net: :class:`SACBEncoder`, :class:`SACBLevelDecoder` at levels 2..5 and :class:`SACBHead` at level 1,
    decoded coarse to fine by :class:`PyramidRegistrationNet` (moving features warped by the current field,
    residual composed ``u <- u(x + delta) + delta``, x2 upsampling between levels), which is the reference
    decoding order. About 1.1M parameters in 3D with the defaults.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        base_channels: encoder width ``c``.
        num_clusters: k-means clusters per SACB, one int or one per level 2..5 (finest first).
        seed: k-means seed.
        controller, padding_mode, unroll_training: see :class:`PyramidRegistrationNet` (default: one pass).

    ``forward(moving, fixed)`` -> DDF ``(B, spatial_dims, *spatial)`` (sizes padded to multiples of 16 internally).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        base_channels: int = 4,
        num_clusters: int | Sequence[int] = 7,
        seed: int = 0,
        controller: IterationController | Sequence[IterationController] | None = None,
        padding_mode: str = "zeros",
        unroll_training: bool = False,
    ) -> None:
        encoder = SACBEncoder(spatial_dims, in_channels, base_channels)
        ks = [num_clusters] * 4 if isinstance(num_clusters, int) else list(num_clusters)
        if len(ks) != 4:
            raise ValueError(f"num_clusters needs one int or 4 values (levels 2..5), got {num_clusters}.")
        chans = encoder.out_channels
        decoders = [SACBHead(spatial_dims, chans[0])]
        decoders += [SACBLevelDecoder(spatial_dims, ch, k, seed) for ch, k in zip(chans[1:], ks)]
        super().__init__(
            encoder,
            decoders,
            controller,  # None: SinglePass
            spatial_dims=spatial_dims,
            padding_mode=padding_mode,
            unroll_training=unroll_training,
        )
