"""Jacobian determinant of a displacement field and the folding percentage.

MONAI has no Jacobian-determinant metric (its ``BendingEnergyLoss`` / ``DiffusionLoss`` use derivatives only
internally), so the determinant of ``I + grad(u)`` is computed here with central differences
(``torch.gradient``: second-order central differences inside, one-sided differences at the borders).
"""

from __future__ import annotations

import torch

__all__ = ["displacement_gradient", "jacobian_determinant", "folding_percentage"]


def displacement_gradient(ddf: torch.Tensor) -> torch.Tensor:
    """Spatial gradient of a displacement: ``(B, d, d, *spatial)``, entry ``[:, i, j]`` = d ddf_i / d x_j.

    Central differences inside, one-sided at the borders (``torch.gradient``). The Jacobian of
    ``x -> x + ddf(x)`` is this plus the identity.
    """
    return torch.stack(torch.gradient(ddf, dim=tuple(range(2, ddf.ndim))), 2)


def jacobian_determinant(ddf: torch.Tensor) -> torch.Tensor:
    """Determinant of the Jacobian of ``x -> x + ddf(x)``.

    Args:
        ddf: ``(B, spatial_dims, *spatial)`` in voxels (channel ``i`` = axis ``i``), spatial_dims 2 or 3.

    Returns:
        ``(B, 1, *spatial)`` determinants (1 for the identity; <= 0 where the mapping folds).
    """
    spatial_dims = ddf.ndim - 2
    if ddf.shape[1] != spatial_dims or spatial_dims not in (2, 3):
        raise ValueError(f"ddf must be (B, spatial_dims, *spatial) with spatial_dims 2 or 3, got {tuple(ddf.shape)}.")
    jac = displacement_gradient(ddf.float()) + torch.eye(spatial_dims, device=ddf.device).view(
        1, spatial_dims, spatial_dims, *[1] * spatial_dims
    )
    return torch.linalg.det(jac.movedim((1, 2), (-2, -1))).unsqueeze(1)


def folding_percentage(ddf: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Percentage of voxels with Jacobian determinant <= 0, per sample: ``(B,)`` in [0, 100].

    ``mask`` (optional, ``(B, 1, *spatial)``, nonzero = counted) restricts the count, e.g. to the brain; a sample
    whose mask is empty, or whose field holds NaN/Inf, gives NaN (undefined), not 0 %.
    """
    det = jacobian_determinant(ddf)
    folded = (det <= 0).float()
    undefined = ~torch.isfinite(det).flatten(1).all(1)  # a NaN/Inf field: NaN, not "0 % folding"
    if mask is None:
        pct = 100.0 * folded.flatten(1).mean(1)
        return torch.where(undefined, torch.full_like(pct, float("nan")), pct)
    m = (mask != 0).float()
    count = m.flatten(1).sum(1)
    pct = 100.0 * (folded * m).flatten(1).sum(1) / count.clamp_min(1.0)
    return torch.where((count > 0) & ~undefined, pct, torch.full_like(pct, float("nan")))  # empty mask: undefined
