"""Residual Aligner Network (RAN, Zheng et al., Medical Image Analysis 2024) blocks.

Checked against the reference implementation jianqingzheng/res_aligner_net (TensorFlow), ``ran_func/networks.py``:
``siam_res_block`` (-> :class:`MotionAwareBlock`), ``siam_conv_block`` (-> the skip projections of
:class:`~monai_ipear.networks.nets.RAN`), ``ws_res_align_block`` (-> :class:`ResidualAligner`, its ``ws_conv`` list
-> :class:`RASharedConvs`, ``expand_prod`` -> :func:`expand_heads`, ``boundary_limit`` -> :func:`boundary_limit`).

Both images are processed by the same weights ("siamese"); here the two branches are stacked along the batch axis:
a tensor ``(2B, ...)`` holds branch 1 (the moving image) in ``[:B]`` and branch 2 (the fixed image) in ``[B:]``. The
field of a branch lives on that branch's grid and pulls from the other branch (``M12`` on the moving grid samples
the fixed features, ``M21`` on the fixed grid samples the moving features; ``M21`` is the registration's DDF).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution

from .fields import FieldComposer

__all__ = [
    "SampleNorm",
    "MotionAwareBlock",
    "RASharedConvs",
    "ResidualAligner",
    "expand_heads",
    "boundary_limit",
    "swap_branches",
]

LEAKY02 = 0.2  # backbone (siam_res_block, siam_conv_block)
LEAKY001 = 0.01  # RA module


def _conv(spatial_dims: int, cin: int, cout: int, kernel: int = 3, dilation: int = 1) -> Convolution:
    """A plain conv with bias and 'same' padding (MONAI ``Convolution``, ``conv_only``)."""
    return Convolution(spatial_dims, cin, cout, kernel_size=kernel, dilation=dilation, conv_only=True)


def swap_branches(x: torch.Tensor) -> torch.Tensor:
    """``(2B, ...)`` stacked ``[branch 1; branch 2]`` -> ``[branch 2; branch 1]``."""
    b = x.shape[0] // 2
    return torch.cat([x[b:], x[:b]], 0)


class SampleNorm(nn.Module):
    """RAN's ``InstanceNormalization`` layer as the reference builds it (``axis=None``): every sample is normalised
    over all its channels and voxels together, ``(x - mean) / (std + eps)``, then one learned scale and one learned
    shift (2 parameters). Neither MONAI nor PyTorch has this form (``GroupNorm(1, C)`` learns per-channel affine
    parameters), hence these few lines.

    ``forward(x)``: ``(B, C, *spatial)`` -> same shape.
    """

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, x.ndim))
        mean = x.mean(dims, keepdim=True)
        std = x.var(dims, keepdim=True, unbiased=False).add(1e-12).sqrt()
        return (x - mean) / (std + self.eps) * self.weight + self.bias


class MotionAwareBlock(nn.Module):
    """RAN's siamese residual block (``siam_res_block``): ``y = act(N1(conv0(x)))``,
    ``out = act(N3(conv2(act(N2(conv1(y))))) + y)`` with dilations ``1, 1, 3`` and LeakyReLU 0.2, optionally
    preceded by an upsampling layer and followed by AvgPool(2).

    Args:
        spatial_dims: 2 or 3.
        in_channels, out_channels: channels.
        dilations: of conv0, conv1, conv2.
        upsample: a module applied before conv0 (the reference's transposed convolution); its output must have
            ``out_channels`` channels.
        downsample: apply AvgPool(2) after the residual sum.

    ``forward(x)``: ``(N, in_channels, *spatial)`` -> ``(N, out_channels, *spatial')``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        dilations: Sequence[int] = (1, 1, 3),
        upsample: nn.Module | None = None,
        downsample: bool = False,
    ) -> None:
        super().__init__()
        d0, d1, d2 = dilations
        self.spatial_dims = spatial_dims
        self.upsample = upsample
        self.conv0 = _conv(spatial_dims, out_channels if upsample is not None else in_channels, out_channels, 3, d0)
        self.conv1 = _conv(spatial_dims, out_channels, out_channels, 3, d1)
        self.conv2 = _conv(spatial_dims, out_channels, out_channels, 3, d2)
        self.norm0, self.norm1, self.norm2 = SampleNorm(), SampleNorm(), SampleNorm()
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample is not None:
            x = self.upsample(x)
        y = F.leaky_relu(self.norm0(self.conv0(x)), LEAKY02)
        out = F.leaky_relu(self.norm1(self.conv1(y)), LEAKY02)
        out = F.leaky_relu(self.norm2(self.conv2(out)) + y, LEAKY02)
        if self.downsample:
            out = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[self.spatial_dims - 1](out, 2)
        return out


class RASharedConvs(nn.Module):
    """The convolutions every RA module of a RAN shares (the reference's ``ws_conv`` list), with ``I = 3**d - d**2``
    correspondence channels and ``H`` heads:

    ``head_hidden`` (``Conv_m``, 3, ``I -> 3**d``), ``heads`` (``Conv_mo``, 1, ``3**d -> H * d``), ``logits``
    (``Conv_h``, 1, ``I -> H``), ``conf_hidden`` (``Conv_c1``, 3, ``I -> I``), ``conf_feat`` (``Conv_c2``, 1,
    ``I -> H``), ``fuse_out`` (``Conv_fco``, 3, ``I -> H``), ``acc_out`` (``Conv_fo``, 3, ``I -> 1``).
    """

    def __init__(self, spatial_dims: int, num_heads: int = 6) -> None:
        super().__init__()
        inter = 3**spatial_dims - spatial_dims**2
        self.inter_channels = inter
        self.head_hidden = _conv(spatial_dims, inter, 3**spatial_dims, 3)
        self.heads = _conv(spatial_dims, 3**spatial_dims, num_heads * spatial_dims, 1)
        self.logits = _conv(spatial_dims, inter, num_heads, 1)
        self.conf_hidden = _conv(spatial_dims, inter, inter, 3)
        self.conf_feat = _conv(spatial_dims, inter, num_heads, 1)
        self.fuse_out = _conv(spatial_dims, inter, num_heads, 3)
        self.acc_out = _conv(spatial_dims, inter, 1, 3)


def expand_heads(fields: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The accumulator's input per displacement component (the reference's ``expand_prod``).

    Args:
        fields: ``(N, H, d, *spatial)`` head fields (``H = 1`` for a single field, e.g. the previous level's).
        weights: ``(N, K, *spatial)`` per-head weights (``K`` heads of the current module).

    Returns:
        ``(N * d, K + 1, *spatial)``: for every sample and component ``c`` the ``K`` weighted fields
        ``weights_k * fields_k,c`` (a single field is broadcast to every head) followed by the head mean
        ``mean_h fields_h,c``. Components are folded into the batch, so the accumulator's convolutions are shared by
        the components.
    """
    n, _, d = fields.shape[:3]
    spatial = fields.shape[3:]
    weighted = fields * weights[:, :, None]
    stacked = torch.cat([weighted, fields.mean(1, keepdim=True)], 1)  # (N, K + 1, d, *spatial)
    return stacked.transpose(1, 2).reshape(n * d, stacked.shape[1], *spatial)


def boundary_limit(ddf: torch.Tensor) -> torch.Tensor:
    """RAN's boundary limit: component ``i`` clamped to ``[1 - 2 * n_i, 2 * n_i - 1]`` voxels (``n_i``: the grid
    size along axis ``i``). ``(N, d, *spatial)`` -> same shape."""
    out = [ddf[:, i].clamp(1 - 2 * n, 2 * n - 1) for i, n in enumerate(ddf.shape[2:])]
    return torch.stack(out, 1)


class ResidualAligner(nn.Module):
    """The residual-aligner (RA) module (``ws_res_align_block``) on a stacked pair of branches.

    With ``u`` the previous level's field and confidence ``c_u`` (``None`` at the first module):

    1. resample: ``r = Warp(conv1x1(other branch), u)`` (no warp at the first module), both normalised;
    2. correspondence trunk (dilated by ``atrous_rate``) on ``[norm(x), r]`` -> multi-head field ``M_h``
       (``H`` heads), head logits ``l``, and confidence features;
    3. fused confidence ``c = conv(act(norm(conv([l, c_u]))))`` (``[l]`` at the first module);
    4. accumulator (equation 11, full field): ``conv(act(conv([expand(M, w), expand(u, w_u)])))`` with head weights
       ``w = softmax_h(c) * ReLU(conv1x1(act(l)))`` and ``w_u = softmax_h(c) * ReLU(conv1x1(act(c_u)))`` - the
       previous field enters weighted by the current head masks and by a scale read from the previous confidence;
       the output is the new full field of this level (not a residual);
    5. boundary limit;
    6. bidirectional feature fusion: ``x + act(conv1x1([Warp(other branch, M), confidence features]))``.

    Args:
        spatial_dims: 2 or 3.
        channels: feature channels ``C`` of both branches at this module.
        num_heads: ``H`` (RAN: 6).
        atrous_rate: dilation of the first two trunk convs.
        first: the first RA module of the network (no previous field or confidence).

    ``forward(x, shared, previous=None)``: ``x`` ``(2B, C, *spatial)`` stacked branches, ``shared`` the network's
    :class:`RASharedConvs`, ``previous`` ``(u (2B, d, *spatial), c_u (2B, H, *spatial))`` on this grid ->
    ``(x', u', c')``: fused features ``(2B, C, *spatial)``, full field ``(2B, d, *spatial)`` (voxels, pull, each branch
    pulling from the other) and confidence logits ``(2B, H, *spatial)``. ``last_head_masks`` ``(2B, H, *spatial)``
    keeps the last call's ``softmax_h(c)``.
    """

    def __init__(
        self, spatial_dims: int, channels: int, num_heads: int = 6, atrous_rate: int = 1, first: bool = False
    ) -> None:
        super().__init__()
        inter = 3**spatial_dims - spatial_dims**2
        h = num_heads
        self.spatial_dims, self.num_heads, self.first = spatial_dims, num_heads, first
        self.value = _conv(spatial_dims, channels + h, channels, 1)  # Conv_val
        self.resample = _conv(spatial_dims, channels, channels, 1)  # Conv_resample
        self.match1 = _conv(spatial_dims, 2 * channels, inter, 3, atrous_rate)  # Conv_m1
        self.match2 = _conv(spatial_dims, inter, inter, 3, atrous_rate)  # Conv_m2
        self.match3 = _conv(spatial_dims, inter, inter, 3)  # Conv_m3
        self.fuse = _conv(spatial_dims, h if first else 2 * h, inter, 3)  # Conv_fc
        self.accumulate = _conv(spatial_dims, h + 1 if first else 2 * (h + 1), inter, 3)  # Conv_f
        self.scale = _conv(spatial_dims, h, 1, 1)  # Conv_c
        self.norm = SampleNorm()
        self.norm_resampled = SampleNorm()
        self.norm_conf = SampleNorm()
        self.norm_fuse = SampleNorm()
        self.norm_feat = SampleNorm()
        self.fields = FieldComposer("zeros")
        self.last_head_masks: torch.Tensor | None = None

    def head_weights(self, fused: torch.Tensor, scale_source: torch.Tensor) -> torch.Tensor:
        """``softmax_h(fused) * ReLU(conv1x1(LeakyReLU(scale_source)))``: ``(N, H, *spatial)``."""
        return fused.softmax(1) * torch.relu(self.scale(F.leaky_relu(scale_source, LEAKY001)))

    def forward(
        self,
        x: torch.Tensor,
        shared: RASharedConvs,
        previous: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if (previous is None) != self.first:
            raise ValueError("the first RA module takes no previous field; every later one needs (field, confidence).")
        act = lambda t: F.leaky_relu(t, LEAKY001)  # noqa: E731
        other = swap_branches(x)
        resampled = self.resample(other)
        if previous is not None:
            resampled = self.fields.warp(resampled, previous[0])
        mat = act(self.match1(torch.cat([self.norm(x), self.norm_resampled(resampled)], 1)))
        mat = act(self.match3(act(self.match2(mat))) + mat)
        n = x.shape[0]
        spatial = x.shape[2:]
        heads = shared.heads(act(shared.head_hidden(mat))).reshape(n, self.num_heads, self.spatial_dims, *spatial)
        logits = shared.logits(act(self.norm_conf(shared.conf_hidden(mat))))
        conf_feat = act(self.norm_feat(shared.conf_feat(mat)))
        conf_in = logits if previous is None else torch.cat([logits, previous[1]], 1)
        conf = shared.fuse_out(act(self.norm_fuse(self.fuse(conf_in))))
        acc_in = expand_heads(heads, self.head_weights(conf, logits))
        if previous is not None:
            prev_in = expand_heads(previous[0][:, None], self.head_weights(conf, previous[1]))
            acc_in = torch.cat([acc_in, prev_in], 1)
        field = shared.acc_out(act(self.accumulate(acc_in))).reshape(n, self.spatial_dims, *spatial)
        field = boundary_limit(field)
        self.last_head_masks = conf.softmax(1).detach()
        fused = act(self.value(torch.cat([self.fields.warp(other, field), conf_feat], 1)))
        return x + fused, field, conf
