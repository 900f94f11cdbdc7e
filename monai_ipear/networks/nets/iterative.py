"""Iterative refinement of any one-shot registration network under an iteration controller (e.g. TCI)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ...booleans import as_bool
from ...controllers import IterationController, SinglePass, controlled_refinement, select_samples
from ..blocks.fields import FieldComposer
from ..utils import check_registration_pair

__all__ = ["IterativeRegistration"]


class IterativeRegistration(nn.Module):
    """Refine a registration network's field by recursive composition, as many times as ``controller`` decides.

    Update ``k`` warps the moving image by the current field ``u``, runs ``net(warped moving, fixed)`` to get a
    residual ``delta`` and composes it, ``u <- u(x + delta) + delta``; the first update is the network's
    one-shot prediction. The controller judges the moving image warped by the proposed field against the
    fixed image, per sample. This lets :class:`~monai_ipear.controllers.TCI` (or IterStop, FixedIterations)
    drive networks that are not pyramids, such as MONAI's ``VoxelMorph`` or ``LocalNet``.

    Args:
        net: maps ``(moving, fixed)`` ``(B, C, *spatial)`` each to a DDF ``(B, spatial_dims, *spatial)`` in voxels
            (pull convention, MONAI's). A tuple/list output is accepted; ``output_index`` selects the DDF
            (default: the last element, which is the DDF for MONAI's ``VoxelMorph``, returning ``(warped, ddf)``).
        controller: default :class:`~monai_ipear.controllers.SinglePass` (the bare network).
        spatial_dims: 2 or 3 (default: ``net.spatial_dims`` or 3).
        in_channels: image channels (checked on input).
        input_mode: ``"pair"`` calls ``net(moving, fixed)``; ``"concat"`` calls ``net(cat([moving, fixed], 1))``
            (MONAI's ``LocalNet``, ``GlobalNet``, ``RegUNet``).
        output_index: index of the DDF in a tuple/list output.
        padding_mode: ``Warp`` padding for the moving image and for composition.
        unroll_training: in training mode iterate under the controller too (default: one pass, the bare network).

    ``forward(moving, fixed)`` -> DDF ``(B, spatial_dims, *spatial)``. After each call ``last_iterations`` is a
    ``(B, 1)`` long tensor of updates kept, and ``last_similarities`` a one-element list with the
    ``(B, k_max + 1)`` similarity trace (column 0: identity; NaN: not computed).
    """

    def __init__(
        self,
        net: nn.Module,
        controller: IterationController | None = None,
        spatial_dims: int | None = None,
        in_channels: int = 1,
        input_mode: str = "pair",
        output_index: int = -1,
        padding_mode: str = "zeros",
        unroll_training: bool = False,
    ) -> None:
        super().__init__()
        if input_mode not in ("pair", "concat"):
            raise ValueError(f"input_mode must be 'pair' or 'concat', got {input_mode!r}.")
        self.net = net
        self.controller = controller if controller is not None else SinglePass()
        self.spatial_dims = int(spatial_dims or getattr(net, "spatial_dims", 3))
        self.in_channels = int(in_channels)
        self.input_mode = input_mode
        self.output_index = output_index
        self.fields = FieldComposer(padding_mode)
        self.unroll_training = as_bool(unroll_training, "unroll_training")
        self.levels = 1
        self.last_iterations: torch.Tensor | None = None
        self.last_similarities: list[torch.Tensor] = []

    def predict(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """One pass of the wrapped network: ``(B, C, *spatial)`` pair -> DDF ``(B, spatial_dims, *spatial)``."""
        out = self.net(torch.cat([moving, fixed], dim=1)) if self.input_mode == "concat" else self.net(moving, fixed)
        if isinstance(out, (tuple, list)):
            out = out[self.output_index]
        if out.shape[0] != moving.shape[0] or out.shape[1] != self.spatial_dims or out.shape[2:] != moving.shape[2:]:
            raise ValueError(
                f"the wrapped network must return a DDF of shape {(moving.shape[0], self.spatial_dims, *moving.shape[2:])}, "
                f"got {tuple(out.shape)}."
            )
        return out

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        check_registration_pair(moving, fixed, self.spatial_dims, self.in_channels)
        batch = moving.shape[0]
        controller = SinglePass() if self.training and not self.unroll_training else self.controller

        def update(u, index, k):
            if k == 1:  # the identity start: the first update is the network's one-shot field
                return self.fields.compose(None, self.predict(select_samples(moving, index), select_samples(fixed, index)))
            return self.fields.compose(u, self.predict(self.fields.warp(select_samples(moving, index), u), select_samples(fixed, index)))

        moving_warp = self.fields.prepare_warp(moving) if controller.needs_similarity else None

        def evaluate(u, index):
            return controller.similarity(moving_warp(u, index), select_samples(fixed, index))

        ddf = torch.zeros(batch, self.spatial_dims, *moving.shape[2:], device=moving.device, dtype=torch.float32)
        ddf, kept, trace = controlled_refinement(controller, ddf, update, evaluate, coarsest=True)
        self.last_iterations = kept.view(batch, 1)
        self.last_similarities = [trace]
        return ddf
