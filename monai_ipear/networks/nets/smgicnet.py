"""SM-GICNet: symmetric multi-level registration with stationary velocity fields (diffeomorphic, both directions)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution, DVF2DDF, ResidualUnit
from monai.networks.nets.attentionunet import AttentionBlock

from ..blocks.fields import FieldComposer, crop_to, pad_to_divisible, resize_ddf
from ..utils import check_registration_pair

__all__ = ["SMGICLevel", "SMGICNet"]

LEAKY02 = ("leakyrelu", {"negative_slope": 0.2})


class SMGICLevel(nn.Module):
    """One SM-GICNet level: ``[warped moving, fixed, current velocity]`` -> velocity increment.

    conv -> residual unit (skip branch: conv) | stride-2 conv -> two residual units -> transposed conv x2 ->
    (finest level only: MONAI's :class:`~monai.networks.nets.attentionunet.AttentionBlock` gates the skip features
    with the decoder features) -> concat -> conv + LeakyReLU(0.2) -> conv to ``spatial_dims`` channels.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        channels: feature width.
        attention: use the attention gate (SM-GICNet: finest level only).

    ``forward(x)``: ``(B, 2 * in_channels + spatial_dims, *spatial)`` (even sizes) -> ``(B, spatial_dims, *spatial)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, channels: int = 16, attention: bool = False) -> None:
        super().__init__()
        c = channels
        self.inp = Convolution(spatial_dims, 2 * in_channels + spatial_dims, c, kernel_size=3, act=LEAKY02, norm=None)
        self.res_in = ResidualUnit(spatial_dims, c, c, subunits=2, act=LEAKY02, norm=None)
        self.down = Convolution(spatial_dims, c, c, kernel_size=3, strides=2, act=LEAKY02, norm=None)
        self.res_low = nn.Sequential(
            ResidualUnit(spatial_dims, c, c, subunits=2, act=LEAKY02, norm=None),
            ResidualUnit(spatial_dims, c, c, subunits=2, act=LEAKY02, norm=None),
        )
        self.up = Convolution(spatial_dims, c, c, kernel_size=2, strides=2, padding=0, output_padding=0, is_transposed=True, act=LEAKY02, norm=None)
        self.skip = Convolution(spatial_dims, c, c, kernel_size=3, act=LEAKY02, norm=None)
        self.gate = AttentionBlock(spatial_dims, f_int=c, f_g=c, f_l=c) if attention else None
        self.out = nn.Sequential(
            Convolution(spatial_dims, 2 * c, c, kernel_size=3, act=LEAKY02, norm=None),
            Convolution(spatial_dims, c, spatial_dims, kernel_size=3, conv_only=True),
        )
        nn.init.zeros_(self.out[-1].conv.bias)  # no systematic drift at the start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res_in(self.inp(x))
        up = self.up(self.res_low(self.down(x)))
        skip = self.skip(x)
        if self.gate is not None:
            skip = self.gate(g=up, x=skip)
        return self.out(torch.cat([skip, up], 1))


class SMGICNet(nn.Module):
    """SM-GICNet: coarse-to-fine stationary velocity fields predicted in both directions with shared weights.

    The images are average-pooled into ``levels`` resolutions. At each level (coarsest first) the velocity ``v``
    from the coarser level is upsampled (x2, values x2), integrated by scaling and squaring
    (:class:`monai.networks.blocks.DVF2DDF`, ``int_steps`` steps), the source image is warped with it and
    :class:`SMGICLevel` adds an increment to ``v``. Both directions, ``A -> B`` (moving to fixed) and ``B -> A``,
    run in one batch through the same weights. ``exp(-v)`` is the inverse of ``exp(v)`` up to integration error.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        channels: width of each level's network.
        levels: number of resolutions (full resolution is level 1).
        int_steps: scaling-and-squaring steps (SM-GICNet: 7).
        range_flow: bound of each level's velocity increment as a fraction of the half image size,
            ``dv = range_flow * (size - 1) / 2 * softsign(out)`` per axis (the reference's ``range_flow * softsign``
            in normalised coordinates, converted to voxels); ``None``: the raw conv output in voxels.

    ``forward(moving, fixed)``: ``(B, C, *spatial)`` each -> forward DDF ``exp(v_AB)`` ``(B, spatial_dims, *spatial)``
    in voxels, pull convention. Sizes are zero-padded to multiples of ``2**levels`` internally. After each call
    ``last_outputs`` holds, on the padded grid: ``velocity``/``velocity_backward``, ``ddf``/``ddf_backward``
    (``exp(v_AB)``, ``exp(v_BA)``), ``ddf_inverse``/``ddf_backward_inverse`` (``exp(-v_AB)``, ``exp(-v_BA)``),
    ``moving``/``fixed`` and ``levels``: a list (finest first) of dicts with each level's ``ddf``,
    ``ddf_backward``, ``moving`` and ``fixed``. ``last_iterations`` is ``(B, levels)`` ones (one pass per level);
    ``last_similarities`` is empty (no iteration control).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        channels: int = 16,
        levels: int = 3,
        int_steps: int = 7,
        range_flow: float | None = 0.4,
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.levels = levels
        self.range_flow = range_flow
        # finest first; the attention gate sits at the finest level only
        self.units = nn.ModuleList(SMGICLevel(spatial_dims, in_channels, channels, attention=(i == 0)) for i in range(levels))
        self.integrate = DVF2DDF(num_steps=int_steps, mode="bilinear", padding_mode="border")
        self.fields = FieldComposer("border")
        self.last_outputs: dict = {}
        self.last_iterations: torch.Tensor | None = None
        self.last_similarities: list[torch.Tensor] = []

    @property
    def divisor(self) -> int:
        return 2**self.levels

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[self.spatial_dims - 1](x, 2)

    def _bound(self, dv: torch.Tensor) -> torch.Tensor:
        if self.range_flow is None:
            return dv
        half = torch.tensor([(s - 1) / 2 for s in dv.shape[2:]], dtype=dv.dtype, device=dv.device)
        return self.range_flow * half.view(1, -1, *([1] * self.spatial_dims)) * F.softsign(dv)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        check_registration_pair(moving, fixed, self.spatial_dims, self.in_channels, min_size=self.divisor)
        moving, spatial = pad_to_divisible(moving, self.divisor)
        fixed, _ = pad_to_divisible(fixed, self.divisor)
        b = moving.shape[0]
        src, tgt = [torch.cat([moving, fixed])], [torch.cat([fixed, moving])]  # both directions in one batch
        for _ in range(1, self.levels):
            src.append(self._pool(src[-1]))
            tgt.append(self._pool(tgt[-1]))
        v: torch.Tensor | None = None
        per_level: list[dict] = [{}] * self.levels
        for lvl in reversed(range(self.levels)):
            s, t = src[lvl], tgt[lvl]
            if v is None:
                v = torch.zeros(s.shape[0], self.spatial_dims, *s.shape[2:], device=s.device, dtype=torch.float32)
            else:
                v = resize_ddf(v, 2)
            warped = self.fields.warp(s, self.integrate(v))
            v = v + self._bound(self.units[lvl](torch.cat([warped, t, v], 1)))
            ddf = self.integrate(v)
            per_level[lvl] = {"ddf": ddf[:b], "ddf_backward": ddf[b:], "moving": s[:b], "fixed": t[:b]}
        inverse = self.integrate(-v)
        self.last_outputs = {
            "velocity": v[:b],
            "velocity_backward": v[b:],
            "ddf": per_level[0]["ddf"],
            "ddf_backward": per_level[0]["ddf_backward"],
            "ddf_inverse": inverse[:b],
            "ddf_backward_inverse": inverse[b:],
            "moving": moving,
            "fixed": fixed,
            "levels": per_level,
        }
        self.last_iterations = torch.ones(b, self.levels, dtype=torch.long)
        self.last_similarities = []
        return crop_to(per_level[0]["ddf"], spatial)
