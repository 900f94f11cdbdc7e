"""RP-Net and IIRP-Net (Residual Pyramid Network and its Iterative Inference version): ConvEncoder +
ResidualFlowEstimator per level, single pass or IterStop."""

from __future__ import annotations

from collections.abc import Sequence

from ...controllers import IterationController, IterStop
from ..blocks.encoders import ConvEncoder
from ..blocks.flow_estimator import ResidualFlowEstimator
from .pyramid import PyramidRegistrationNet

__all__ = ["RPNet", "IIRPNet"]


class RPNet(PyramidRegistrationNet):
    """RP-Net: IIRP-Net's architecture (419,964 parameters in 3D with defaults), one pass per level by default.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        encoder_channels: :class:`~monai_ipear.networks.blocks.ConvEncoder` channels, finest first.
        decoder_channels: flow-estimator widths ``q``, finest first.
        controller: default :class:`~monai_ipear.controllers.SinglePass`.
        padding_mode, unroll_training: see :class:`PyramidRegistrationNet`.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        encoder_channels: Sequence[int] = (8, 16, 32, 32),
        decoder_channels: Sequence[int] = (16, 32, 32, 32),
        controller: IterationController | Sequence[IterationController] | None = None,
        padding_mode: str = "zeros",
        unroll_training: bool = False,
    ) -> None:
        encoder = ConvEncoder(spatial_dims, in_channels, encoder_channels)
        decoders = [ResidualFlowEstimator(spatial_dims, c, q) for c, q in zip(encoder_channels, decoder_channels)]
        super().__init__(
            encoder,
            decoders,
            controller,  # None: SinglePass
            spatial_dims=spatial_dims,
            padding_mode=padding_mode,
            unroll_training=unroll_training,
        )


class IIRPNet(RPNet):
    """IIRP-Net: RP-Net under :class:`~monai_ipear.controllers.IterStop` (paper rule; ``faithful=True`` for the published code)."""

    def __init__(self, *args, delta: float = 0.005, k_max: int = 10, faithful: bool = False, **kwargs) -> None:
        kwargs.setdefault("controller", IterStop(delta=delta, k_max=k_max, faithful=faithful))
        super().__init__(*args, **kwargs)
