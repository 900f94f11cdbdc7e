"""Training recipe of the benchmark: every learned method with the same loss, optimiser, data and time budget.

Recipe (iPEAR / IIRP-Net practice, bundle defaults): loss LNCC (window 9) + 1.0 x diffusion
(:class:`~monai_ipear.losses.RegistrationLoss`), Adam, batch 1, all ordered pairs of the training split,
shuffled every epoch, MONAI :class:`~monai.engines.SupervisedTrainer` with the bundle's
:class:`~monai_ipear.engines.RegistrationTrainIteration`; training stops after ``minutes`` of wall time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from ignite.engine import Events
from monai.data import CacheDataset, DataLoader
from monai.engines import SupervisedTrainer

from ..data.transforms import registration_pair_transforms
from ..engines.iteration import RegistrationTrainIteration
from ..losses import RegistrationLoss

__all__ = ["train_with_budget"]


def train_with_budget(
    network: torch.nn.Module,
    pairs: Sequence[dict],
    minutes: float | None,
    lr: float = 1e-3,
    spatial_dims: int = 3,
    smooth_weight: float = 1.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    max_steps: int | None = None,
    log=print,
) -> dict:
    """Train ``network`` in place on ``pairs`` (dicts of image/label paths, as from
    :func:`~monai_ipear.data.load_registration_pairs`) for ``minutes`` of wall time (or ``max_steps``).

    Returns:
        ``{"budget_min", "wall_min", "steps", "epochs", "final_loss", "losses"}``.
    """
    torch.manual_seed(seed)
    keys = ["moving_image", "fixed_image"]
    data = [{k: p[k] for k in keys} for p in pairs]
    dataset = CacheDataset(data, registration_pair_transforms(keys, []), progress=False)
    loader = DataLoader(dataset, batch_size=1, shuffle=True, num_workers=0,
                        generator=torch.Generator().manual_seed(seed))
    network = network.to(device)
    trainer = SupervisedTrainer(
        device=torch.device(device), max_epochs=10**6, train_data_loader=loader, network=network,
        optimizer=torch.optim.Adam(network.parameters(), lr=lr),
        loss_function=RegistrationLoss(spatial_dims, smooth_weight=smooth_weight),
        iteration_update=RegistrationTrainIteration(), amp=False,
    )
    losses: list[float] = []
    start = time.perf_counter()

    @trainer.on(Events.ITERATION_COMPLETED)
    def _budget(engine) -> None:
        losses.append(float(engine.state.output["loss"]))
        elapsed = time.perf_counter() - start
        if engine.state.iteration % 20 == 0:
            log(f"step {engine.state.iteration}: loss {losses[-1]:.4f}, {elapsed / 60:.1f} min")
        if (minutes is not None and elapsed >= 60 * minutes) or (max_steps is not None and engine.state.iteration >= max_steps):
            engine.terminate()

    trainer.run()
    wall = time.perf_counter() - start
    network.eval()
    tail = losses[-10:]
    return {"budget_min": minutes, "max_steps": max_steps, "wall_min": wall / 60, "steps": len(losses), "epochs": trainer.state.epoch,
            "final_loss": sum(tail) / max(len(tail), 1), "losses": losses}
