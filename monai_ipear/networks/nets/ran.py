"""Residual Aligner Network (RAN, Zheng et al., Medical Image Analysis 2024) as a pyramid registration network."""

from __future__ import annotations

from collections.abc import Sequence

from ...controllers import IterationController
from ..blocks.residual_aligner import MotionAwareEncoder, ResidualAligner
from .pyramid import PyramidRegistrationNet

__all__ = ["RAN"]


class RAN(PyramidRegistrationNet):
    """RAN: :class:`~monai_ipear.networks.blocks.MotionAwareEncoder` + one
    :class:`~monai_ipear.networks.blocks.ResidualAligner` per level, decoded coarse to fine by
    :class:`PyramidRegistrationNet` (each RA module receives the field its level holds as ``previous`` and its
    output is composed onto it).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        channels: encoder channels per level, finest first.
        num_heads: heads of each RA module's multi-head field (RAN: 6).
        dilations: dilation of each RA module's trunk, finest first (default ``1, 1, 2, 4``: larger at coarser
            levels, as the reference's atrous rates).
        controller, padding_mode, unroll_training: see :class:`PyramidRegistrationNet` (default: one pass).

    ``forward(moving, fixed)`` -> DDF ``(B, spatial_dims, *spatial)`` in voxels, pull convention.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        channels: Sequence[int] = (8, 16, 16, 32),
        num_heads: int = 6,
        dilations: Sequence[int] | None = None,
        controller: IterationController | Sequence[IterationController] | None = None,
        padding_mode: str = "zeros",
        unroll_training: bool = False,
    ) -> None:
        encoder = MotionAwareEncoder(spatial_dims, in_channels, channels)
        dil = list(dilations) if dilations is not None else [2 ** max(i - 1, 0) for i in range(len(channels))]
        if len(dil) != len(channels):
            raise ValueError(f"dilations needs one value per level ({len(channels)}), got {dil}.")
        decoders = [ResidualAligner(spatial_dims, c, num_heads, dilation=d) for c, d in zip(channels, dil)]
        super().__init__(
            encoder,
            decoders,
            controller,  # None: SinglePass
            spatial_dims=spatial_dims,
            padding_mode=padding_mode,
            unroll_training=unroll_training,
        )
