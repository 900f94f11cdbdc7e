"""The batch subsets that :func:`~monai_ipear.controllers.controlled_refinement` passes to its callbacks."""

from __future__ import annotations

import torch

__all__ = ["select_samples"]


def select_samples(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[index]`` along the batch axis, without a copy when ``index`` selects every sample.

    ``index`` holds increasing, distinct sample indices (as the refinement loop builds them), so as many indices as
    samples means all of them in order and ``t`` itself is returned. A copy of every full-resolution feature map per
    update was 150 MB of iPEAR's peak memory at 160x192x160 and a full pass over it. Callers must not write into
    the result.
    """
    return t if index.numel() == t.shape[0] else t.index_select(0, index)
