"""Displacement-field operations shared by every network in the package.

Conventions (one for the whole package, see ``docs/architecture.md``):

- a dense displacement field (DDF) has shape ``(B, spatial_dims, *spatial)``, in voxels of the tensor
  grid, channel ``i`` is spatial axis ``i``, pull convention ``warped(x) = moving(x + ddf(x))``;
- warping uses :class:`monai.networks.blocks.Warp` (``align_corners=True`` sampling);
- a residual ``delta`` is composed onto a running field ``u`` as ``u_new = warp(u, delta) + delta``;
- a field goes to the next finer level by linear x2 upsampling (``align_corners=True``) and x2 of its values.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Warp

from ...controllers.samples import select_samples
from ..utils import records_grad, tracing

__all__ = ["FieldComposer", "PreparedWarp", "resize_ddf", "upsample_linear", "pad_to_divisible", "crop_to"]


def _interp_mode(spatial_dims: int) -> str:
    return {1: "linear", 2: "bilinear", 3: "trilinear"}[spatial_dims]


def upsample_linear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``F.interpolate(x, size, mode="(bi/tri)linear", align_corners=True)`` for ``x`` ``(B, C, *spatial)``.

    3D runs as two separable passes: the in-plane axes first (bilinear), then the first spatial axis on the
    flattened planes: the same separable weights, equal to the trilinear call up to float rounding (tested, values
    and gradients). Why: PyTorch's CPU trilinear kernel is slower than its bilinear one (a 3-channel 160x192x160
    output on the 2-core development CPU: 42 ms trilinear, 27-30 ms in two bilinear passes), and its bilinear
    kernel spends most of that on the second pass, whose second axis it interpolates too (at scale 1); on CPU
    without autograd that pass runs plane by plane (:func:`_linear_first_axis`): 25 -> 4 ms for 3 channels of 80
    -> 160 planes of 192x160; a coarse field's sampling grid (addition and upsampling) 14 -> 10 ms at factor 2.
    """
    if x.ndim != 5:
        return F.interpolate(x, size=list(size), mode=_interp_mode(x.ndim - 2), align_corners=True)
    b, c, d, h, w = x.shape
    D, H, W = (int(s) for s in size)
    y = F.interpolate(x.reshape(b, c * d, h, w), size=(H, W), mode="bilinear", align_corners=True)
    if x.device.type == "cpu" and not records_grad(x) and not tracing():
        return _linear_first_axis(y.view(b, c, d, H * W), D).view(b, c, D, H, W)
    y = F.interpolate(y.view(b, c, d, H * W), size=(D, H * W), mode="bilinear", align_corners=True)
    return y.view(b, c, D, H, W)


def _linear_first_axis(y: torch.Tensor, size: int) -> torch.Tensor:
    """Linear interpolation (``align_corners=True``) of ``y`` ``(B, C, d, N)`` along its third axis to ``size``.

    Each output plane is ``w0 * y[:, :, i0] + w1 * y[:, :, i1]``, two whole-plane ops. Why by hand: ``F.interpolate``
    has no 1D-along-an-outer-axis mode; as a bilinear call over ``(d, N)`` it interpolates the untouched axis too
    (a 3 x 80 x 30720 input to 160 planes: 25 ms vs 4 ms).
    """
    b, c, d, n = y.shape
    out = torch.empty(b, c, size, n, dtype=y.dtype, device=y.device)
    for i, (i0, i1, w0, w1) in enumerate(_linear_weights(d, size)):
        plane = out[:, :, i]
        if w1 == 0.0:
            plane.copy_(y[:, :, i0])
        else:
            torch.mul(y[:, :, i0], w0, out=plane)
            plane.add_(y[:, :, i1], alpha=w1)
    return out


@functools.lru_cache(maxsize=32)
def _linear_weights(d: int, size: int) -> tuple[tuple[int, int, float, float], ...]:
    """``(i0, i1, w0, w1)`` per output index of a ``d`` -> ``size`` linear resize with ``align_corners=True``, computed
    as PyTorch's CPU upsampling kernels compute them: float32 scale ``(d - 1) / (size - 1)`` (0 for one output) times
    the output index, floored; the weight of the upper neighbour clamped to [0, 1]."""
    scale = torch.tensor(d - 1 if size > 1 else 0, dtype=torch.float32) / max(size - 1, 1)
    pos = torch.arange(size, dtype=torch.float32) * scale
    lower = pos.floor()
    lam = (pos - lower).clamp(0.0, 1.0)
    lower = lower.long()
    upper = (lower + 1).clamp(max=d - 1)
    return tuple(zip(lower.tolist(), upper.tolist(), (1.0 - lam).tolist(), lam.tolist()))


def resize_ddf(ddf: torch.Tensor, factor: int) -> torch.Tensor:
    """Upsample a DDF by an integer ``factor`` and scale its values by the same factor.

    Linear interpolation with ``align_corners=True``, as IIRP-Net's reference code does, so that fields
    passed between pyramid levels match the published implementation.

    Args:
        ddf: ``(B, spatial_dims, *spatial)`` in voxels of its own grid.
        factor: integer upsampling factor (1 returns ``ddf`` unchanged).

    Returns:
        ``(B, spatial_dims, *[s * factor for s in spatial])`` in voxels of the finer grid.
    """
    if factor == 1:
        return ddf
    return upsample_linear(factor * ddf, [s * factor for s in ddf.shape[2:]])


class FieldComposer(torch.nn.Module):
    """Warps images and composes displacement fields with MONAI's :class:`~monai.networks.blocks.Warp` convention.

    Args:
        padding_mode: ``"zeros"`` (IIRP-Net's reference code; samples outside the grid read 0),
            ``"border"`` or ``"reflection"``. Used for images, features and field composition alike.
        fast: linear warps build the normalised sampling grid in one channels-first pass (a cached identity grid
            plus the scaled field) and call ``torch.nn.functional.grid_sample`` exactly as MONAI's ``Warp`` does on
            its native path (``align_corners=True``, same padding), instead of ``Warp``'s several passes over the
            field; the same function up to float rounding of the grid (tested). ``False``: MONAI's ``Warp``.
            Nearest-neighbour warps (label maps) always use ``Warp``.
    """

    def __init__(self, padding_mode: str = "zeros", fast: bool = True) -> None:
        super().__init__()
        self.padding_mode = padding_mode
        self.fast = fast
        self.warp_linear = Warp(mode="bilinear", padding_mode=padding_mode)
        self.warp_nearest = Warp(mode="nearest", padding_mode=padding_mode)
        # one identity grid per shape: a pyramid warps at every level's resolution and, under iteration control,
        # at full resolution after every update (a single-entry cache was rebuilt at each of those switches)
        self._grid_cache: dict[tuple, tuple[torch.Tensor, dict[int, torch.Tensor]]] = {}
        self._voxel_cache: dict[tuple, torch.Tensor] = {}  # PreparedWarp's identities in voxels, per (shape, factor)

    GRID_CACHE_SIZE = 8  # shapes kept (a pyramid of L levels uses L, plus its full-resolution grid)

    def _identity_grid(self, spatial, device, factor: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Channels-first normalised identity grid ``(1, nd, *spatial)`` in array-axis order (channel ``i``: axis ``i``)
        and the per-axis scale ``(1, nd, 1, ...)`` from voxels of this grid to normalised units of the grid ``factor``
        times finer (kept per factor: no host-to-device copy per warp)."""
        def build():
            axes = [torch.arange(s, device=device, dtype=torch.float32) * (2.0 / max(s - 1, 1)) - 1.0 for s in spatial]
            return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)[None], {}

        grid, scales = self._cached(self._grid_cache, (tuple(spatial), torch.device(device)), build)
        if factor not in scales:
            # normalised units of the fine grid, times the factor that turns voxels of this grid into fine ones
            scale = [2.0 * factor / max(s * factor - 1, 1) for s in spatial]
            scales[factor] = torch.tensor(scale, device=device, dtype=torch.float32).view(1, -1, *[1] * len(spatial))
        return grid, scales[factor]

    def warp(self, image: torch.Tensor, ddf: torch.Tensor, mode: str = "bilinear", factor: int = 1) -> torch.Tensor:
        """Warp ``image`` ``(B, C, *spatial)`` with ``ddf`` ``(B, spatial_dims, *spatial / factor)``: ``image(x + u(x))``
        with ``u = resize_ddf(ddf, factor)`` (``ddf`` itself for ``factor`` 1).

        ``factor`` > 1 (a coarse field, e.g. iteration control judging a coarse level at full resolution): the fast
        path upsamples the normalised sampling grid built at the field's resolution instead of the field (linear
        upsampling with ``align_corners=True`` reproduces the identity exactly), one full-resolution pass instead of
        two; the same function up to float rounding of the grid (tested).
        The field is cast to the image's dtype family: sampling runs in float32 under autocast.
        """
        ddf = ddf.float()
        if self.fast and mode != "nearest" and not torch.jit.is_scripting():
            _check_warp_shapes(image.shape, ddf, factor)
            image = image.float()
            # grid_sample reads grid channel 0 as the input's last axis. Without an image gradient the image is read
            # through a reversed-axes view, so the grid keeps the DDF's axis order and is built in one channels-first
            # pass (flipping its channels cost a further copy: 38 -> 17 ms per 160x192x160 grid on the development
            # CPU); with one (features in training) the image itself is read, with the channel-reversed grid, so that
            # its gradient is written in the image's own layout.
            reverse = records_grad(image)
            source = image if reverse else image.permute(0, 1, *range(image.ndim - 1, 1, -1))
            return _grid_sample(source, self._sampling_grid(ddf, factor, reverse), self.padding_mode)
        ddf = resize_ddf(ddf, factor)
        warp = self.warp_nearest if mode == "nearest" else self.warp_linear
        if warp.ref_grid is not None and warp.ref_grid.device != ddf.device:
            warp.ref_grid = None  # MONAI caches the grid by shape only; drop it when the device changes
        return warp(image.float(), ddf)

    def _sampling_grid(self, ddf: torch.Tensor, factor: int, reverse: bool = False) -> torch.Tensor:
        """Normalised ``grid_sample`` grid ``(B, *spatial * factor, nd)`` of ``resize_ddf(ddf, factor)``: a view of a
        channels-first grid, channels in array-axis order (``reverse``: in grid_sample's x, y[, z] order)."""
        identity, scale = self._identity_grid(ddf.shape[2:], ddf.device, factor)
        grid = torch.addcmul(identity, ddf, scale)
        if reverse:
            grid = grid.flip(1)
        if factor != 1:
            grid = upsample_linear(grid, [s * factor for s in ddf.shape[2:]])
        return grid.movedim(1, -1)

    def prepare_warp(self, image: torch.Tensor) -> "PreparedWarp":
        """``image`` ``(B, C, *spatial)`` made ready to be warped many times by fields of its samples (iteration control
        warps the moving image at full resolution after every update): see :class:`PreparedWarp`."""
        return PreparedWarp(self, image)

    def _voxel_grid(self, spatial, device, factor: int = 1) -> torch.Tensor:
        """Identity ``(1, nd, *spatial)`` in voxels of the grid ``factor`` times finer (channel ``i``: axis ``i``), the
        positions that linear upsampling with ``align_corners=True`` gives this grid's voxels; cached per shape."""
        def build():
            axes = [torch.arange(s, device=device, dtype=torch.float32) * ((s * factor - 1) / max(s - 1, 1)) for s in spatial]
            return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=0)[None]

        return self._cached(self._voxel_cache, (tuple(spatial), torch.device(device), factor), build)

    def _cached(self, cache: dict, key: tuple, build):
        """``cache[key]``, built by ``build()`` when missing; at most ``GRID_CACHE_SIZE`` entries, the oldest dropped."""
        if key not in cache:
            if len(cache) >= self.GRID_CACHE_SIZE:
                cache.pop(next(iter(cache)))
            cache[key] = build()
        return cache[key]

    def compose(self, ddf: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
        """Compose a residual ``delta`` onto ``ddf``: ``ddf(x + delta(x)) + delta(x)``; ``None`` means identity."""
        delta = delta.float()
        if ddf is None:
            return delta
        return self.warp(ddf, delta) + delta


class PreparedWarp:
    """``warp(image[index], ddf, factor=factor)`` of one image batch by many fields, with what depends on the image alone
    prepared once.

    On CPU, for 3D images, linear sampling with zeros padding and no autograd (iteration control's evaluations), the
    image is laid out once as a :class:`~monai_ipear.networks.blocks.slice_mosaic.SliceMosaic` and every warp samples it
    with PyTorch's vectorised 2D sampler. The benchmark pair at 160x192x160 (one channel) under the fields iPEAR's TCI
    evaluates at levels 4, 3, 2, 1, on the 2-core development CPU: 53, 59, 58, 48 ms -> 46, 47, 49, 39 ms per warp
    (0.71 -> 0.60 s for the 12 evaluations of a 3/3/3/3 forward). Values equal :meth:`FieldComposer.warp` up to the
    mosaic's position rounding (a linear ramp at that size: at most 3.5e-4 voxels, the 3D sampler 7e-5; tested on
    small volumes). Elsewhere (2D, CUDA, other padding, autograd, tracing, ``fast=False``) it calls
    :meth:`FieldComposer.warp`.

    ``__call__(ddf, index=None, factor=1)``: ``ddf`` ``(b, spatial_dims, *spatial / factor)`` of the samples ``index``
    (``(b,)`` long, increasing; ``None``: all) -> ``(b, C, *spatial)``.
    """

    def __init__(self, fields: FieldComposer, image: torch.Tensor) -> None:
        self.fields, self.image = fields, image
        self.mosaic = None
        if (
            fields.fast
            and fields.padding_mode == "zeros"
            and image.ndim == 5
            and image.device.type == "cpu"
            and not records_grad(image)
            and not tracing()
        ):
            from .slice_mosaic import SliceMosaic

            self.mosaic = SliceMosaic(image)

    def __call__(self, ddf: torch.Tensor, index: torch.Tensor | None = None, factor: int = 1) -> torch.Tensor:
        if self.mosaic is None or records_grad(ddf) or tracing():
            image = self.image if index is None else select_samples(self.image, index)
            return self.fields.warp(image, ddf, factor=factor)
        batch = self.image.shape[0] if index is None else len(index)
        _check_warp_shapes((batch, *self.image.shape[1:]), ddf, factor)
        coords = torch.add(self.fields._voxel_grid(ddf.shape[2:], ddf.device, factor), ddf.float(), alpha=factor)
        if factor != 1:  # linear upsampling reproduces the identity: positions of the upsampled field
            coords = upsample_linear(coords, [s * factor for s in ddf.shape[2:]])
        return self.mosaic.sample(coords, index)


def _check_warp_shapes(image_shape: Sequence[int], ddf: torch.Tensor, factor: int) -> None:
    """``ValueError`` unless ``ddf`` is a field of the samples of an image ``image_shape`` on its grid ``factor``
    times coarser."""
    fine = [s * factor for s in ddf.shape[2:]]
    if list(image_shape[2:]) != fine or ddf.shape[1] != ddf.ndim - 2 or image_shape[0] != ddf.shape[0]:
        raise ValueError(f"image {tuple(image_shape)} and DDF {tuple(ddf.shape)} (x{factor}) do not match.")


def _grid_sample(image: torch.Tensor, grid: torch.Tensor, padding_mode: str) -> torch.Tensor:
    """``F.grid_sample(image, grid, "bilinear", padding_mode, align_corners=True)``, on CPU with one sample split
    into one part per thread: into groups of channels when every thread gets at least two, otherwise into slabs
    along the first output axis.

    Why by hand: PyTorch's CPU grid sampler runs its samples in parallel and each sample on one thread, so a
    batch of 1 used one of the 2 development cores (a 160x192x160 image on a random grid: 0.50 s with 1 thread,
    0.51 s with 2; split into 2 slabs: 0.27 s). Both splits are a batch of views (the channel groups of the image
    with the grid expanded, or the image expanded with the grid's slabs; no input copy), and every output value is
    computed by the same arithmetic, so the result is identical. Channel groups also return the output without a
    copy (slabs of a several-channel output must be interleaved again): 8 channels at 160x192x160 on a smooth
    field, 2 threads, 427 ms in slabs, 329 ms in channel groups; with one channel per thread slabs are faster.
    """
    threads = torch.get_num_threads()
    if image.device.type != "cpu" or image.shape[0] != 1 or threads < 2 or grid.shape[1] < 2 * threads:
        return F.grid_sample(image, grid, mode="bilinear", padding_mode=padding_mode, align_corners=True)
    k, c = threads, image.shape[1]
    if c % k == 0 and c // k >= 2:
        groups = image.reshape(k, c // k, *image.shape[2:])
        out = F.grid_sample(groups, grid.expand(k, *grid.shape[1:]), mode="bilinear", padding_mode=padding_mode,
                            align_corners=True)  # (k, C / k, ...)
        return out.view(1, c, *out.shape[2:])
    n = grid.shape[1]
    step = -(-n // k)
    if step * k != n:  # equal slabs: repeat the last row of the grid, cropped from the output below
        grid = torch.cat([grid, grid[:, -1:].expand(1, step * k - n, *grid.shape[2:])], dim=1)
    slabs = grid.reshape(k, step, *grid.shape[2:])
    out = F.grid_sample(image.expand(k, *image.shape[1:]), slabs, mode="bilinear", padding_mode=padding_mode,
                        align_corners=True)  # (k, C, step, ...)
    out = out.movedim(0, 1).reshape(1, c, k * step, *out.shape[3:])
    return out[:, :, :n]


def pad_to_divisible(x: torch.Tensor, k: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad the spatial axes of ``x`` ``(B, C, *spatial)`` at their ends to multiples of ``k``.

    Padding at the far end keeps voxel coordinates unchanged, so a DDF computed on the padded grid is
    cropped back with :func:`crop_to` without any shift. Returns the padded tensor and the original size.
    """
    spatial = tuple(x.shape[2:])
    pads: list[int] = []
    for s in reversed(spatial):
        pads += [0, (-s) % k]
    if any(pads):
        x = F.pad(x, pads)
    return x, spatial


def crop_to(x: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """Crop the spatial axes of ``x`` ``(B, C, *spatial')`` back to ``spatial`` (from the origin)."""
    return x[(slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)]
