"""Iteration controllers from a short text, for command-line options and configs."""

from __future__ import annotations

from .base import FixedIterations, IterationController, SinglePass
from .tci import TCI

__all__ = ["controller_from_spec"]


def controller_from_spec(spec: str | int) -> IterationController:
    """``"tci"`` -> :class:`~monai_ipear.controllers.TCI` with the paper's defaults; a whole number ``k >= 1`` (int or
    text) -> ``k`` updates at every level (:class:`SinglePass` for 1, else :class:`FixedIterations`).

    Raises:
        ValueError: anything else, naming the accepted values.
    """
    text = str(spec).strip().lower()
    if text == "tci":
        return TCI()
    if isinstance(spec, bool) or not text.isdigit() or int(text) < 1:
        raise ValueError(f"iterations must be 'tci' or a whole number of updates per level >= 1, got {spec!r}.")
    return SinglePass() if int(text) == 1 else FixedIterations(int(text))
