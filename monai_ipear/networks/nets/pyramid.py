"""The generic coarse-to-fine pyramid registration network (iPEAR's Algorithm 1)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ...booleans import as_bool
from ...controllers import IterationController, SinglePass, controlled_refinement, select_samples
from ...controllers.similarity import PreparedSimilarity
from ..blocks.fields import FieldComposer, crop_to, pad_to_divisible, resize_ddf
from ..utils import channels_last_format, check_registration_pair

__all__ = ["PyramidRegistrationNet", "use_reference_paths", "use_channels_last"]


def use_channels_last(module: nn.Module, enabled: bool = True) -> nn.Module:
    """Store the weights of every 2D/3D convolution in ``module`` channels-last (or back to contiguous).

    A convolution whose weight is channels-last runs channels-last whatever the layout of its input (PyTorch's
    rule for oneDNN and cuDNN) and returns a channels-last map, which the following element-wise ops keep. On the
    development CPU this makes the full-resolution decoder convolutions 1.3-3x faster (a 16->16 channel 3x3x3
    convolution at 160x192x160: 0.53 s -> 0.30 s; FARM's 24->3 output convolution: 0.88 s -> 0.30 s). Values are
    those of the contiguous layout up to float rounding; ``state_dict`` keys and shapes do not change. Returns
    ``module``.
    """
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd) and m.weight.dim() in (4, 5):
            fmt = torch.contiguous_format
            if enabled:
                fmt = channels_last_format(m.weight.dim())
            m.weight.data = m.weight.data.contiguous(memory_format=fmt)
    return module


def use_reference_paths(module: nn.Module, reference: bool = True) -> nn.Module:
    """Switch every fast path inside ``module`` to its reference implementation (or back): neighborhood attention
    by gathering (``implementation="gather"``), warps by MONAI's ``Warp`` (``FieldComposer.fast = False``), FARM's
    few-output convolutions (and the residual decoder's head, ``ResidualFlowEstimator.fast = False``) as plain
    convolutions and its training without the layout changes (``FARM.fast = False``),
    contiguous decoder weights (:func:`use_channels_last`) and plain (channels-first) training of the NA encoder's
    conv blocks (``ConvGELUBlock.fast = False``).

    Both compute the same function (tests check fields within 1e-4 voxels and equal update counts); the reference
    paths exist to prove it and to measure the speed-up. Returns ``module``.
    """
    from ..blocks.encoders import ConvGELUBlock
    from ..blocks.farm import FARM
    from ..blocks.fields import FieldComposer
    from ..blocks.flow_estimator import ResidualFlowEstimator
    from ..blocks.neighborhood_attention import NeighborhoodAttention

    for m in module.modules():
        if isinstance(m, NeighborhoodAttention):
            m.implementation = "gather" if reference else "shifted"
        elif isinstance(m, FieldComposer):
            m.fast = not reference
        elif isinstance(m, (FARM, ResidualFlowEstimator)):
            m.fast = not reference
        elif isinstance(m, ConvGELUBlock):
            m.fast = not reference
        elif isinstance(m, PyramidRegistrationNet):
            use_channels_last(m.decoders, not reference)
    return module


class PyramidRegistrationNet(nn.Module):
    """Encoder + one decoder per level + iteration control, decoded from the coarsest level to level 1.

    At level ``l`` and update ``k`` the moving features are warped by the current field (the raw features at
    the coarsest level's first update), the level's decoder predicts a residual field from
    ``(warped moving features, fixed features)``, and the residual is composed onto the field
    (``u <- u(x + delta) + delta``). The level's controller decides per sample how many updates to keep,
    judging the moving image warped at full resolution against the fixed image. Between levels the field is
    upsampled x2 (values x2).

    Args:
        encoder: weight-shared encoder returning per-level features, finest first; must expose
            ``out_channels`` (per level) and ``in_channels``; ``spatial_dims`` is read from it when present.
        decoders: one module per level, finest (level 1) first; ``decoder(moving_feat, fixed_feat)`` returns
            ``(B, spatial_dims, *level_spatial)``.
        controller: one :class:`~monai_ipear.controllers.IterationController` for all levels, or one per
            level (finest first). Default :class:`~monai_ipear.controllers.SinglePass`.
        spatial_dims: 2 or 3 (default: ``encoder.spatial_dims``).
        padding_mode: ``Warp`` padding for features, images and composition (``"zeros"`` as IIRP-Net).
        unroll_training: in training mode, iterate under the controllers (gradients through every update)
            instead of one pass per level.

    The controllers judge similarities on the images' own extent: the zero padding to a multiple of
    ``2 ** (levels - 1)`` is cropped off the warped and the fixed image first.

    ``forward(moving, fixed)``: ``(B, C, *spatial)`` each -> DDF ``(B, spatial_dims, *spatial)`` in voxels,
    pull convention. Sizes not divisible by ``2 ** (levels - 1)`` are zero-padded at the far end and the field
    cropped back. After each call ``last_iterations`` is a ``(B, levels)`` long tensor of updates kept per
    level (level 1 first) and ``last_similarities`` a list (level 1 first) of ``(B, k_max + 1)`` similarity
    traces (column ``k``: after update ``k``, column 0: the field the level started from; NaN: not computed).
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoders: Sequence[nn.Module],
        controller: IterationController | Sequence[IterationController] | None = None,
        spatial_dims: int | None = None,
        padding_mode: str = "zeros",
        unroll_training: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoders = nn.ModuleList(decoders)
        self.levels = len(self.decoders)
        self.spatial_dims = int(spatial_dims or getattr(encoder, "spatial_dims", 3))
        self.in_channels = int(getattr(encoder, "in_channels", 1))
        enc_levels = len(getattr(encoder, "out_channels", decoders))
        if enc_levels != self.levels:
            raise ValueError(f"the encoder has {enc_levels} levels but {self.levels} decoders were given.")
        self.controller = controller if controller is not None else SinglePass()
        self.fields = FieldComposer(padding_mode)
        self.unroll_training = as_bool(unroll_training, "unroll_training")
        self.last_iterations: torch.Tensor | None = None
        self.last_similarities: list[torch.Tensor] = []
        # the decoders run at up to full resolution: channels-last convolutions (the encoder gains nothing measurable)
        use_channels_last(self.decoders)

    @property
    def controllers(self) -> list[IterationController]:
        """One controller per level, finest first."""
        c = self.controller
        if isinstance(c, IterationController):
            return [c] * self.levels
        c = list(c)
        if len(c) != self.levels:
            raise ValueError(f"controller needs one entry per level ({self.levels}), got {len(c)}.")
        return c

    @property
    def divisor(self) -> int:
        return 2 ** (self.levels - 1)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        check_registration_pair(moving, fixed, self.spatial_dims, self.in_channels, min_size=self.divisor)
        moving, spatial = pad_to_divisible(moving, self.divisor)
        fixed, _ = pad_to_divisible(fixed, self.divisor)
        if all(s == self.divisor for s in moving.shape[2:]):  # instance norms need more than one coarsest voxel
            raise ValueError(
                f"input shape {tuple(moving.shape[:2]) + tuple(spatial)} is too small: with {self.levels} levels the "
                f"coarsest level would hold a single voxel; use at least {2 * self.divisor} voxels along one axis."
            )
        # one encoder call on the stacked pair: weights are shared, every op is per sample, and a batch of 2B
        # takes PyTorch's fast CPU convolution path where a batch of 1 does not
        feats = self.encoder(torch.cat([moving, fixed], dim=0))
        if len(feats) != self.levels:
            raise ValueError(f"the encoder returned {len(feats)} feature levels, expected {self.levels}.")
        batch = moving.shape[0]
        feats_m = [f[:batch] for f in feats]
        feats_f = [f[batch:] for f in feats]

        single = self.training and not self.unroll_training
        controllers = self.controllers
        fixed_own = crop_to(fixed, spatial)
        prepared_cache: dict = {}
        moving_warp = None  # the moving image prepared for its full-resolution warps (iteration control's evaluations)

        def prepared(similarity):
            # the fixed image's part of the similarity (centred image, variance) is computed once per forward
            if similarity not in prepared_cache:
                prepared_cache[similarity] = PreparedSimilarity(similarity, fixed_own)
            return prepared_cache[similarity]

        iterations = torch.zeros(batch, self.levels, dtype=torch.long)
        traces: list[torch.Tensor] = [torch.empty(0)] * self.levels
        ddf: torch.Tensor | None = None
        for lvl in reversed(range(self.levels)):  # index 0 is level 1 (full resolution)
            fm, ff, decoder = feats_m[lvl], feats_f[lvl], self.decoders[lvl]
            coarsest = ddf is None
            if coarsest:
                ddf = torch.zeros(batch, self.spatial_dims, *fm.shape[2:], device=fm.device, dtype=torch.float32)
            else:
                ddf = resize_ddf(ddf, 2)

            def update(u, index, k, fm=fm, ff=ff, decoder=decoder, coarsest=coarsest):
                if coarsest and k == 1:  # Algorithm 1: the first update at the coarsest level sees raw features
                    return self.fields.compose(None, decoder(select_samples(fm, index), select_samples(ff, index)))
                # decoders that fuse the previous field themselves (RAN's RA module) receive it as ``previous``
                extra = {"previous": u} if getattr(decoder, "takes_previous_field", False) else {}
                return self.fields.compose(u, decoder(self.fields.warp(select_samples(fm, index), u), select_samples(ff, index), **extra))

            controller = SinglePass() if single else controllers[lvl]

            def evaluate(u, index, lvl=lvl, controller=controller):
                nonlocal moving_warp
                if moving_warp is None:
                    moving_warp = self.fields.prepare_warp(moving)
                # the similarity of the image's own extent: the padding added above is cropped off both images
                warped = crop_to(moving_warp(u, index, factor=2**lvl), spatial)
                return prepared(controller.similarity)(warped, index)

            ddf, kept, trace = controlled_refinement(controller, ddf, update, evaluate, coarsest=coarsest)
            iterations[:, lvl] = kept
            traces[lvl] = trace
        self.last_iterations = iterations
        self.last_similarities = traces
        return crop_to(ddf, spatial)
