"""TCI, iPEAR's dual-stage Threshold-Controlled Iteration strategy.

At every level, after each update ``k`` the similarity ``s^k`` (default: global NCC between the fixed image
and the moving image warped by the current field at full resolution) enters the window ``W`` of the last
``t`` similarities (:class:`TCIWindow`). Once ``W`` is full, the stages are checked in order:

- stability stage (:func:`stability_reached`): ``std(W) <= delta_s`` (population std);
- convergence stage (:func:`convergence_reached`): ``s^k - s^(k-1) <= delta_c``.

Default (``latched=False``), Algorithm 1 of the paper: both stages are re-checked at every iteration, and the
level stops (keeping the current field) at the first iteration where the window is full and every stage of
``order`` holds; otherwise iterate up to ``k_max`` updates. Under this reading the two two-stage orders decide
alike (a conjunction has no order).

``latched=True`` is the sequential reading of the paper's text: a stage, once passed, stays passed and is not
re-checked; the next stage is checked in the same iteration; passing the last stage stops the level. Only this
reading makes the paper's Table 6 orderings ``"stability_convergence"`` and ``"convergence_stability"`` differ.
It stops no later than Algorithm 1 (on about 1.6 % of similarity traces it stops earlier).

``order`` selects the paper's Table 6 variants: ``"stability_convergence"`` (default, iPEAR),
``"convergence_stability"``, ``"stability"`` (stability only), ``"convergence"`` (convergence only).
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable

from ..booleans import as_bool
from .base import ControllerSession, Decision, IterationController
from .similarity import get_similarity

__all__ = ["TCI", "TCIWindow", "stability_reached", "convergence_reached", "TCI_ORDERS"]

TCI_ORDERS = {
    "stability_convergence": ("stability", "convergence"),
    "convergence_stability": ("convergence", "stability"),
    "stability": ("stability",),
    "convergence": ("convergence",),
}


class TCIWindow:
    """The window ``W_l`` of the last ``size`` similarities of one sample at one level."""

    def __init__(self, size: int) -> None:
        self.values: deque[float] = deque(maxlen=size)
        self.previous: float | None = None  # s^(k-1), kept even when the window holds a single value

    def push(self, s: float) -> None:
        if self.values:
            self.previous = self.values[-1]
        self.values.append(float(s))

    @property
    def full(self) -> bool:
        return len(self.values) == self.values.maxlen

    @property
    def latest(self) -> float:
        return self.values[-1]

    def std(self) -> float:
        """Population standard deviation of the window (the paper does not say; see docs/architecture.md)."""
        return statistics.pstdev(self.values) if len(self.values) > 1 else 0.0


def stability_reached(window: TCIWindow, delta_s: float) -> bool:
    """Stability stage: the similarities in the window vary by at most ``delta_s`` (population std)."""
    return window.std() <= delta_s


def convergence_reached(window: TCIWindow, delta_c: float) -> bool:
    """Convergence stage: the last update gained at most ``delta_c`` (a drop counts as converged)."""
    return window.previous is not None and window.latest - window.previous <= delta_c


class _TCISession(ControllerSession):
    def __init__(self, tci: "TCI") -> None:
        self.tci = tci
        self.window = TCIWindow(tci.window)
        self.stage = 0
        self.k = 0

    def step(self, similarity: float | None) -> Decision:
        if similarity is None:
            raise ValueError("TCI needs a similarity after every update.")
        self.k += 1
        self.window.push(similarity)
        stages = TCI_ORDERS[self.tci.order]
        if self.window.full:
            if self.tci.latched:
                while self.stage < len(stages) and self._passes(stages[self.stage]):
                    self.stage += 1
            else:  # Algorithm 1: every stage re-checked at every iteration
                self.stage = len(stages) if all(self._passes(stage) for stage in stages) else 0
        return Decision(accept=True, stop=self.stage == len(stages) or self.k >= self.tci.k_max)

    def _passes(self, stage: str) -> bool:
        if stage == "stability":
            return stability_reached(self.window, self.tci.delta_s)
        return convergence_reached(self.window, self.tci.delta_c)


class TCI(IterationController):
    """Threshold-Controlled Iteration (iPEAR).

    Args:
        delta_s: stability threshold on the window's population std.
        delta_c: convergence threshold on the last gain ``s^k - s^(k-1)``.
        window: window size ``t`` (at least ``t`` updates run per level).
        k_max: maximum updates per level.
        order: one of ``TCI_ORDERS`` (paper Table 6), default stability then convergence.
        latched: ``False`` (default): Algorithm 1, both stages re-checked every iteration; ``True``: the sequential
            reading (a passed stage stays passed), needed for the Table 6 two-stage orderings to differ.
        similarity: ``"ncc"`` (default), ``"mse"``, ``"mae"`` (paper Table I; MSE/MAE negated) or a callable
            ``(warped_moving, fixed) -> (B,)``.
    """

    needs_similarity = True
    needs_initial_similarity = False

    def __init__(
        self,
        delta_s: float = 0.005,
        delta_c: float = 0.005,
        window: int = 3,
        k_max: int = 10,
        order: str = "stability_convergence",
        similarity: str | Callable = "ncc",
        latched: bool = False,
    ) -> None:
        if order not in TCI_ORDERS:
            raise ValueError(f"unknown TCI order {order!r}; choose one of {sorted(TCI_ORDERS)}.")
        if int(window) < 1 or int(k_max) < 1:
            raise ValueError(f"TCI needs window >= 1 and k_max >= 1, got window={window}, k_max={k_max}.")
        if delta_s < 0 or delta_c < 0:
            raise ValueError(f"TCI thresholds must be >= 0, got delta_s={delta_s}, delta_c={delta_c}.")
        self.delta_s = float(delta_s)
        self.delta_c = float(delta_c)
        self.window = int(window)
        self.k_max = int(k_max)
        self.order = order
        self.latched = as_bool(latched, "latched")
        self.similarity_name = similarity if isinstance(similarity, str) else getattr(similarity, "__name__", "custom")
        self.similarity = get_similarity(similarity)

    def session(self, initial_similarity=None, coarsest=False) -> ControllerSession:
        return _TCISession(self)
