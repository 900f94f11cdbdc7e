"""The Residual Aligner Network's unsupervised training loss (reference: jianqingzheng/res_aligner_net,
``train_tfkeras.py`` stage 2 and ``ran_func/losses.py`` ``NCC`` / ``Grad``)."""

from __future__ import annotations

import torch
import torch.nn as nn
from monai.losses import LocalNormalizedCrossCorrelationLoss

__all__ = ["EdgeAwareSmoothnessLoss", "MaskedLNCCLoss", "RANLoss"]


def _forward_differences(x: torch.Tensor, axis: int) -> torch.Tensor:
    """``x[i] - x[i - 1]`` along ``axis`` with a zero first entry (same shape as ``x``)."""
    d = torch.diff(x, dim=axis)
    pad = [0, 0] * (x.ndim - 1 - axis) + [1, 0]
    return torch.nn.functional.pad(d, pad)


class EdgeAwareSmoothnessLoss(nn.Module):
    """RAN's edge-aware regulariser (the reference's ``Grad(penalty='l1', apear_scale=s).loss(y_pred, img)``):
    ``mean_axes mean_voxels(|D_i u| * g)`` with the edge weight
    ``g = exp(-s * sum_i (D_i I)^2 / (0.2 + I)^2)`` of the fixed image ``I`` (``D_i``: forward differences, zero at
    the first voxel). Smoothness is relaxed across image edges so that neighbouring organs may slide.
    MONAI's smoothness losses have no image weighting, hence this module.

    Args:
        appearance_scale: ``s`` (reference: 25 for multi-organ abdominal CT, 9 for lung CT).
        penalty: ``"l1"`` (reference) or ``"l2"`` (the reference then takes the square root of the mean).

    ``forward(ddf, image)``: ``(B, d, *spatial)`` voxels, ``(B, C, *spatial)`` intensities -> scalar.
    The reference adds an out-of-range penalty on the central voxel's displacement (zero unless it exceeds the image
    size); it is left out.
    """

    def __init__(self, appearance_scale: float = 25.0, penalty: str = "l1") -> None:
        super().__init__()
        if penalty not in ("l1", "l2"):
            raise ValueError(f"penalty must be 'l1' or 'l2', got {penalty!r}.")
        self.appearance_scale, self.penalty = float(appearance_scale), penalty

    def edge_weight(self, image: torch.Tensor) -> torch.Tensor:
        axes = range(2, image.ndim)
        grad2 = sum(_forward_differences(image, a).square().sum(1, keepdim=True) for a in axes)
        return torch.exp(-self.appearance_scale * grad2 / (0.2 + image).square().sum(1, keepdim=True))

    def forward(self, ddf: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        g = self.edge_weight(image)
        diffs = [_forward_differences(ddf, a) for a in range(2, ddf.ndim)]
        if self.penalty == "l1":
            return torch.stack([(d.abs() * g).mean() for d in diffs]).mean()
        return torch.stack([(d.square() * g).mean() for d in diffs]).mean().sqrt()


class MaskedLNCCLoss(nn.Module):
    """MONAI's squared local NCC averaged over the voxels where the fixed image exceeds ``threshold`` (per sample,
    then over the batch), as RAN's ``NCC.loss(pred, fixed, fixed > thresh)``; ``-masked mean`` in ``[-1, 0]``.
    ``threshold=None``: plain mean. ``forward(warped, fixed)`` -> scalar."""

    def __init__(self, spatial_dims: int = 3, kernel_size: int = 9, threshold: float | None = 0.1) -> None:
        super().__init__()
        self.lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=spatial_dims, kernel_size=kernel_size, reduction="none")
        self.threshold = threshold

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        ncc = self.lncc(warped, fixed)  # (B, C, *spatial), -ncc per voxel
        if self.threshold is None:
            return ncc.mean()
        mask = (fixed > self.threshold).to(ncc.dtype)
        dims = tuple(range(1, ncc.ndim))
        return ((ncc * mask).mean(dims) / (mask.mean(dims) + 1e-5)).mean()


class RANLoss(nn.Module):
    """``ncc_weight * MaskedLNCC(warped, fixed) + smooth_weight * EdgeAwareSmoothness(ddf, fixed)``, RAN's
    unsupervised stage (weights 2 and 0.5 for abdominal CT; 0.05 and ``appearance_scale=9`` for lung CT).

    Args:
        spatial_dims: 2 or 3.
        ncc_weight, smooth_weight: term weights.
        kernel_size: LNCC window (reference: 8; MONAI's LNCC needs an odd window, so 9).
        threshold: fixed-image intensity above which NCC is averaged (reference: 0.1 abdomen, 0.01 lung).
        appearance_scale: of :class:`EdgeAwareSmoothnessLoss`.

    ``forward(warped, fixed, ddf)`` -> scalar; ``last_terms`` keeps both terms.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        ncc_weight: float = 2.0,
        smooth_weight: float = 0.5,
        kernel_size: int = 9,
        threshold: float | None = 0.1,
        appearance_scale: float = 25.0,
    ) -> None:
        super().__init__()
        self.similarity = MaskedLNCCLoss(spatial_dims, kernel_size, threshold)
        self.regularization = EdgeAwareSmoothnessLoss(appearance_scale)
        self.ncc_weight, self.smooth_weight = float(ncc_weight), float(smooth_weight)
        self.last_terms: dict[str, float] = {}

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        sim = self.similarity(warped, fixed)
        reg = self.regularization(ddf, fixed)
        self.last_terms = {"similarity": float(sim.detach()), "regularization": float(reg.detach())}
        return self.ncc_weight * sim + self.smooth_weight * reg
