"""SM-GICNet: symmetric multi-level registration with stationary velocity fields (diffeomorphic, both directions).

Checked against the reference LSYLAB/SM-GICNet: ``model_stage.py`` (``WavletMono_unit_add_lvl4``: input block,
``ResidualBlock``, ``Attention``, ``outputs``; ``DiffeomorphicTransform``; velocity composition between levels) and
``Train.py`` (level-by-level training with freezing, loss terms and weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution, DVF2DDF

from ..blocks.fields import FieldComposer, crop_to, pad_to_divisible, resize_ddf
from ..utils import check_registration_pair

__all__ = ["SMGICResidualBlock", "SMGICAttentionGate", "SMGICLevel", "SMGICNet", "haar_split"]


def _conv(spatial_dims, cin, cout, kernel=3, strides=1, bias=False, transposed=False):
    if transposed:
        return Convolution(spatial_dims, cin, cout, kernel_size=2, strides=2, padding=0, output_padding=0,
                           is_transposed=True, conv_only=True, bias=bias)
    return Convolution(spatial_dims, cin, cout, kernel_size=kernel, strides=strides, conv_only=True, bias=bias)


def haar_split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One level of the (averaging) Haar wavelet transform: the all-low-pass band (the 2**d block mean, ``LLL``) and
    the all-high-pass band (``HHH``: the block sum with sign ``(-1)**(i_1 + ... + i_d)``, divided by 2**d), each
    ``(B, C, *spatial / 2)``. Written here because MONAI has no wavelet transform; the reference precomputes its
    bands with PyWavelets (``db2``)."""
    d = x.ndim - 2
    low = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[d - 1](x, 2)
    sign = torch.ones((2,) * d, dtype=x.dtype, device=x.device)
    for axis in range(d):
        shape = [1] * d
        shape[axis] = 2
        sign = sign * torch.tensor([1.0, -1.0], dtype=x.dtype, device=x.device).view(shape)
    weight = (sign / 2**d).expand(x.shape[1], 1, *sign.shape)
    high = (F.conv1d, F.conv2d, F.conv3d)[d - 1](x, weight, stride=2, groups=x.shape[1])
    return low, high


class SMGICResidualBlock(nn.Module):
    """``x + act(conv(act(conv(x))))`` (no bias, LeakyReLU 0.01): the reference's ``ResidualBlock``."""

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv(spatial_dims, channels, channels)
        self.conv2 = _conv(spatial_dims, channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv2(F.leaky_relu(self.conv1(x), 0.01)), 0.01) + x


class SMGICAttentionGate(nn.Module):
    """SM-GICNet's attention gate (the reference's ``Attention``): the decoder features ``x`` are multiplied by
    ``sigmoid(conv1x1(ReLU(resize(conv1x1(g)) + conv1x1(x))))``, per channel and voxel, where ``g`` are the encoder
    (skip) features of the next finer scale, resized (linear) to ``x``'s grid. MONAI's ``AttentionBlock`` gates the
    skip with the decoder signal and uses batch norm and one attention channel, so it is not this gate.

    ``forward(g, x)``: ``(B, C, *spatial_g)``, ``(B, C, *spatial_x)`` -> ``(B, C, *spatial_x)``.
    """

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        self.w_g = _conv(spatial_dims, channels, channels, 1, bias=True)
        self.w_x = _conv(spatial_dims, channels, channels, 1, bias=True)
        self.psi = _conv(spatial_dims, channels, channels, 1, bias=True)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mode = ("linear", "bilinear", "trilinear")[x.ndim - 3]
        g1 = F.interpolate(self.w_g(g), size=x.shape[2:], mode=mode, align_corners=True)
        return x * torch.sigmoid(self.psi(torch.relu(g1 + self.w_x(x))))


class SMGICLevel(nn.Module):
    """One SM-GICNet level network (the reference's level-4 module, used at every level here):

    input block (conv -> LeakyReLU 0.2 -> conv); encoder: 3 x (residual block, stride-2 conv); decoder: 3 x
    (residual block, attention gate with the encoder features of the next finer scale, transposed conv x2, one
    transposed conv shared by the three steps as in the reference); output: conv on ``[decoder, first encoder
    features]`` -> LeakyReLU 0.2 -> conv to ``spatial_dims`` -> Softsign. Convolutions without bias (the reference's
    ``bias_opt=False``), gates with bias.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels (images, wavelet bands, current velocity).
        channels: width (SM-GICNet: 32).
        depth: number of down/up steps (SM-GICNet: 3).

    ``forward(x)``: ``(B, in_channels, *spatial)`` (sizes divisible by ``2**depth``) -> ``(B, spatial_dims, *spatial)``
    in ``(-1, 1)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, channels: int = 32, depth: int = 3) -> None:
        super().__init__()
        c = channels
        self.depth = depth
        self.inp = nn.Sequential(_conv(spatial_dims, in_channels, c), nn.LeakyReLU(0.2), _conv(spatial_dims, c, c))
        self.enc = nn.ModuleList(SMGICResidualBlock(spatial_dims, c) for _ in range(depth))
        self.down = nn.ModuleList(_conv(spatial_dims, c, c, strides=2) for _ in range(depth))
        self.dec = nn.ModuleList(SMGICResidualBlock(spatial_dims, c) for _ in range(depth))
        self.gates = nn.ModuleList(SMGICAttentionGate(spatial_dims, c) for _ in range(depth))
        self.up = _conv(spatial_dims, c, c, transposed=True)
        self.out = nn.Sequential(
            _conv(spatial_dims, 2 * c, c), nn.LeakyReLU(0.2), _conv(spatial_dims, c, spatial_dims), nn.Softsign()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats, y = [], self.inp(x)
        for res, down in zip(self.enc, self.down):
            y = res(y)
            feats.append(y)
            y = down(y)
        for res, gate, skip in zip(self.dec, self.gates, reversed(feats)):
            y = self.up(gate(skip, res(y)))
        return self.out(torch.cat([y, feats[0]], 1))


class SMGICNet(nn.Module):
    """SM-GICNet: coarse-to-fine stationary velocity fields in both directions with shared weights.

    Level ``l`` (``l = 1`` full resolution, ``levels`` the coarsest at ``1 / 2**(levels - 1)``) sees the Haar
    approximations (``LLL``) of both images at its resolution and, at the levels between the coarsest and the finest,
    their detail bands (``HHH``) too; the moving-side inputs are warped by the coarser level's deformation, and at
    the two finest levels both images are weighted by ``0.5 + 0.5 * |(|warped| - |fixed|)|`` normalised to [0, 1]
    per sample (the reference's difference emphasis). The upsampled velocity of the coarser level (x2, values x2)
    is an input too. The level's :class:`SMGICLevel` gives ``dv = range_flow * (size - 1) / 2 * softsign(out)``
    (voxels) and the velocity is composed ``v = dv + v_up(x + dv)`` (the reference's composition); the
    deformation is ``exp(v)`` by scaling and squaring (:class:`monai.networks.blocks.DVF2DDF`, 7 steps). Both
    directions, ``A -> B`` (moving to fixed) and ``B -> A``, run in one batch through the same weights.

    Level-by-level training: :meth:`set_stage` activates the coarsest ``k`` levels and freezes the parameters of
    all but the finest active one (see :class:`~monai_ipear.engines.LevelwiseTraining`). The output is then the field
    of the finest active level, upsampled to full resolution.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        channels: width of each level network (SM-GICNet: 32).
        levels: number of levels (SM-GICNet: 4).
        int_steps: scaling-and-squaring steps (7).
        range_flow: bound of each velocity increment as a fraction of the half image size; ``None``: raw output.
        depth: down/up steps of each level network (3).

    ``forward(moving, fixed)`` -> forward DDF ``exp(v_AB)`` ``(B, spatial_dims, *spatial)`` in voxels, pull
    convention. Sizes are zero-padded to multiples of ``2**(levels - 1 + depth)``. After each call ``last_outputs``
    holds, on the padded grid at the finest active level: ``velocity``/``velocity_backward``, ``ddf``/``ddf_backward``,
    ``ddf_inverse``/``ddf_backward_inverse`` (``exp(-v)``), ``moving``/``fixed``, ``ddf_start``/``ddf_backward_start``
    (the deformation the level started from) and ``levels``: per active level (finest first) a dict with ``ddf``,
    ``ddf_backward``, ``moving``, ``fixed`` (approximations at that level), ``moving_detail``/``fixed_detail`` (or
    ``None``).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        channels: int = 32,
        levels: int = 4,
        int_steps: int = 7,
        range_flow: float | None = 0.4,
        depth: int = 3,
    ) -> None:
        super().__init__()
        self.spatial_dims, self.in_channels, self.levels, self.depth = spatial_dims, in_channels, levels, depth
        self.range_flow = range_flow
        units = []
        for lvl in range(levels):  # finest first
            n_in = 2 * in_channels * (2 if self.has_detail(lvl) else 1) + (0 if lvl == levels - 1 else spatial_dims)
            units.append(SMGICLevel(spatial_dims, n_in, channels, depth))
        self.units = nn.ModuleList(units)
        self.integrate = DVF2DDF(num_steps=int_steps, mode="bilinear", padding_mode="border")
        self.fields = FieldComposer("border")
        self.active_levels = levels
        self.last_outputs: dict = {}
        self.last_iterations: torch.Tensor | None = None
        self.last_similarities: list[torch.Tensor] = []

    def has_detail(self, lvl: int) -> bool:
        return 0 < lvl < self.levels - 1

    @property
    def divisor(self) -> int:
        return 2 ** (self.levels - 1 + self.depth)

    def set_stage(self, active_levels: int, freeze_coarser: bool = True) -> None:
        """Use the coarsest ``active_levels`` levels; with ``freeze_coarser`` only the finest of them trains."""
        if not 1 <= active_levels <= self.levels:
            raise ValueError(f"active_levels must be in [1, {self.levels}], got {active_levels}.")
        self.active_levels = int(active_levels)
        finest = self.levels - self.active_levels
        for lvl, unit in enumerate(self.units):
            unit.requires_grad_(lvl == finest or (lvl > finest and not freeze_coarser))

    def _bound(self, dv: torch.Tensor) -> torch.Tensor:
        if self.range_flow is None:
            return dv
        half = torch.tensor([(s - 1) / 2 for s in dv.shape[2:]], dtype=dv.dtype, device=dv.device)
        return self.range_flow * half.view(1, -1, *([1] * self.spatial_dims)) * F.softsign(dv)

    @staticmethod
    def _emphasis(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        diff = (warped.abs() - fixed.abs()).abs()
        dims = tuple(range(1, diff.ndim))
        lo, hi = diff.amin(dims, keepdim=True), diff.amax(dims, keepdim=True)
        return 0.5 + 0.5 * (diff - lo) / (hi - lo).clamp_min(1e-8)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        check_registration_pair(moving, fixed, self.spatial_dims, self.in_channels, min_size=self.divisor)
        moving, spatial = pad_to_divisible(moving, self.divisor)
        fixed, _ = pad_to_divisible(fixed, self.divisor)
        b = moving.shape[0]
        src, tgt = torch.cat([moving, fixed]), torch.cat([fixed, moving])  # both directions in one batch
        approx_s, approx_t, detail_s, detail_t = [src], [tgt], [None], [None]
        for _ in range(1, self.levels):
            ls, hs = haar_split(approx_s[-1])
            lt, ht = haar_split(approx_t[-1])
            approx_s.append(ls), approx_t.append(lt), detail_s.append(hs), detail_t.append(ht)
        finest = self.levels - self.active_levels
        v: torch.Tensor | None = None
        start = None
        per_level: dict[int, dict] = {}
        for lvl in reversed(range(finest, self.levels)):
            s, t = approx_s[lvl], approx_t[lvl]
            coarsest = v is None
            if coarsest:
                start = torch.zeros(s.shape[0], self.spatial_dims, *s.shape[2:], device=s.device, dtype=s.dtype)
                inputs = [s, t]
            else:
                v = resize_ddf(v, 2)
                start = self.integrate(v)
                ws = self.fields.warp(s, start)
                if lvl <= 1:
                    w = self._emphasis(ws, t)
                    ws, tt = w * ws, w * t
                else:
                    tt = t
                inputs = [ws, tt]
                if self.has_detail(lvl):
                    inputs += [self.fields.warp(detail_s[lvl], start), detail_t[lvl]]
                inputs.append(v)
            dv = self._bound(self.units[lvl](torch.cat(inputs, 1)))
            v = dv if coarsest else self.fields.compose(v, dv)
            ddf = self.integrate(v)
            has_d = self.has_detail(lvl)
            per_level[lvl] = {
                "ddf": ddf[:b], "ddf_backward": ddf[b:], "moving": s[:b], "fixed": t[:b],
                "moving_detail": detail_s[lvl][:b] if has_d else None, "fixed_detail": detail_t[lvl][:b] if has_d else None,
            }
        inverse = self.integrate(-v)
        levels_out = [per_level[lvl] for lvl in range(finest, self.levels)]
        self.last_outputs = {
            "velocity": v[:b], "velocity_backward": v[b:],
            "ddf": levels_out[0]["ddf"], "ddf_backward": levels_out[0]["ddf_backward"],
            "ddf_inverse": inverse[:b], "ddf_backward_inverse": inverse[b:],
            "ddf_start": start[:b], "ddf_backward_start": start[b:],
            "moving": approx_s[finest][:b], "fixed": approx_t[finest][:b],
            "levels": levels_out,
        }
        self.last_iterations = torch.ones(b, self.active_levels, dtype=torch.long)
        self.last_similarities = []
        ddf = levels_out[0]["ddf"]
        if finest > 0:
            ddf = resize_ddf(ddf, 2**finest)
        return crop_to(ddf, spatial)
