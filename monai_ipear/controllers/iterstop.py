"""IterStop, IIRP-Net's single-stage iteration control.

Paper rule (default): after each update, if the similarity gained over the previous state is below
``delta`` the update is discarded and the level stops; at most ``k_max`` updates. The first update is
compared with the field the level starts from (identity at the coarsest level).

``faithful=True`` reproduces the published code's decisions (Torbjorn1997/IIRP-Net, ``IIRPNet.forward``):

- coarsest level: as the paper rule, but the first update is compared with a similarity of 0;
- finer levels: the check runs *before* each update, so the update that fails to improve is kept, the
  starting field is compared with 0 (failing stops before any update), and the ``k_max``-th update is
  never checked;
- similarity: the published NCC with unbiased stds (:func:`global_ncc_iirp`).
"""

from __future__ import annotations

from collections.abc import Callable

from ..booleans import as_bool
from .base import ControllerSession, Decision, IterationController
from .similarity import get_similarity

__all__ = ["IterStop"]


class _PaperSession(ControllerSession):
    def __init__(self, delta: float, k_max: int, previous: float) -> None:
        self.delta, self.k_max, self.previous, self.k = delta, k_max, previous, 0

    def step(self, similarity: float | None) -> Decision:
        self.k += 1
        if similarity < self.previous + self.delta:  # the published form of "gain below delta"
            return Decision(accept=False, stop=True)
        self.previous = similarity
        return Decision(accept=True, stop=self.k >= self.k_max)


class _FaithfulFinerSession(ControllerSession):
    def __init__(self, delta: float, k_max: int, initial: float) -> None:
        self.delta, self.k_max, self.previous, self.k = delta, k_max, initial, 0
        self.skip = initial < 0.0 + delta

    def step(self, similarity: float | None) -> Decision:
        self.k += 1
        if self.k >= self.k_max:
            return Decision(accept=True, stop=True)  # published code: the last update is never checked
        stop = similarity < self.previous + self.delta  # checked before the next update: this one is kept
        self.previous = similarity
        return Decision(accept=True, stop=stop)


class IterStop(IterationController):
    """IIRP-Net's IterStop.

    Args:
        delta: minimum similarity gain for an update to count as an improvement.
        k_max: maximum updates per level.
        faithful: reproduce the published code's decisions instead of the paper's rule.
        similarity: default ``"ncc"`` (``"ncc_iirp"`` when ``faithful``), ``"mse"``, ``"mae"`` or a callable.
    """

    needs_similarity = True

    def __init__(
        self, delta: float = 0.005, k_max: int = 10, faithful: bool = False, similarity: str | Callable | None = None
    ) -> None:
        if int(k_max) < 1:
            raise ValueError(f"IterStop needs k_max >= 1, got {k_max}.")
        self.delta = float(delta)
        self.k_max = int(k_max)
        self.faithful = as_bool(faithful, "faithful")
        similarity = similarity or ("ncc_iirp" if faithful else "ncc")
        self.similarity_name = similarity if isinstance(similarity, str) else getattr(similarity, "__name__", "custom")
        self.similarity = get_similarity(similarity)

    @property
    def needs_initial_similarity(self) -> bool:  # type: ignore[override]
        return True

    def session(self, initial_similarity: float | None, coarsest: bool = False) -> ControllerSession:
        if self.faithful:
            if coarsest:
                return _PaperSession(self.delta, self.k_max, 0.0)
            if initial_similarity is None:
                raise ValueError("faithful IterStop needs the similarity of the starting field at finer levels.")
            return _FaithfulFinerSession(self.delta, self.k_max, initial_similarity)
        if initial_similarity is None:
            raise ValueError("IterStop needs the similarity of the starting field.")
        return _PaperSession(self.delta, self.k_max, initial_similarity)
