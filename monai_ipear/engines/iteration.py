"""Registration iterations for MONAI's ``SupervisedTrainer`` / ``SupervisedEvaluator``.

MONAI's default supervised iteration computes ``loss(network(inputs), targets)``; registration needs the
moving image warped by the predicted field before the loss (``loss(warped, fixed, ddf)``) and, at evaluation,
the moving label warped with nearest-neighbour sampling. These callables are passed as ``iteration_update``.
Warping uses :class:`monai.networks.blocks.Warp`.
"""

from __future__ import annotations

import time

import torch
from monai.data import MetaTensor
from monai.networks.blocks import Warp
from monai.utils import CommonKeys as Keys

from ..booleans import as_bool
from ..networks.blocks.fields import FieldComposer
from ..runtime import reduced_precision
from .outputs import check_finite

__all__ = ["RegistrationTrainIteration", "RegistrationEvalIteration"]


def _plain(x: torch.Tensor, device: torch.device | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    x = x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)
    return x.to(device=device, dtype=dtype)


class _PairIteration:
    def __init__(
        self,
        moving_key: str = "moving_image",
        fixed_key: str = "fixed_image",
        moving_label_key: str = "moving_label",
        fixed_label_key: str = "fixed_label",
        padding_mode: str = "zeros",
    ) -> None:
        self.moving_key, self.fixed_key = moving_key, fixed_key
        self.moving_label_key, self.fixed_label_key = moving_label_key, fixed_label_key
        self.fields = FieldComposer(padding_mode)
        self.label_warp = Warp(mode="nearest", padding_mode=padding_mode)

    def _pair(self, engine, batchdata: dict) -> tuple[torch.Tensor, torch.Tensor]:
        device = getattr(engine.state, "device", None)
        return _plain(batchdata[self.moving_key], device), _plain(batchdata[self.fixed_key], device)

    def _warp(self, image: torch.Tensor, ddf: torch.Tensor, nearest: bool = False) -> torch.Tensor:
        return self.fields.warp(image, ddf, mode="nearest" if nearest else "bilinear")

    def _warp_label(self, label: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
        """Nearest-neighbour warp of a label map in float64 (MONAI ``Warp``): exact for label values up to 2**53,
        where float32 merges values above 2**24 (16777217 -> 16777216)."""
        return self.label_warp(label.double(), ddf.double())


class RegistrationTrainIteration(_PairIteration):
    """One training step: ``ddf = network(moving, fixed)``, ``warped = Warp(moving, ddf)``,
    ``loss = loss_function(warped, fixed, ddf)``, backward, optimiser step.

    Args:
        moving_key, fixed_key: batch keys of the ``(B, C, *spatial)`` images.
        moving_label_key, fixed_label_key: unused in training (kept for symmetry with the evaluation iteration).
        padding_mode: ``Warp`` padding for the moving image.

    The engine's output is a dict: ``image`` (moving), ``label`` (fixed), ``pred`` (warped), ``ddf`` (voxels),
    ``loss`` (detached scalar). Uses ``engine.amp`` (autocast) and ``engine.scaler`` like MONAI's own iteration.
    """

    def __call__(self, engine, batchdata: dict) -> dict:
        moving, fixed = self._pair(engine, batchdata)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=getattr(engine, "optim_set_to_none", False))
        use_amp = bool(getattr(engine, "amp", False)) and getattr(engine, "scaler", None) is not None
        with torch.autocast(device_type=moving.device.type, enabled=use_amp):
            ddf = engine.network(moving, fixed)
            warped = self._warp(moving, ddf.float())
            loss = engine.loss_function(warped, fixed, ddf.float())
        if not torch.isfinite(loss.detach()).all():  # before backward: the weights (and checkpoints) stay finite
            raise FloatingPointError(
                f"non-finite training loss {loss.detach().cpu().tolist()} at epoch {engine.state.epoch}, iteration "
                f"{engine.state.iteration} (ddf finite: {bool(torch.isfinite(ddf).all())}, warped finite: "
                f"{bool(torch.isfinite(warped).all())}, loss terms: {getattr(engine.loss_function, 'last_terms', None)}); "
                f"training stopped before the optimiser step, the weights and "
                f"the last checkpoint are those of the previous iteration."
            )
        if use_amp:
            engine.scaler.scale(loss).backward()
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            loss.backward()
            engine.optimizer.step()
        return {Keys.IMAGE: moving, Keys.LABEL: fixed, Keys.PRED: warped.detach(), "ddf": ddf.detach(),
                Keys.LOSS: loss.detach()}


class RegistrationEvalIteration(_PairIteration):
    """One evaluation / inference step, network in eval mode (iteration controllers such as TCI active).

    The engine's output is a dict of batched tensors: ``moving_image``, ``fixed_image``, ``ddf`` (voxels),
    ``warped_image``, ``iterations`` (``(B, levels)`` from ``network.last_iterations`` when present),
    ``time`` (seconds of the network call per pair; the call runs under
    :func:`~monai_ipear.runtime.reduced_precision` when the engine's ``amp`` is set), with a moving label map
    ``moving_label`` and ``warped_label`` (nearest-neighbour warp), and with a fixed label map too ``fixed_label``. ``pred`` / ``label`` are the warped and fixed
    label maps (the images when there are no labels), so MONAI metric handlers such as ``MeanDice`` work with
    ``from_engine(["pred", "label"])``. The input batch (with its metadata) stays on ``engine.state.batch``.
    """

    def __call__(self, engine, batchdata: dict) -> dict:
        moving, fixed = self._pair(engine, batchdata)
        device = moving.device
        engine.network.eval()
        with torch.no_grad():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            with reduced_precision(device, as_bool(getattr(engine, "amp", False), "amp")):  # may be an override string
                ddf = engine.network(moving, fixed).float()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            out = {self.moving_key: moving, self.fixed_key: fixed, "ddf": ddf, "warped_image": self._warp(moving, ddf)}
            # before any handler writes or scores it: a NaN field (NaN weights) would be written as an all-zero image
            check_finite(ddf, f"the displacement field of {type(engine.network).__name__}")
            check_finite(out["warped_image"], "the warped image")
            iters = getattr(engine.network, "last_iterations", None)
            if iters is not None:
                out["iterations"] = iters.detach().cpu()
            out["time"] = torch.full((moving.shape[0],), elapsed / moving.shape[0])
            if self.moving_label_key in batchdata:
                ml = _plain(batchdata[self.moving_label_key], device, torch.float64)
                out[self.moving_label_key] = ml
                out["warped_label"] = self._warp_label(ml, ddf)
            if "warped_label" in out and self.fixed_label_key in batchdata:
                out[self.fixed_label_key] = _plain(batchdata[self.fixed_label_key], device, torch.float64)
                out[Keys.PRED], out[Keys.LABEL] = out["warped_label"], out[self.fixed_label_key]
            else:
                out[Keys.PRED], out[Keys.LABEL] = out["warped_image"], fixed
        return out
