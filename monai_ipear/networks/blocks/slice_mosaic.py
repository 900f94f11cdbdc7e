"""Trilinear sampling of a 3D volume by PyTorch's vectorised 2D sampler, on a mosaic of the volume's slices.

Why by hand: PyTorch's CPU grid sampler is vectorised for 2D inputs only; its 3D kernel is a scalar loop. Iteration
control warps the moving image at full resolution after every update; with the fields of a real forward at
160x192x160 on the 2-core development CPU one such warp takes 48-59 ms through the 3D kernel (split over both
threads) and 39-49 ms through the mosaic below (about 25 ms of 2D sampling, the rest coordinate arithmetic). No
library offers a vectorised 3D sampler on CPU (MONAI's ``Warp`` and Kornia call ``grid_sample``).

Trilinear interpolation is bilinear interpolation in ``(y, x)`` on the slices ``z0 = floor(z)`` and ``z0 + 1``,
then linear in ``z``. Every slice becomes a tile of a 2D image, with one zero row and one zero column in front
(the zeros padding that the 3D sampler applies at the volume's faces); the mosaic holds two channels per image
channel: tile ``t`` shows slice ``t - 1`` in the first and slice ``t`` in the second, so one 2D sample at the
point's position in tile ``z0 + 1`` reads both slices. Rows of a tile are rows of the slice, so that points next
to each other along ``x`` read memory next to each other (a transposed layout, whose 2D grid would be a view of
the coordinates, sampled 10 ms slower).
"""

from __future__ import annotations

import math

import torch

from ...controllers.samples import select_samples
from .fields import _grid_sample  # the package's grid_sample: one sample split over the threads

__all__ = ["SliceMosaic"]


class SliceMosaic:
    """A 3D image as a mosaic of its slices, sampled trilinearly with ``padding_mode="zeros"`` (``align_corners=True``
    semantics: coordinates in voxels, voxel ``i`` at ``i``).

    Equals ``F.grid_sample(image, grid, "bilinear", "zeros", align_corners=True)`` of the voxel coordinates up to float
    rounding of the positions, which grows with the mosaic's size (float32 pixel coordinates up to ``max(R, C)``): at
    160x192x160 (a 2316 x 2254 mosaic) at most 3.5e-4 voxels on a linear ramp, where the 3D sampler is within 7e-5;
    values agree to that times the image's gradient per voxel. For evaluations without autograd (no gradient flows
    through the mosaic).

    Args:
        image: ``(B, C, D, H, W)``, any float dtype (sampled in float32).
        across: tiles per mosaic row (default: a mosaic about as wide as tall, the best position resolution).

    ``sample(coords, index)``: ``coords`` ``(b, 3, *out_spatial)`` float32 voxel coordinates of the samples
    ``index`` (``(b,)`` long, increasing batch positions; ``None``: all), channel ``i`` = array axis ``i``; returns
    ``(b, C, *out_spatial)`` float32. ``coords`` is overwritten (it is scratch space).
    """

    def __init__(self, image: torch.Tensor, across: int | None = None) -> None:
        if image.ndim != 5:
            raise ValueError(f"SliceMosaic needs a (B, C, D, H, W) image, got shape {tuple(image.shape)}.")
        b, c, d, h, w = image.shape
        self.shape = (d, h, w)
        tiles = d + 2  # tile t = floor(z) + 1 for z in [-1, D]: slices -1 .. D (-1 and D read zeros)
        # tiles of (h + 1) x (w + 1) pixels, as many across as make the mosaic about square (best position resolution)
        self.across = across or max(1, math.ceil(math.sqrt(tiles * (h + 1) / (w + 1))))
        self.down = -(-tiles // self.across)
        slices = torch.as_tensor(image).detach().float()  # a plain tensor (MetaTensor inputs)
        stack = torch.zeros(b, 2, c, self.down * self.across, h + 1, w + 1, dtype=torch.float32, device=image.device)
        stack[:, 0, :, 1 : d + 1, 1:, 1:] = slices  # channel 0: tile t holds slice t - 1
        stack[:, 1, :, 0:d, 1:, 1:] = slices  # channel 1: tile t holds slice t
        stack = stack.view(b, 2 * c, self.down, self.across, h + 1, w + 1).permute(0, 1, 2, 4, 3, 5)
        self.mosaic = stack.reshape(b, 2 * c, self.down * (h + 1), self.across * (w + 1))
        self.channels = c

    def sample(self, coords: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        d, h, w = self.shape
        mosaic = self.mosaic if index is None else select_samples(self.mosaic, index)
        if coords.ndim != 5 or coords.shape[1] != 3 or coords.shape[0] != mosaic.shape[0]:
            raise ValueError(f"coords must be (b, 3, D', H', W') for {mosaic.shape[0]} samples, got {tuple(coords.shape)}.")
        b, out_spatial = coords.shape[0], coords.shape[2:]
        z, y, x = coords.unbind(1)
        # slice pair and weight along z: z in [-1, D] (beyond: zeros, as tile 0 or D + 1 read only zeros)
        z.clamp_(-1.0, float(d))
        tile = z.floor()
        weight = z.sub_(tile)  # z - floor(z), in place: z is not needed again
        tile.add_(1.0)
        # tile_row = floor(tile / across), exact: tile is a whole number, and half a tile keeps the quotient off integers
        tile_row = tile.add(0.5).mul_(1.0 / self.across).floor_()
        tile_col = tile.sub_(tile_row, alpha=self.across)
        # the mosaic's normalised pixel position for align_corners=True (x across, y down), written into the 2D grid;
        # each tile starts with its zero row/column, so y in [-1, H] stays on the tile's data and zeros (beyond: clamped)
        rows, cols = self.mosaic.shape[-2:]
        sx, sy = 2.0 / (cols - 1), 2.0 / (rows - 1)
        grid = torch.empty(b, *out_spatial, 2, dtype=coords.dtype, device=coords.device)
        torch.add(tile_col.mul_((w + 1) * sx).add_(sx - 1.0), x.clamp_(-1.0, float(w)), alpha=sx, out=grid[..., 0])
        torch.add(tile_row.mul_((h + 1) * sy).add_(sy - 1.0), y.clamp_(-1.0, float(h)), alpha=sy, out=grid[..., 1])
        pair = _grid_sample(mosaic, grid.view(b, -1, out_spatial[-1], 2), "zeros")  # (b, 2C, D' * H', W'), threaded
        c = self.channels
        return torch.lerp(pair[:, :c], pair[:, c:], weight.reshape(b, 1, *pair.shape[2:])).view(b, c, *out_spatial)
