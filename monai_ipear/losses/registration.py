"""The registration training loss of IIRP-Net / iPEAR: local NCC plus the papers' gradient smoothness term."""

from __future__ import annotations

import torch
from monai.losses import DiffusionLoss, LocalNormalizedCrossCorrelationLoss

__all__ = ["GradientSmoothnessLoss", "RegistrationLoss", "REGULARIZATIONS"]


class GradientSmoothnessLoss(torch.nn.Module):
    """The papers' smoothness term: squared (``"l2"``) or absolute (``"l1"``) *forward* differences of the field,
    averaged over voxels and channels per axis, then over the ``spatial_dims`` axes.

    This is voxelmorph's / IIRP-Net's ``Grad('l2')``, which the IIRP-Net, iPEAR, NAP and SACB-Net papers weight by
    lambda. MONAI has no loss of that form: :class:`~monai.losses.DiffusionLoss` takes central differences (blind to
    period-2 oscillation, since ``u[x+1] - u[x-1]`` vanishes on a checkerboard) and sums over the axes (about
    ``spatial_dims`` times stronger on a smooth field), so it is written here.

    Args:
        penalty: ``"l2"`` (default) or ``"l1"``.

    ``forward(ddf)``: ``(B, spatial_dims, *spatial)`` displacement in voxels -> scalar (voxels^2 for ``"l2"``).
    Example: ``u_0 = a * x_0`` (channel 0 linear along axis 0, other channels 0) in 3D gives ``a^2 / 9``.
    """

    def __init__(self, penalty: str = "l2") -> None:
        super().__init__()
        if penalty not in ("l1", "l2"):
            raise ValueError(f"penalty must be 'l1' or 'l2', got {penalty!r}.")
        self.penalty = penalty

    def forward(self, ddf: torch.Tensor) -> torch.Tensor:
        if ddf.ndim < 3:
            raise ValueError(f"expected a (B, spatial_dims, *spatial) field, got shape {tuple(ddf.shape)}.")
        terms = []
        for axis in range(2, ddf.ndim):
            d = torch.diff(ddf, dim=axis)
            terms.append((d.square() if self.penalty == "l2" else d.abs()).mean())
        return torch.stack(terms).mean()


REGULARIZATIONS = {"gradient": GradientSmoothnessLoss, "diffusion": DiffusionLoss}


class RegistrationLoss(torch.nn.Module):
    """``LNCC(warped, fixed) + smooth_weight * smoothness(ddf)`` (IIRP-Net / iPEAR training loss).

    Args:
        spatial_dims: 2 or 3.
        ncc_kernel_size: window of the local NCC (9, as IIRP-Net's code).
        smooth_weight: lambda (1.0 in the IIRP-Net / iPEAR papers, 0.3 in SACB-Net's).
        kernel_type: LNCC window, ``"rectangular"`` (default), ``"triangular"`` or ``"gaussian"``.
        regularization: ``"gradient"`` (default: :class:`GradientSmoothnessLoss`, the papers' term) or
            ``"diffusion"`` (MONAI's :class:`~monai.losses.DiffusionLoss`, about 3x stronger on smooth 3D fields).

    ``forward(warped, fixed, ddf)``: ``warped``, ``fixed`` ``(B, C, *spatial)`` intensities in [0, 1],
    ``ddf`` ``(B, spatial_dims, *spatial)`` in voxels -> scalar loss. MONAI's LNCC loss is ``-LNCC`` (in [-1, 0]).
    ``last_terms`` holds the two terms of the last call (floats) for logging.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        ncc_kernel_size: int = 9,
        smooth_weight: float = 1.0,
        kernel_type: str = "rectangular",
        regularization: str = "gradient",
    ) -> None:
        super().__init__()
        if regularization not in REGULARIZATIONS:
            raise ValueError(f"unknown regularization {regularization!r}; choose one of {sorted(REGULARIZATIONS)}.")
        self.similarity = LocalNormalizedCrossCorrelationLoss(
            spatial_dims=spatial_dims, kernel_size=ncc_kernel_size, kernel_type=kernel_type
        )
        self.regularization = REGULARIZATIONS[regularization]()
        self.smooth_weight = float(smooth_weight)
        self.last_terms: dict[str, float] = {}

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        sim = self.similarity(warped, fixed)
        reg = self.regularization(ddf)
        self.last_terms = {"similarity": float(sim.detach()), "regularization": float(reg.detach())}
        return sim + self.smooth_weight * reg
