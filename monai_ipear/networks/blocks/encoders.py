"""Weight-shared feature encoders for pyramid registration networks.

Both return a list of per-level features, finest (level 1, full resolution) first, and expose
``out_channels`` (per level, finest first) and ``in_channels``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.networks.blocks import Convolution
from monai.networks.layers import Pool

from ..utils import channels_last_format, cpu_training
from .neighborhood_attention import NeighborhoodAttention

__all__ = ["FeaturePyramidEncoder", "ConvEncoder", "NAEncoder", "NABlock", "ConvGELUBlock"]

LEAKY = ("leakyrelu", {"negative_slope": 0.1})


class FeaturePyramidEncoder(nn.Module):
    """Base of the pyramid encoders: ``self.levels`` (finest first, each including its own downsampling) are
    applied in sequence and every level's output is returned.

    Subclasses set ``levels`` (``nn.ModuleList``), ``spatial_dims``, ``in_channels`` and ``out_channels``.
    ``forward(x)``: ``(B, in_channels, *spatial)`` -> list of ``(B, out_channels[l], *spatial / 2**l)``.
    """

    levels: nn.ModuleList

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for level in self.levels:
            x = level(x)
            feats.append(x)
        return feats


class ConvEncoder(FeaturePyramidEncoder):
    """IIRP-Net / RP-Net encoder: per level one 3x3(x3) conv + LeakyReLU(0.1), average pooling between levels.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        channels: feature channels per level, finest first (IIRP-Net: 8, 16, 32, 32).

    Input ``(B, in_channels, *spatial)``; output list of ``(B, channels[l], *spatial / 2**l)``.
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, channels: Sequence[int] = (8, 16, 32, 32)) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = tuple(channels)
        ins = (in_channels,) + self.out_channels[:-1]
        convs = [Convolution(spatial_dims, i, o, kernel_size=3, act=LEAKY, norm=None) for i, o in zip(ins, self.out_channels)]
        self.levels = nn.ModuleList([convs[0]] + [nn.Sequential(Pool["avg", spatial_dims](2), c) for c in convs[1:]])


class _ChannelsFirst(torch.autograd.Function):
    """``x.contiguous()`` whose gradient is returned channels-last, the layout of the block that produced ``x``."""

    @staticmethod
    def forward(ctx, x):
        ctx.fmt = channels_last_format(x.ndim)
        return x.contiguous()

    @staticmethod
    def backward(ctx, g):
        return g.contiguous(memory_format=ctx.fmt)


class _InstanceNorm(torch.autograd.Function):
    """Instance normalisation without affine part (MONAI's ``norm="instance"``: population variance, ``eps``) of
    ``(B, C, *spatial)`` in the input's layout, with its closed-form backward.

    Why by hand: ``nn.InstanceNorm`` makes a channels-last map contiguous (channels-first), and
    ``torch.var_mean`` over the spatial axes is slow on CPU: at 2x8x160x192x160 on the development CPU (2 threads)
    172 ms, against 23 ms for the two mean passes used here (mean, then mean of the squared deviations).
    ``F.group_norm`` with one group per channel keeps the layout but is no substitute there: forward + backward
    222 ms against 88 ms, and 0.018 off a float64 reference on a map of mean 1 and deviation 3 (this function:
    9e-7). The backward saves only the normalised map and the inverse deviation: ``dy = rstd * (g - mean(g) -
    xhat * mean(g * xhat))``.
    """

    @staticmethod
    def forward(ctx, y, eps):
        dims = tuple(range(2, y.ndim))
        xhat = y - y.mean(dims, keepdim=True)
        rstd = (xhat.square().mean(dims, keepdim=True) + eps).rsqrt()
        xhat.mul_(rstd)
        ctx.save_for_backward(xhat, rstd)
        return xhat

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        xhat, rstd = ctx.saved_tensors
        dims = tuple(range(2, g.ndim))
        gxmean = (g * xhat).mean(dims, keepdim=True)
        return torch.addcmul(-(rstd * g.mean(dims, keepdim=True)), torch.addcmul(g, xhat, gxmean, value=-1.0), rstd), None


class ConvGELUBlock(nn.Module):
    """NAP's conv block: ``y = GELU(InstanceNorm(conv3(x)))`` then ``y + GELU(conv3(y))``.

    Args:
        spatial_dims: 2 or 3.
        in_channels, out_channels: feature channels.

    ``fast`` (default True): on CPU, while gradients are recorded, the block runs channels-last and returns a
    contiguous map (the gradient flows back channels-last); the same function up to float rounding (tested).
    ``False`` (:func:`~monai_ipear.networks.nets.use_reference_paths`) is the plain path, which inference and other
    devices always take.

    Why: the iPEAR encoder's full-resolution block (8 channels at 160x192x160) dominates its training step on CPU,
    and oneDNN's channels-first convolution backward is slow there, while a partly channels-last block pays more in
    mixed-layout element-wise backward than it gains (measured on the development CPU, iPEAR training step at
    160x192x160, 2 threads, A/B in one process: 12.4 s -> 11.5 s with the level-1 block channels-last throughout,
    about -0.3 s with channels-last weights alone; the blocks of levels 2-4 as well: a further -0.2 s). The
    instance norm by :class:`_InstanceNorm` and channels-last inputs at levels 2..L took the encoder's forward +
    backward (stacked pair, 160x192x160, 2 threads, fastest call of each of two processes) from 2.94-3.05 s to
    2.46-2.52 s.
    Inference stays channels-first: the channels-last block is no faster there, the copy of its output back to
    channels-first eating the convolution's gain (encoder, stacked pair, no autograd: 0.90-0.93 s plain (one round
    1.03 s) against 0.93-0.98 s with every block channels-last and 0.92-0.97 s with level 1's alone, session 17).

    Input ``(B, in_channels, *spatial)`` -> ``(B, out_channels, *spatial)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = Convolution(spatial_dims, in_channels, out_channels, kernel_size=3, act="gelu", norm="instance")
        self.res = Convolution(spatial_dims, out_channels, out_channels, kernel_size=3, act="gelu", norm=None)
        self.fast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast and cpu_training(x):
            return _ChannelsFirst.apply(self._forward_channels_last(x))
        y = self.conv(x)
        return y + self.res(y)

    def _forward_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        fmt = channels_last_format(x.ndim)
        # the pooled maps of levels 2..L arrive channels-first: a channels-first input beside channels-last
        # gradients sends the convolution's backward down oneDNN's mixed-layout path (level 2's 8 -> 16 convolution,
        # 2x8x80x96x80, on the development CPU: 233 ms against ~60 ms). A 1-channel input is contiguous in both
        # layouts and PyTorch then keeps the convolution channels-first.
        y = self.conv.conv(x.contiguous(memory_format=fmt)).contiguous(memory_format=fmt)
        # statistics in float32 under autocast too (instance norm's kernel accumulates in float32)
        y = self.conv.adn.A(_InstanceNorm.apply(y.float(), self.conv.adn.N.eps).to(y.dtype))
        return y + self.res(y)  # the convolution follows its channels-last input


class NABlock(nn.Module):
    """Neighborhood-attention block ``x + NA(LayerNorm(x))`` on a channels-first map (LayerNorm over channels, no MLP)."""

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        num_heads: int,
        kernel_size: int = 3,
        use_natten: bool = False,
        implementation: str = "shifted",
    ):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.attn = NeighborhoodAttention(
            spatial_dims, channels, num_heads, kernel_size, use_natten=use_natten, implementation=implementation
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the fast attention works channels-first (LayerNorm folded into the projections); the reference path
        # moves channels last
        return x + self.attn.forward_channels_first(x, self.norm)


class NAEncoder(FeaturePyramidEncoder):
    """The iPEAR encoder (NAP's ``CoNaTEncoder``): conv blocks with neighborhood attention at the coarser levels.

    Level 1: :class:`ConvGELUBlock`. Levels 2..L: AvgPool(2) -> :class:`ConvGELUBlock` -> :class:`NABlock`.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        channels: feature channels per level, finest first (iPEAR: 8, 16, 32, 32).
        num_heads: attention heads for levels 2..L (iPEAR: 2, 4, 4, i.e. 8 channels per head).
        kernel_size: neighborhood size of the attention (odd).
        use_natten: run attention with NATTEN's kernels (must be importable).

    Input ``(B, in_channels, *spatial)``; output list of ``(B, channels[l], *spatial / 2**l)``, finest first.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        channels: Sequence[int] = (8, 16, 32, 32),
        num_heads: Sequence[int] = (2, 4, 4),
        kernel_size: int = 3,
        use_natten: bool = False,
    ) -> None:
        super().__init__()
        if len(num_heads) != len(channels) - 1:
            raise ValueError(f"num_heads needs one entry per level 2..L: {len(channels) - 1}, got {len(num_heads)}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = tuple(channels)
        self.levels = nn.ModuleList([ConvGELUBlock(spatial_dims, in_channels, channels[0])])
        for i in range(1, len(channels)):
            self.levels.append(
                nn.Sequential(
                    Pool["avg", spatial_dims](2),
                    ConvGELUBlock(spatial_dims, channels[i - 1], channels[i]),
                    NABlock(spatial_dims, channels[i], num_heads[i - 1], kernel_size, use_natten),
                )
            )
