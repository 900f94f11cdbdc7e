"""The interface shared by iteration controllers, the simple controllers, and the per-sample refinement loop.

A controller decides, for one sample at one pyramid level, how many residual updates to compose.
:meth:`IterationController.session` opens a per-sample session; after each update ``k`` the loop calls
``session.step(s_k)`` with the similarity of the field after that update (``None`` when the controller
does not need similarities) and gets a :class:`Decision`: keep the update or discard it, stop or go on.
Decisions are per sample, so in a batch every sample stops on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .samples import select_samples
from .similarity import get_similarity

__all__ = [
    "Decision",
    "IterationController",
    "ControllerSession",
    "SinglePass",
    "FixedIterations",
    "controlled_refinement",
    "simulate_controller",
    "select_samples",
]


@dataclass(frozen=True)
class Decision:
    """``accept``: compose this update into the field; ``stop``: no further update at this level."""

    accept: bool
    stop: bool


class ControllerSession:
    """Per-sample, per-level state of a controller. ``skip`` means: stop before the first update."""

    skip: bool = False

    def step(self, similarity: float | None) -> Decision:  # pragma: no cover - interface
        raise NotImplementedError


class IterationController:
    """Base class. Subclasses set ``k_max``, ``needs_similarity``, ``needs_initial_similarity`` and ``similarity``."""

    k_max: int = 1
    needs_similarity: bool = False
    needs_initial_similarity: bool = False
    similarity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = staticmethod(get_similarity("ncc"))

    def session(self, initial_similarity: float | None, coarsest: bool) -> ControllerSession:
        """Open a session for one sample at one level.

        Args:
            initial_similarity: similarity of the field the level starts from (``None`` if not computed).
            coarsest: True at the first (coarsest) decoded level, where the field starts at identity.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "similarity")
        return f"{type(self).__name__}({args})"


class _CountSession(ControllerSession):
    def __init__(self, k_max: int) -> None:
        self.k, self.k_max = 0, k_max

    def step(self, similarity: float | None) -> Decision:
        self.k += 1
        return Decision(accept=True, stop=self.k >= self.k_max)


class FixedIterations(IterationController):
    """Always ``k`` updates per level."""

    def __init__(self, k: int = 3) -> None:
        if int(k) < 1:
            raise ValueError(f"FixedIterations needs k >= 1, got {k}.")
        self.k_max = int(k)

    def session(self, initial_similarity=None, coarsest=False) -> ControllerSession:
        return _CountSession(self.k_max)


class SinglePass(FixedIterations):
    """One update per level (RP-Net, and every network during training)."""

    def __init__(self) -> None:
        super().__init__(1)

    def __repr__(self) -> str:
        return "SinglePass()"


def simulate_controller(
    controller: IterationController,
    similarities: Sequence[float],
    initial_similarity: float | None = None,
    coarsest: bool = False,
) -> tuple[int, int]:
    """Run ``controller`` on a scripted similarity sequence ``s_1, s_2, ...`` (``s_k`` after update ``k``).

    Returns ``(updates_run, updates_kept)``: how many updates the controller asked for and how many it kept.
    Raises ``ValueError`` if the script ends before the controller stops.
    """
    session = controller.session(initial_similarity, coarsest)
    if session.skip:
        return 0, 0
    kept = 0
    for k, s in enumerate(similarities, start=1):
        decision = session.step(s)
        kept += decision.accept
        if decision.stop:
            return k, kept
    raise ValueError(f"the controller did not stop within the {len(similarities)} scripted similarities.")


def controlled_refinement(
    controller: IterationController,
    ddf: torch.Tensor,
    update: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    evaluate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None,
    coarsest: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Refine ``ddf`` by repeated updates under ``controller``, each sample deciding on its own.

    Args:
        controller: the iteration controller.
        ddf: ``(B, spatial_dims, *spatial)`` field to start from.
        update: ``update(ddf_subset, index, k) -> new ddf_subset``: one decoder pass and composition for the
            samples ``index`` (a ``(b,)`` long tensor) at iteration ``k`` (1-based).
        evaluate: ``evaluate(ddf_subset, index) -> (b,)`` similarity of those samples under their field.
            Required when ``controller.needs_similarity``.
        coarsest: passed to the controller (IterStop's faithful mode differs at the coarsest level).

    Returns:
        ``(ddf, kept, trace)``: the refined field; ``(B,)`` long count of updates kept per sample; and
        ``(B, k_max + 1)`` similarity trace, column ``k`` = similarity after update ``k`` (column 0: the
        starting field), NaN where not computed.

    Only the samples still iterating are passed to ``update``; the others keep their field unchanged, so a
    batch gives the same fields and counts as its samples one by one. An update whose similarity is not finite
    is discarded and stops its sample, whatever the controller.
    """
    batch = ddf.shape[0]
    needs_sim = controller.needs_similarity
    if needs_sim and evaluate is None:
        raise ValueError(f"{controller!r} needs similarities but no evaluate function was given.")
    trace = torch.full((batch, controller.k_max + 1), float("nan"))
    s0 = [None] * batch
    if needs_sim and controller.needs_initial_similarity:
        with torch.no_grad():
            s0_t = evaluate(ddf, torch.arange(batch, device=ddf.device)).detach().float().cpu()
        trace[:, 0] = s0_t
        s0 = s0_t.tolist()
    sessions = [controller.session(s0[b], coarsest) for b in range(batch)]
    active = [not s.skip for s in sessions]
    kept = torch.zeros(batch, dtype=torch.long)
    k = 0
    while any(active):
        k += 1
        active_samples = [b for b in range(batch) if active[b]]  # a Python list: no tensor->list sync (torch.export)
        index = torch.tensor(active_samples, device=ddf.device)
        proposal = update(select_samples(ddf, index), index, k)
        sims = [None] * len(index)
        if needs_sim:
            with torch.no_grad():
                s_t = evaluate(proposal, index).detach().float().cpu()
            sims = s_t.tolist()
        accepted: list[int] = []
        for j, b in enumerate(active_samples):
            if sims[j] is not None:
                trace[b, k] = sims[j]
            if sims[j] is not None and not math.isfinite(sims[j]):
                # a non-finite similarity (e.g. a NaN produced inside the network): keep the last good field
                decision = Decision(accept=False, stop=True)
            else:
                decision = sessions[b].step(sims[j])
            if decision.accept:
                accepted.append(j)
                kept[b] += 1
            if decision.stop or k >= controller.k_max:
                active[b] = False
        if accepted:
            if len(accepted) == batch:  # every sample updated: the proposal is the new field (no copy)
                ddf = proposal.to(ddf.dtype)
            else:
                sel = torch.tensor(accepted, device=ddf.device)
                ddf = ddf.index_copy(0, index[sel], select_samples(proposal, sel).to(ddf.dtype))
    return ddf, kept, trace
