"""iPEAR: NA encoder + FARM decoders + TCI iteration control (Wu et al.)."""

from __future__ import annotations

from collections.abc import Sequence

from ...controllers import TCI, IterationController
from ..blocks.encoders import NAEncoder
from ..blocks.farm import FARM
from .pyramid import PyramidRegistrationNet

__all__ = ["iPEAR"]


class iPEAR(PyramidRegistrationNet):  # noqa: N801 - the method's name
    """iPEAR with the paper's defaults (about 508.7K parameters in 3D).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        encoder_channels: :class:`~monai_ipear.networks.blocks.NAEncoder` channels per level, finest first.
        decoder_channels: FARM residual-pathway widths ``q`` per level, finest first (see docs/architecture.md).
        num_heads: attention heads at levels 2..L.
        na_kernel_size: neighborhood-attention kernel.
        controller: iteration control at inference; default ``TCI()`` (delta_s = delta_c = 0.005, t = 3, k_max = 10).
        sab_mode: FARM's SAB reading, ``"spatial"`` (default) or ``"channel"``.
        use_seb, use_sab, use_rp: FARM ablation switches.
        padding_mode, unroll_training: see :class:`PyramidRegistrationNet`.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        encoder_channels: Sequence[int] = (8, 16, 32, 32),
        decoder_channels: Sequence[int] = (16, 32, 32, 32),
        num_heads: Sequence[int] = (2, 4, 4),
        na_kernel_size: int = 3,
        controller: IterationController | Sequence[IterationController] | None = None,
        sab_mode: str = "spatial",
        use_seb: bool = True,
        use_sab: bool = True,
        use_rp: bool = True,
        padding_mode: str = "zeros",
        unroll_training: bool = False,
        use_natten: bool = False,
    ) -> None:
        if len(decoder_channels) != len(encoder_channels):
            raise ValueError(
                f"decoder_channels ({len(decoder_channels)}) and encoder_channels ({len(encoder_channels)}) need one entry per level."
            )
        encoder = NAEncoder(spatial_dims, in_channels, encoder_channels, num_heads, na_kernel_size, use_natten)
        decoders = [
            FARM(spatial_dims, c, q, sab_mode=sab_mode, use_seb=use_seb, use_sab=use_sab, use_rp=use_rp)
            for c, q in zip(encoder_channels, decoder_channels)
        ]
        super().__init__(
            encoder,
            decoders,
            controller if controller is not None else TCI(),
            spatial_dims=spatial_dims,
            padding_mode=padding_mode,
            unroll_training=unroll_training,
        )
