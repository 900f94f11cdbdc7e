"""Jacobian determinant of a displacement field and the folding percentage.

MONAI has no Jacobian-determinant metric (its ``BendingEnergyLoss`` / ``DiffusionLoss`` use derivatives only
internally), so the determinant of ``I + grad(u)`` is computed here with central differences
(``torch.gradient``: second-order central differences inside, one-sided differences at the borders).
"""

from __future__ import annotations

import torch

__all__ = ["jacobian_determinant", "folding_percentage"]


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
    ddf = ddf.float()
    # jac[:, i, j] = d(x_i + u_i) / d x_j
    rows = []
    for i in range(spatial_dims):
        grads = torch.gradient(ddf[:, i], dim=list(range(1, spatial_dims + 1)))
        rows.append([g + (1.0 if i == j else 0.0) for j, g in enumerate(grads)])
    if spatial_dims == 2:
        det = rows[0][0] * rows[1][1] - rows[0][1] * rows[1][0]
    else:
        (a, b, c), (d, e, f), (g, h, k) = rows
        det = a * (e * k - f * h) - b * (d * k - f * g) + c * (d * h - e * g)
    return det.unsqueeze(1)


def folding_percentage(ddf: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Percentage of voxels with Jacobian determinant <= 0, per sample: ``(B,)`` in [0, 100].

    ``mask`` (optional, ``(B, 1, *spatial)``, nonzero = counted) restricts the count, e.g. to the brain.
    """
    folded = (jacobian_determinant(ddf) <= 0).float()
    if mask is None:
        return 100.0 * folded.flatten(1).mean(1)
    m = (mask != 0).float()
    return 100.0 * (folded * m).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1.0)
