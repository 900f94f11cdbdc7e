"""Residual Aligner Network (RAN, Zheng et al., Medical Image Analysis 2024), as the reference ``RAN4`` builds it."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution

from ..blocks.fields import crop_to, pad_to_divisible
from ..blocks.residual_aligner import LEAKY02, MotionAwareBlock, RASharedConvs, ResidualAligner
from ..utils import check_registration_pair

__all__ = ["RAN"]


class RAN(nn.Module):
    """RAN with the motion-aware (MA) structure of the reference's ``ran4_core`` (``q = 4``).

    Siamese encoder (weights shared by both images): four :class:`~monai_ipear.networks.blocks.MotionAwareBlock`
    (dilations 1, 1, 3; AvgPool(2) after each) with ``enc_channels`` (8, 8, 16, 32), so the last encoder features are
    at 1/16. After each encoder block a conv + LeakyReLU(0.2) projects to ``skip_channels`` (16) and the projection is
    upsampled (nearest) back to 1/2 resolution: all skips live at 1/2 (the MA structure: high-resolution maps with
    dilated convolutions instead of a deep pooling pyramid).

    Decoder at 1/2 resolution: a block on the two coarsest skips and a first :class:`ResidualAligner` (atrous 8),
    then per skip (coarsest first) a block on ``[features, skip]`` with ``dec_channels`` (32, 32, 16, 8) and an RA
    module with atrous rates 4, 2, 1; the last block upsamples by a transposed convolution to full resolution, where
    the fifth RA module (atrous 1) receives the previous field (nearest x2, values x2) and confidence (nearest x2).
    The RA modules share :class:`RASharedConvs`. The output DDF is ``conv([fixed-branch features, M21])`` (the
    reference's ``disp`` conv after the network), initialised near zero (N(0, 1e-5), as VoxelMorph's flow layer).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        enc_channels: the 4 encoder widths.
        dec_channels: the 4 decoder widths.
        skip_channels: width of the skip projections.
        num_heads: heads of the multi-head field (RAN: 6).

    ``forward(moving, fixed)``: ``(B, C, *spatial)`` each -> DDF ``(B, spatial_dims, *spatial)`` in voxels, pull
    convention. Sizes are zero-padded to multiples of 16 and the field cropped back. ``last_outputs`` keeps the
    fields ``fields`` (list of ``(B, d, ...)`` DDFs ``M21`` per RA module, first to last) and ``confidences`` of the
    last call; ``last_iterations`` is ``None`` (no iteration control: the RA modules already refine).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        enc_channels: Sequence[int] = (8, 8, 16, 32),
        dec_channels: Sequence[int] = (32, 32, 16, 8),
        skip_channels: int = 16,
        num_heads: int = 6,
    ) -> None:
        super().__init__()
        if len(enc_channels) != 4 or len(dec_channels) != 4:
            raise ValueError("RAN4 has 4 encoder and 4 decoder blocks.")
        self.spatial_dims, self.in_channels, self.num_heads = spatial_dims, in_channels, num_heads
        enc, dec, s = list(enc_channels), list(dec_channels), skip_channels
        self.encoder = nn.ModuleList(
            MotionAwareBlock(spatial_dims, cin, cout, downsample=True) for cin, cout in zip([in_channels] + enc[:-1], enc)
        )
        self.skips = nn.ModuleList(
            Convolution(spatial_dims, c, s, kernel_size=3, act=("leakyrelu", {"negative_slope": LEAKY02}), norm=None)
            for c in enc
        )
        self.bottom = MotionAwareBlock(spatial_dims, 2 * s, enc[-1])
        self.shared = RASharedConvs(spatial_dims, num_heads)
        self.aligners = nn.ModuleList([ResidualAligner(spatial_dims, enc[-1], num_heads, atrous_rate=8, first=True)])
        self.decoder = nn.ModuleList()
        prev = enc[-1]
        for i, (c, rate) in enumerate(zip(dec, (4, 2, 1, 1))):
            up = None
            if i == 3:
                up = Convolution(spatial_dims, prev + s, c, strides=2, kernel_size=2, is_transposed=True, conv_only=True, padding=0, output_padding=0)
            self.decoder.append(MotionAwareBlock(spatial_dims, prev + s, c, upsample=up))
            self.aligners.append(ResidualAligner(spatial_dims, c, num_heads, atrous_rate=rate))
            prev = c
        # kernel = spatial_dims in the reference ("same" padding); 3 is used in 2D too (even kernels pad asymmetrically)
        self.out = Convolution(spatial_dims, prev + spatial_dims, spatial_dims, kernel_size=3, conv_only=True)
        # near-identity start (VoxelMorph's flow-layer init): the reference starts from Keras' Glorot init and a
        # supervised pre-training stage on synthetic deformations, which the unsupervised recipe here does not have
        nn.init.normal_(self.out.conv.weight, std=1e-5)
        nn.init.zeros_(self.out.conv.bias)
        self.last_outputs: dict = {}
        self.last_iterations: torch.Tensor | None = None

    divisor = 16

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        check_registration_pair(moving, fixed, self.spatial_dims, self.in_channels, min_size=self.divisor)
        moving, spatial = pad_to_divisible(moving, self.divisor)
        fixed, _ = pad_to_divisible(fixed, self.divisor)
        b = moving.shape[0]
        x = torch.cat([moving, fixed], 0)  # branch 1 (moving) then branch 2 (fixed)
        skips = []
        for i, (block, proj) in enumerate(zip(self.encoder, self.skips)):
            x = block(x)
            sk = proj(x)
            skips.append(F.interpolate(sk, scale_factor=2**i, mode="nearest") if i > 0 else sk)
        x = self.bottom(torch.cat(skips[2:], 1))
        x, field, conf = self.aligners[0](x, self.shared)
        fields, confs = [field[b:]], [conf[b:]]
        for i, (block, aligner) in enumerate(zip(self.decoder, self.aligners[1:])):
            x = block(torch.cat([x, skips[-i - 1]], 1))
            if x.shape[2:] != field.shape[2:]:  # the last block upsampled: carry field (values x2) and confidence
                field = 2.0 * F.interpolate(field, size=x.shape[2:], mode="nearest")
                conf = F.interpolate(conf, size=x.shape[2:], mode="nearest")
            x, field, conf = aligner(x, self.shared, (field, conf))
            fields.append(field[b:])
            confs.append(conf[b:])
        ddf = self.out(torch.cat([x[b:], field[b:]], 1))
        self.last_outputs = {"fields": fields, "confidences": confs}
        return crop_to(ddf, spatial)
