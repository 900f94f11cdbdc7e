"""Global image similarities used by iteration controllers (higher is better, one value per sample)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .samples import select_samples

__all__ = ["global_ncc", "global_ncc_iirp", "negative_mse", "negative_mae", "get_similarity", "PreparedSimilarity"]


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


class PreparedSimilarity:
    """``similarity(warped, fixed)`` against one fixed batch, with what depends on the fixed images alone computed once.

    A pyramid evaluates the similarity after every update against the same fixed images; for :func:`global_ncc`
    (and :func:`global_ncc_iirp`) the centred fixed images and their variance are kept, so each call only centres
    the warped images: the same operations on the same values as the plain function (identical results). Other
    similarities are called as they are.

    Args:
        similarity: a function ``(warped, fixed) -> (B,)``.
        fixed: ``(B, C, *spatial)``.

    ``__call__(warped, index)``: ``warped`` ``(b, C, *spatial)`` for the samples ``index`` (a ``(b,)`` long tensor of
    increasing batch positions) -> ``(b,)``.
    """

    def __init__(self, similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], fixed: torch.Tensor, eps: float = 1e-8):
        self.similarity, self.fixed, self.eps = similarity, fixed, eps
        self.kind = {global_ncc: "ncc", global_ncc_iirp: "ncc_iirp"}.get(similarity)
        if self.kind is not None:
            b = fixed.detach().float().flatten(1)
            if self.kind == "ncc":
                self.centred = b - b.mean(1, keepdim=True)
                self.spread = self.centred.square().mean(1)
            else:
                self.centred = b - b.mean(1, keepdim=True)
                self.spread = b.std(1)

    def __call__(self, warped: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        if self.kind is None:
            return self.similarity(warped, select_samples(self.fixed, index))
        a = warped.float().flatten(1)
        b, spread = select_samples(self.centred, index), select_samples(self.spread, index)
        if self.kind == "ncc":
            a = a - a.mean(1, keepdim=True)
            cov = (a * b).mean(1)
            denom = (a.square().mean(1) * spread).sqrt()
        else:
            cov = ((a - a.mean(1, keepdim=True)) * b).mean(1)
            denom = a.std(1) * spread
        return torch.where(denom > self.eps, cov / denom.clamp_min(self.eps), torch.zeros_like(cov))
