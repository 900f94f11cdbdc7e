"""SM-GICNet's training losses as MONAI-style loss modules.

Fields are DDFs ``(B, d, *spatial)`` in voxels, pull convention (``warped(x) = moving(x + ddf(x))``). With
``phi_AB(x) = x + u_AB(x)`` (fixed-grid point -> moving-grid point) the composition ``phi_AB o phi_BA`` has the
displacement ``u_BA(x) + u_AB(x + u_BA(x))``, i.e. ``FieldComposer.compose(u_AB, u_BA)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.losses import LocalNormalizedCrossCorrelationLoss

from ..metrics.jacobian import displacement_gradient
from ..networks.blocks.fields import FieldComposer
from .registration import GradientSmoothnessLoss

__all__ = [
    "MultiLevelNCCLoss",
    "FieldSmoothnessLoss",
    "MultiLevelConsistencyLoss",
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
    """Weighted sum over pyramid levels of MONAI's local NCC loss (``-LNCC``, squared NCC, in ``[-1, 0]`` per level).

    Args:
        kernel_size: LNCC window, one int for every level or one per level (finest first; SM-GICNet's code: 9, 7, 5,
            3 from the finest to the coarsest of 4 levels); clamped to the largest odd size that fits a level.
        level_weights: one weight per level, finest first (default ``1, 0.5, 0.25, ...``, as SM-GICNet's code).

    ``forward(warped, fixed)``: sequences of ``(B, C, *spatial_l)`` tensors, finest first -> scalar.
    """

    def __init__(self, kernel_size: int | Sequence[int] = 9, level_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.level_weights = None if level_weights is None else list(level_weights)

    def kernel(self, level: int, shape: Sequence[int]) -> int:
        k = self.kernel_size if isinstance(self.kernel_size, int) else list(self.kernel_size)[level]
        k = min(int(k), min(shape))
        return max(k if k % 2 else k - 1, 1)

    def forward(self, warped: Sequence[torch.Tensor], fixed: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(warped) != len(fixed):
            raise ValueError(f"warped and fixed need the same number of levels, got {len(warped)} and {len(fixed)}.")
        weights = self.level_weights or [0.5**i for i in range(len(warped))]
        if len(weights) < len(warped):
            raise ValueError(f"level_weights has {len(weights)} entries for {len(warped)} levels.")
        total = next(p for p in warped if p is not None).new_zeros(())
        for i, (w, p, t) in enumerate(zip(weights, warped, fixed)):
            if p is None:
                continue
            ncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=p.ndim - 2, kernel_size=self.kernel(i, p.shape[2:]))
            total = total + w * ncc(p, t)
        return total


class FieldSmoothnessLoss(nn.Module):
    """Weighted sum of the papers' gradient smoothness term (:class:`~monai_ipear.losses.GradientSmoothnessLoss`,
    forward differences, l2, as SM-GICNet's ``smoothloss``) over several fields.

    ``forward(*fields, weights=None)``: ``(B, d, *spatial)`` each (sizes may differ), weights default 1 -> scalar.
    """

    def __init__(self) -> None:
        super().__init__()
        self.grad = GradientSmoothnessLoss("l2")

    def forward(self, *fields: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
        weights = [1.0] * len(fields) if weights is None else list(weights)
        return sum(w * self.grad(f) for w, f in zip(weights, fields))


class MultiLevelConsistencyLoss(nn.Module):
    """SM-GICNet's multi-level consistency: the moving image warped by a level's deformation and by the deformation
    the level started from (the coarser level's, upsampled) should agree; the MSE between the two. (The reference
    code writes it as ``MSE(a, (a + b) / 2) = MSE(a, b) / 4`` with weight 0.001 * 0.5.)

    ``forward(image, ddf, ddf_start)``: ``(B, C, *spatial)``, two ``(B, d, *spatial)`` -> scalar.
    """

    def __init__(self, padding_mode: str = "border") -> None:
        super().__init__()
        self.fields = FieldComposer(padding_mode)

    def forward(self, image: torch.Tensor, ddf: torch.Tensor, ddf_start: torch.Tensor) -> torch.Tensor:
        return (self.fields.warp(image, ddf) - self.fields.warp(image, ddf_start)).pow(2).mean()


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

    It reads ``network.last_outputs`` (see :class:`~monai_ipear.networks.nets.SMGICNet`) of the same forward pass;
    with the active levels ``l`` (finest active first, weights ``w_l = 1, 0.5, 0.25, ...``):

    ``ncc_weight * sum_l w_l [NCC_l(A->B) + NCC_l(B->A)]`` (approximations, and detail bands where present)
    ``+ inverse_ncc_weight * [NCC(B o exp(-v_AB), A) + NCC(A o exp(-v_BA), B)]``
    ``+ smooth_weight * [sum_l w_l (Grad(u_AB,l) + Grad(u_BA,l)) + Grad(exp(-v_AB))]``
    ``+ symmetric_weight * [SymmetricConsistency(B; exp(-v_AB), exp(v_BA)) + SymmetricConsistency(A; exp(-v_BA), exp(v_AB))]``
    ``+ multilevel_weight * [MultiLevelConsistency(A; u_AB, start) + (B; u_BA, start)]`` (from the second level on)
    ``+ inverse_weight * InverseConsistency(u_AB, u_BA) + gradicon_weight * GradICON(u_AB, u_BA)``.

    Weights: NCC 1, inverse NCC 0.1, smoothness 1, symmetric 0.001, multi-level 0.0005 (the SM-GICNet paper and
    code); ``inverse_weight`` 0.01 and ``gradicon_weight`` 0.1 are this package's choices (the reference code has
    no GradICON term; the weight the paper uses for it was not available to us).

    Args:
        network: the :class:`SMGICNet` being trained (``"network": "@network_def"`` in a bundle config).
        kernel_size: LNCC window(s) of :class:`MultiLevelNCCLoss`, finest first (default 9, 7, 5, 3).
        level_weights: per active level, finest active first.
    """

    def __init__(
        self,
        network: nn.Module,
        ncc_weight: float = 1.0,
        smooth_weight: float = 1.0,
        symmetric_weight: float = 0.001,
        multilevel_weight: float = 0.0005,
        inverse_ncc_weight: float = 0.1,
        inverse_weight: float = 0.01,
        gradicon_weight: float = 0.1,
        kernel_size: int | Sequence[int] = (9, 7, 5, 3),
        level_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        self.network = [network]  # a list: not registered as a submodule, so the network is not saved twice
        self.weights = {
            "ncc": ncc_weight, "inverse_ncc": inverse_ncc_weight, "smooth": smooth_weight,
            "symmetric": symmetric_weight, "multilevel": multilevel_weight, "inverse": inverse_weight,
            "gradicon": gradicon_weight,
        }
        self.kernel_size = kernel_size
        self.level_weights = level_weights
        self.smooth = FieldSmoothnessLoss()
        self.symmetric = SymmetricConsistencyLoss()
        self.multilevel = MultiLevelConsistencyLoss()
        self.inverse = InverseConsistencyLoss()
        self.gradicon = GradICONLoss()
        self.fields = FieldComposer("border")
        self.last_terms: dict[str, float] = {}

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor, ddf: torch.Tensor | None = None) -> torch.Tensor:
        net = self.network[0]
        out = getattr(net, "last_outputs", None)
        if not out:
            raise ValueError("SMGICNetLoss needs network.last_outputs: run the SMGICNet forward pass first.")
        levels = out["levels"]
        offset = getattr(net, "levels", len(levels)) - getattr(net, "active_levels", len(levels))
        ks = self.kernel_size if isinstance(self.kernel_size, int) else list(self.kernel_size)[offset:]
        ncc = MultiLevelNCCLoss(ks, self.level_weights)
        w = self.level_weights or [0.5**i for i in range(len(levels))]
        warp = self.fields.warp
        ncc_term = ncc([warp(lv["moving"], lv["ddf"]) for lv in levels], [lv["fixed"] for lv in levels])
        ncc_term = ncc_term + ncc([warp(lv["fixed"], lv["ddf_backward"]) for lv in levels], [lv["moving"] for lv in levels])
        detail = [lv for lv in levels if lv.get("moving_detail") is not None]
        if detail:
            dm = [None if lv.get("moving_detail") is None else warp(lv["moving_detail"], lv["ddf"]) for lv in levels]
            df = [None if lv.get("moving_detail") is None else warp(lv["fixed_detail"], lv["ddf_backward"]) for lv in levels]
            ncc_term = ncc_term + ncc(dm, [lv["fixed_detail"] for lv in levels])
            ncc_term = ncc_term + ncc(df, [lv["moving_detail"] for lv in levels])
        a, b = out["moving"], out["fixed"]
        u_ab, u_ba = out["ddf"], out["ddf_backward"]
        inv_ncc = MultiLevelNCCLoss(ks, [1.0])
        terms = {
            "ncc": ncc_term,
            "inverse_ncc": inv_ncc([warp(b, out["ddf_inverse"])], [a]) + inv_ncc([warp(a, out["ddf_backward_inverse"])], [b]),
            "smooth": self.smooth(*[lv["ddf"] for lv in levels], *[lv["ddf_backward"] for lv in levels], out["ddf_inverse"],
                                  weights=list(w[: len(levels)]) * 2 + [1.0]),
            "symmetric": self.symmetric(b, out["ddf_inverse"], u_ba) + self.symmetric(a, out["ddf_backward_inverse"], u_ab),
            "multilevel": (self.multilevel(a, u_ab, out["ddf_start"]) + self.multilevel(b, u_ba, out["ddf_backward_start"]))
            if len(levels) > 1 else u_ab.new_zeros(()),
            "inverse": self.inverse(u_ab, u_ba),
            "gradicon": self.gradicon(u_ab, u_ba),
        }
        self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
        return sum(self.weights[k] * t for k, t in terms.items())
