"""Level-by-level training (SM-GICNet) as an ignite handler for MONAI's ``SupervisedTrainer``."""

from __future__ import annotations

from collections.abc import Sequence

from ignite.engine import Engine, Events

__all__ = ["LevelwiseTraining"]


class LevelwiseTraining:
    """Train a multi-level network level by level, coarsest first, freezing the levels already trained.

    Stage ``k`` (1-based) lasts ``epochs[k - 1]`` epochs; at its first epoch ``network.set_stage(k, freeze)`` is
    called, which activates the coarsest ``k`` levels and, with ``freeze``, leaves only the newest level trainable
    (SM-GICNet's paper: 4 / 4 / 6 / 6 epochs for 4 levels). The published SM-GICNet code unfreezes the earlier levels
    after ``freeze_step`` (3000) iterations of each stage: ``unfreeze_after_iterations`` reproduces that; ``None``
    (default) keeps them frozen for the whole stage. Epochs beyond the sum stay in the last stage.

    Args:
        network: a module with ``set_stage(active_levels, freeze_coarser)`` (e.g. :class:`~monai_ipear.SMGICNet`).
        epochs: epochs per stage, coarsest level first.
        unfreeze_after_iterations: iterations into each stage after which all active levels train.
    """

    def __init__(self, network, epochs: Sequence[int] = (4, 4, 6, 6), unfreeze_after_iterations: int | None = None):
        self.network = network
        self.epochs = [int(e) for e in epochs]
        if any(e < 1 for e in self.epochs):
            raise ValueError(f"every stage needs at least one epoch, got {self.epochs}.")
        self.unfreeze_after = unfreeze_after_iterations
        self.stage = 0
        self._stage_start_iteration = 0

    def stage_of_epoch(self, epoch: int) -> int:
        """1-based stage of the 1-based ``epoch``."""
        total = 0
        for k, e in enumerate(self.epochs, 1):
            total += e
            if epoch <= total:
                return k
        return len(self.epochs)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)

    def epoch_started(self, engine: Engine) -> None:
        stage = self.stage_of_epoch(engine.state.epoch)
        if stage != self.stage:
            self.stage = stage
            self._stage_start_iteration = engine.state.iteration
            self.network.set_stage(stage, freeze_coarser=True)

    def iteration_completed(self, engine: Engine) -> None:
        if self.unfreeze_after is not None and engine.state.iteration - self._stage_start_iteration == self.unfreeze_after:
            self.network.set_stage(self.stage, freeze_coarser=False)
