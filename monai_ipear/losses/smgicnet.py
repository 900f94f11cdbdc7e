"""SM-GICNet's training losses as MONAI-style loss modules.

Fields are DDFs ``(B, d, *spatial)`` in voxels, pull convention (``warped(x) = moving(x + ddf(x))``). With
``phi_AB(x) = x + u_AB(x)`` (fixed-grid point -> moving-grid point) the composition ``phi_AB o phi_BA`` has the
displacement ``u_BA(x) + u_AB(x + u_BA(x))``, i.e. ``FieldComposer.compose(u_AB, u_BA)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.losses import DiffusionLoss, LocalNormalizedCrossCorrelationLoss

from ..metrics.jacobian import displacement_gradient
from ..networks.blocks.fields import FieldComposer

__all__ = [
    "MultiLevelNCCLoss",
    "FieldSmoothnessLoss",
    "SymmetricConsistencyLoss",
    "InverseConsistencyLoss",
    "GradICONLoss",
    "SMGICNetLoss",
    "composed_displacement",
]


def composed_displacement(ddf_ab: torch.Tensor, ddf_ba: torch.Tensor, composer: FieldComposer) -> torch.Tensor:
    """Displacement of ``phi_AB o phi_BA``: ``u_BA(x) + u_AB(x + u_BA(x))``, ``(B, d, *spatial)`` voxels."""
    return composer.compose(ddf_ab, ddf_ba)


class MultiLevelNCCLoss(nn.Module):
    """Weighted sum over pyramid levels of MONAI's local NCC loss (``-LNCC``, in ``[-1, 0]`` per level).

    Args:
        kernel_size: LNCC window at every level (clamped to the largest odd size that fits a level).
        level_weights: one weight per level, finest first (default ``1, 0.5, 0.25, ...``).

    ``forward(warped, fixed)``: sequences of ``(B, C, *spatial_l)`` tensors, finest first -> scalar.
    """

    def __init__(self, kernel_size: int = 9, level_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.level_weights = None if level_weights is None else list(level_weights)

    def forward(self, warped: Sequence[torch.Tensor], fixed: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(warped) != len(fixed):
            raise ValueError(f"warped and fixed need the same number of levels, got {len(warped)} and {len(fixed)}.")
        weights = self.level_weights or [0.5**i for i in range(len(warped))]
        if len(weights) < len(warped):
            raise ValueError(f"level_weights has {len(weights)} entries for {len(warped)} levels.")
        total = warped[0].new_zeros(())
        for w, p, t in zip(weights, warped, fixed):
            k = min(self.kernel_size, min(p.shape[2:]))
            k = k if k % 2 else k - 1
            ncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=p.ndim - 2, kernel_size=max(k, 1))
            total = total + w * ncc(p, t)
        return total


class FieldSmoothnessLoss(nn.Module):
    """Mean of MONAI's :class:`~monai.losses.DiffusionLoss` (squared first differences) over several fields.

    ``forward(*fields)``: ``(B, d, *spatial)`` each (sizes may differ) -> scalar.
    """

    def __init__(self) -> None:
        super().__init__()
        self.diffusion = DiffusionLoss()

    def forward(self, *fields: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.diffusion(f) for f in fields]).mean()


class SymmetricConsistencyLoss(nn.Module):
    """SM-GICNet's symmetric consistency: the inverse of the forward map, ``exp(-v_AB)``, and the independently
    predicted backward map ``exp(v_BA)`` must agree; measured as the MSE between the image warped by each
    (as the reference code does).

    ``forward(image, ddf_inverse, ddf_backward)``: ``(B, C, *spatial)``, two ``(B, d, *spatial)`` -> scalar.
    """

    def __init__(self, padding_mode: str = "border") -> None:
        super().__init__()
        self.fields = FieldComposer(padding_mode)

    def forward(self, image: torch.Tensor, ddf_inverse: torch.Tensor, ddf_backward: torch.Tensor) -> torch.Tensor:
        return (self.fields.warp(image, ddf_inverse) - self.fields.warp(image, ddf_backward)).pow(2).mean()


class InverseConsistencyLoss(nn.Module):
    """Inverse consistency: ``phi_AB o phi_BA`` and ``phi_BA o phi_AB`` should be the identity; the mean squared
    norm (voxels^2) of their displacements, averaged over both orders.

    ``forward(ddf_ab, ddf_ba)``: ``(B, d, *spatial)`` each -> scalar.
    """

    def __init__(self, padding_mode: str = "border") -> None:
        super().__init__()
        self.fields = FieldComposer(padding_mode)

    def forward(self, ddf_ab: torch.Tensor, ddf_ba: torch.Tensor) -> torch.Tensor:
        a = composed_displacement(ddf_ab, ddf_ba, self.fields)
        b = composed_displacement(ddf_ba, ddf_ab, self.fields)
        return 0.5 * (a.pow(2).sum(1).mean() + b.pow(2).sum(1).mean())


class GradICONLoss(nn.Module):
    """Gradient inverse consistency (GradICON), as the SM-GICNet paper states it: ``|| J(phi_AB o phi_BA) - I ||_F^2``,
    averaged over voxels and over both orders of composition.

    ``J - I`` is the spatial gradient of the composed displacement, by central differences (one-sided at the
    border; ``torch.gradient``, unit voxel spacing). Zero for an exact inverse pair; unlike
    :class:`InverseConsistencyLoss` it is also zero when the composition is a translation. (The published
    SM-GICNet code omits this term.)

    ``forward(ddf_ab, ddf_ba)``: ``(B, d, *spatial)`` each -> scalar.
    """

    def __init__(self, padding_mode: str = "border") -> None:
        super().__init__()
        self.fields = FieldComposer(padding_mode)

    jacobian_minus_identity = staticmethod(displacement_gradient)  # J - I of x -> x + disp(x)

    def forward(self, ddf_ab: torch.Tensor, ddf_ba: torch.Tensor) -> torch.Tensor:
        total = ddf_ab.new_zeros(())
        for first, second in ((ddf_ab, ddf_ba), (ddf_ba, ddf_ab)):
            jac = self.jacobian_minus_identity(composed_displacement(first, second, self.fields))
            total = total + 0.5 * jac.pow(2).sum((1, 2)).mean()
        return total


class SMGICNetLoss(nn.Module):
    """SM-GICNet's training objective, called like every loss of the bundle: ``loss(warped, fixed, ddf)``.

    It reads ``network.last_outputs`` (see :class:`~monai_ipear.networks.nets.SMGICNet`) of the same forward pass:

    ``ncc_weight * [MultiLevelNCC(A->B) + MultiLevelNCC(B->A)]`` (every level, both directions)
    ``+ smooth_weight * FieldSmoothness(u_AB, u_BA)``
    ``+ symmetric_weight * SymmetricConsistency(fixed, exp(-v_AB), exp(v_BA))``
    ``+ inverse_weight * InverseConsistency(u_AB, u_BA)``
    ``+ gradicon_weight * GradICON(u_AB, u_BA)``.

    The default weights are this package's choice for the tiny synthetic default data (the reference code uses
    smoothness ~1, 0.01 for its field term and 0.001 for symmetric consistency; the paper gives no GradICON weight).

    Args:
        network: the :class:`SMGICNet` being trained (``"network": "@network_def"`` in a bundle config).
        kernel_size, level_weights: of :class:`MultiLevelNCCLoss`.
    """

    def __init__(
        self,
        network: nn.Module,
        ncc_weight: float = 1.0,
        smooth_weight: float = 1.0,
        symmetric_weight: float = 0.1,
        inverse_weight: float = 0.01,
        gradicon_weight: float = 0.1,
        kernel_size: int = 9,
        level_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.network = [network]  # a list: not registered as a submodule, so the network is not saved twice
        self.weights = (ncc_weight, smooth_weight, symmetric_weight, inverse_weight, gradicon_weight)
        self.ncc = MultiLevelNCCLoss(kernel_size, level_weights)
        self.smooth = FieldSmoothnessLoss()
        self.symmetric = SymmetricConsistencyLoss()
        self.inverse = InverseConsistencyLoss()
        self.gradicon = GradICONLoss()
        self.fields = FieldComposer("border")
        self.last_terms: dict[str, float] = {}

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor, ddf: torch.Tensor | None = None) -> torch.Tensor:
        out = getattr(self.network[0], "last_outputs", None)
        if not out:
            raise ValueError("SMGICNetLoss needs network.last_outputs: run the SMGICNet forward pass first.")
        levels = out["levels"]
        fwd_w = [self.fields.warp(lv["moving"], lv["ddf"]) for lv in levels]
        bwd_w = [self.fields.warp(lv["fixed"], lv["ddf_backward"]) for lv in levels]
        ncc = self.ncc(fwd_w, [lv["fixed"] for lv in levels]) + self.ncc(bwd_w, [lv["moving"] for lv in levels])
        u_ab, u_ba = out["ddf"], out["ddf_backward"]
        terms = {
            "ncc": ncc,
            "smooth": self.smooth(u_ab, u_ba),
            "symmetric": self.symmetric(out["fixed"], out["ddf_inverse"], u_ba),
            "inverse": self.inverse(u_ab, u_ba),
            "gradicon": self.gradicon(u_ab, u_ba),
        }
        self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
        return sum(w * t for w, t in zip(self.weights, terms.values()))
