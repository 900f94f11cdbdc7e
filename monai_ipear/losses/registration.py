"""The default registration training loss: local NCC plus a diffusion regulariser on the field."""

from __future__ import annotations

import torch
from monai.losses import DiffusionLoss, LocalNormalizedCrossCorrelationLoss

__all__ = ["RegistrationLoss"]


class RegistrationLoss(torch.nn.Module):
    """``LNCC(warped, fixed) + smooth_weight * Diffusion(ddf)`` (IIRP-Net / iPEAR training loss).

    Args:
        spatial_dims: 2 or 3.
        ncc_kernel_size: window of the local NCC (9, as IIRP-Net's code).
        smooth_weight: lambda, weight of :class:`~monai.losses.DiffusionLoss` (1.0 in the papers).
        kernel_type: LNCC window, ``"rectangular"`` (default), ``"triangular"`` or ``"gaussian"``.

    ``forward(warped, fixed, ddf)``: ``warped``, ``fixed`` ``(B, C, *spatial)`` intensities in [0, 1],
    ``ddf`` ``(B, spatial_dims, *spatial)`` in voxels -> scalar loss. MONAI's LNCC loss is ``-LNCC`` (in [-1, 0]).
    ``last_terms`` holds the two terms of the last call (floats) for logging.
    """

    def __init__(
        self, spatial_dims: int = 3, ncc_kernel_size: int = 9, smooth_weight: float = 1.0, kernel_type: str = "rectangular"
    ) -> None:
        super().__init__()
        self.similarity = LocalNormalizedCrossCorrelationLoss(
            spatial_dims=spatial_dims, kernel_size=ncc_kernel_size, kernel_type=kernel_type
        )
        self.regularization = DiffusionLoss()
        self.smooth_weight = float(smooth_weight)
        self.last_terms: dict[str, float] = {}

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        sim = self.similarity(warped, fixed)
        reg = self.regularization(ddf)
        self.last_terms = {"similarity": float(sim.detach()), "regularization": float(reg.detach())}
        return sim + self.smooth_weight * reg
