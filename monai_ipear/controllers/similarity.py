"""Global image similarities used by iteration controllers (higher is better, one value per sample)."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["global_ncc", "global_ncc_iirp", "negative_mse", "negative_mae", "get_similarity"]


def _flat(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return a.float().flatten(1), b.float().flatten(1)


def global_ncc(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of ``a`` and ``b`` ``(B, C, *spatial)`` over all channels and voxels, per sample -> ``(B,)``.

    Population statistics. A constant image (zero variance) gives 0, never NaN.
    """
    a, b = _flat(a, b)
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    cov = (a * b).mean(1)
    denom = (a.square().mean(1) * b.square().mean(1)).sqrt()
    return torch.where(denom > eps, cov / denom.clamp_min(eps), torch.zeros_like(cov))


def global_ncc_iirp(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """IIRP-Net's published NCC: ``mean((a - mean a)(b - mean b)) / (std a * std b)`` with *unbiased* stds.

    Equals ``(N - 1) / N`` times :func:`global_ncc`; used by ``IterStop(faithful=True)`` to reproduce the
    published iteration decisions. Zero variance gives 0 (the published code would divide by zero).
    """
    a, b = _flat(a, b)
    cov = ((a - a.mean(1, keepdim=True)) * (b - b.mean(1, keepdim=True))).mean(1)
    denom = a.std(1) * b.std(1)
    return torch.where(denom > eps, cov / denom.clamp_min(eps), torch.zeros_like(cov))


def negative_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``-mean((a - b)^2)`` per sample -> ``(B,)``."""
    a, b = _flat(a, b)
    return -(a - b).square().mean(1)


def negative_mae(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``-mean(|a - b|)`` per sample -> ``(B,)``."""
    a, b = _flat(a, b)
    return -(a - b).abs().mean(1)


_SIMILARITIES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ncc": global_ncc,
    "ncc_iirp": global_ncc_iirp,
    "mse": negative_mse,
    "mae": negative_mae,
}


def get_similarity(similarity: str | Callable) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Resolve ``"ncc"``, ``"ncc_iirp"``, ``"mse"``, ``"mae"`` (MSE/MAE negated so that higher is better) or a callable."""
    if callable(similarity):
        return similarity
    try:
        return _SIMILARITIES[similarity.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unknown similarity {similarity!r}; choose one of {sorted(_SIMILARITIES)} or pass a callable.") from None
