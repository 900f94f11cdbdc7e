"""A deterministic synthetic registration-pair generator: the bundle's embedded default data (no download).

A random smooth label map (argmax of Gaussian-smoothed noise channels) is turned into an image with a random
intensity per label, a smooth multiplicative bias field and Gaussian noise. The moving and the fixed image are
made from this template by two different random smooth deformations, so the pair has a known anatomical
correspondence and label maps for Dice. Everything is a function of ``seed``: the same seed gives the same pair
on every machine.

Smoothing uses :class:`monai.networks.layers.GaussianFilter`, warping :class:`monai.networks.blocks.Warp`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.data import MetaTensor
from monai.networks.blocks import Warp
from monai.networks.layers import GaussianFilter
from monai.utils import ensure_tuple_rep

__all__ = ["SyntheticPairGenerator", "SyntheticRegistrationDataset"]


def _smooth_noise(
    channels: int, spatial_size: Sequence[int], sigma: float, generator: torch.Generator
) -> torch.Tensor:
    """``(channels, *spatial_size)`` Gaussian noise smoothed with ``sigma`` voxels, rescaled to unit max-abs."""
    noise = torch.randn(1, channels, *spatial_size, generator=generator)
    smooth = GaussianFilter(len(spatial_size), sigma)(noise)[0]
    scale = smooth.flatten(1).abs().amax(dim=1).clamp_min(1e-8)
    return smooth / scale.view(-1, *([1] * len(spatial_size)))


class SyntheticPairGenerator:
    """Makes synthetic (moving, fixed) image pairs with label maps.

    Args:
        spatial_size: image size, 2 or 3 entries (or one int with ``spatial_dims``).
        spatial_dims: 2 or 3 (used when ``spatial_size`` is an int).
        num_labels: foreground labels in the label map (label 0 is background).
        label_sigma: smoothness of the label map in voxels (larger: bigger, rounder regions).
        deform_sigma: smoothness of the random deformations in voxels.
        max_displacement: peak displacement of each random deformation in voxels (per axis).
        noise_std: standard deviation of additive Gaussian noise (intensities are in [0, 1]).
        bias_strength: peak relative amplitude of the smooth multiplicative bias field.

    ``generator(seed)`` returns a dict of channel-first :class:`~monai.data.MetaTensor` (identity affine):
    ``moving_image``, ``fixed_image`` (float32 in [0, 1], ``(1, *spatial_size)``), ``moving_label``,
    ``fixed_label`` (float32 label indices ``0..num_labels``) and the pair's name under ``pair``.
    """

    def __init__(
        self,
        spatial_size: Sequence[int] | int = 48,
        spatial_dims: int = 3,
        num_labels: int = 4,
        label_sigma: float = 4.0,
        deform_sigma: float = 6.0,
        max_displacement: float = 5.0,
        noise_std: float = 0.03,
        bias_strength: float = 0.2,
    ) -> None:
        if isinstance(spatial_size, int):
            spatial_size = ensure_tuple_rep(spatial_size, spatial_dims)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        if len(self.spatial_size) not in (2, 3):
            raise ValueError(f"spatial_size must have 2 or 3 entries, got {self.spatial_size}.")
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}.")
        self.spatial_dims = len(self.spatial_size)
        self.num_labels = num_labels
        self.label_sigma = label_sigma
        self.deform_sigma = deform_sigma
        self.max_displacement = max_displacement
        self.noise_std = noise_std
        self.bias_strength = bias_strength
        self.warp_linear = Warp(mode="bilinear", padding_mode="border")
        self.warp_nearest = Warp(mode="nearest", padding_mode="border")

    def _deformation(self, g: torch.Generator) -> torch.Tensor:
        """A random smooth DDF ``(1, spatial_dims, *spatial)`` with peak ``max_displacement`` voxels per axis."""
        return self.max_displacement * _smooth_noise(self.spatial_dims, self.spatial_size, self.deform_sigma, g)[None]

    def _image(self, label: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Random intensity per label, a smooth bias field and noise, clipped to [0, 1]; ``(1, *spatial)``."""
        intensities = torch.rand(self.num_labels + 1, generator=g) * 0.8 + 0.2
        intensities[0] = 0.0  # background stays dark, as in skull-stripped scans
        image = intensities[label.long()]
        bias = 1.0 + self.bias_strength * _smooth_noise(1, self.spatial_size, 2 * self.label_sigma, g)
        return image * bias

    def __call__(self, seed: int) -> dict:
        g = torch.Generator().manual_seed(int(seed))
        # labels: argmax over (background, label 1..N) smooth noise; the background channel gets an offset that
        # grows with the distance from the centre so the "anatomy" sits inside the field of view
        logits = _smooth_noise(self.num_labels + 1, self.spatial_size, self.label_sigma, g)
        coords = torch.meshgrid(*[torch.linspace(-1, 1, s) for s in self.spatial_size], indexing="ij")
        radius = torch.sqrt(sum(c**2 for c in coords))
        logits[0] = logits[0] + 3.0 * (radius - 0.75)
        template_label = logits.argmax(0, keepdim=True).float()
        template_image = self._image(template_label[0], g)[None]
        out = {}
        for name in ("moving", "fixed"):
            ddf = self._deformation(g)
            image = self.warp_linear(template_image, ddf)[0]
            label = self.warp_nearest(template_label[None], ddf)[0]
            noise = self.noise_std * torch.randn(image.shape, generator=g)
            image = (image + noise).clamp(0.0, 1.0)
            out[f"{name}_image"] = MetaTensor(image.float(), affine=torch.eye(4, dtype=torch.float64))
            out[f"{name}_label"] = MetaTensor(label.float(), affine=torch.eye(4, dtype=torch.float64))
        out["pair"] = f"synthetic_{int(seed):05d}"
        return out


class SyntheticRegistrationDataset(torch.utils.data.Dataset):
    """``num_pairs`` synthetic pairs made by :class:`SyntheticPairGenerator` with seeds ``seed .. seed + num_pairs - 1``.

    Pairs are generated once and cached in memory (a 48^3 pair is about 2 MB). Keyword arguments go to the
    generator. ``transform`` (optional) is applied to each item dict.
    """

    def __init__(self, num_pairs: int = 16, seed: int = 0, transform=None, **generator_kwargs) -> None:
        self.generator = SyntheticPairGenerator(**generator_kwargs)
        self.seeds = [int(seed) + i for i in range(int(num_pairs))]
        self.transform = transform
        self._cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, index: int) -> dict:
        if index not in self._cache:
            self._cache[index] = self.generator(self.seeds[index])
        item = dict(self._cache[index])
        return self.transform(item) if self.transform is not None else item
