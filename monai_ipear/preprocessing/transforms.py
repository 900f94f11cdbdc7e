"""Preprocessing of real scans for registration, as MONAI dictionary transforms.

The chain :func:`real_scan_preprocessing` builds (each step a MONAI transform, usable from bundle configs):

1. load, channel first, a common orientation (``LoadImaged``, ``EnsureChannelFirstd``, ``Orientationd``);
2. brain masking from a given mask or label map (``MaskIntensityd``: voxels where the mask is > 0 are kept);
3. affine pre-alignment of the moving subject to a fixed image or template (:class:`AffinePrealignd`,
   elastix; the only step MONAI has no transform for);
4. a common box: ``CropForegroundd`` around the fixed (template) mask with a margin, sizes rounded up to a
   multiple of ``k_divisible``, then ``ResizeWithPadOrCropd`` to a fixed ``spatial_size`` when given;
5. intensity scaling to [0, 1] between robust percentiles (``ScaleIntensityRangePercentilesd``).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    MaskIntensityd,
    Orientationd,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
)
from monai.utils import ensure_tuple_rep

from ..booleans import as_bool
from .elastix import elastix_register, elastix_resample

__all__ = ["AffinePrealignd", "real_scan_preprocessing"]


class AffinePrealignd(MapTransform):
    """Affinely pre-align the moving subject to a fixed image (or template) with elastix and resample its keys
    onto the fixed grid.

    Args:
        keys: the moving subject's keys to resample (images and label maps), ``(C, *spatial)`` each.
        moving_key: the image that drives the registration (e.g. the masked moving image).
        fixed_key: the fixed image / template ``(C, *spatial)``; its grid, affine and metadata are given to
            the resampled keys.
        mode: ``"bilinear"`` or ``"nearest"`` per key (use nearest for label maps).
        transform: ``"rigid"`` or ``"affine"`` (elastix default maps; ``"bspline"`` would add a deformable stage).
        num_iterations, num_resolutions, seed, metric: see :func:`~monai_ipear.preprocessing.elastix.elastix_register`.
        result_key: where to store the :class:`~monai_ipear.preprocessing.elastix.ElastixResult` (``None``: not kept).

    Spacing comes from the fixed image's affine (MetaTensor) or is 1 mm. Both images must share the axis
    orientation (``Orientationd`` first). Needs the optional extra ``prealign`` (itk-elastix).
    """

    def __init__(
        self,
        keys: KeysCollection,
        moving_key: str,
        fixed_key: str,
        mode: Sequence[str] | str = "bilinear",
        transform: str = "affine",
        num_iterations: int = 256,
        num_resolutions: int = 3,
        seed: int = 0,
        metric: str = "AdvancedMattesMutualInformation",
        result_key: str | None = "prealign_result",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.moving_key, self.fixed_key = moving_key, fixed_key
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.transform, self.num_iterations, self.num_resolutions = transform, num_iterations, num_resolutions
        self.seed, self.metric, self.result_key = seed, metric, result_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        fixed = d[self.fixed_key]
        spatial_dims = fixed.ndim - 1
        spacing = None
        if isinstance(fixed, MetaTensor):
            spacing = [float(s) for s in np.sqrt((np.asarray(fixed.affine)[:spatial_dims, :spatial_dims] ** 2).sum(0))]
        result = elastix_register(
            d[self.moving_key][0], fixed[0], spacing, self.transform, self.num_iterations, self.num_resolutions,
            self.seed, metric=self.metric,
        )
        for key, mode in self.key_iterator(d, self.mode):
            img = d[key]
            out = torch.stack([torch.from_numpy(elastix_resample(c, result, mode)) for c in torch.as_tensor(img)])
            if isinstance(fixed, MetaTensor):
                out = MetaTensor(out, affine=fixed.affine.clone(), meta=dict(fixed.meta))
            d[key] = out
        if self.result_key is not None:
            d[self.result_key] = result
        return d


def real_scan_preprocessing(
    image_key: str = "image",
    label_key: str | None = "label",
    mask_key: str | None = None,
    template_image_key: str | None = "template_image",
    template_mask_key: str | None = "template_mask",
    load: bool = True,
    axcodes: str = "RAS",
    margin: int = 4,
    k_divisible: int = 16,
    spatial_size: Sequence[int] | None = None,
    lower_percentile: float = 0.5,
    upper_percentile: float = 99.5,
    transform: str = "affine",
    num_iterations: int = 256,
    seed: int = 0,
) -> Compose:
    """One subject -> masked, pre-aligned to the template, boxed and scaled (see the module docstring).

    Args:
        image_key, label_key: the subject's image and (optional) label map.
        mask_key: brain mask key; ``None`` uses the label map (label > 0 is brain).
        template_image_key, template_mask_key: the template (already masked) and its brain mask, loaded from the
            same dict; ``template_image_key=None`` skips pre-alignment (the subject is its own frame) and the box
            is taken around the subject's own mask.
        load: start with ``LoadImaged`` + ``EnsureChannelFirstd`` + ``Orientationd`` (False when the dict holds
            arrays already).
        margin, k_divisible: ``CropForegroundd`` margin (voxels) and size multiple of the box.
        spatial_size: optional final box (``ResizeWithPadOrCropd``).
        lower_percentile, upper_percentile: intensity window mapped to [0, 1] (clipped).
        transform, num_iterations, seed: pre-alignment settings (:class:`AffinePrealignd`).
    """
    mask_key = mask_key or label_key
    if mask_key is None:
        raise ValueError("brain masking needs mask_key or label_key.")
    subject = [k for k in (image_key, label_key, mask_key) if k is not None]
    subject = list(dict.fromkeys(subject))
    template = [k for k in (template_image_key, template_mask_key) if k is not None]
    all_keys = subject + template
    modes = ["bilinear" if k == image_key else "nearest" for k in subject]
    xforms: list = []
    if as_bool(load, "load"):
        xforms += [LoadImaged(all_keys, image_only=True), EnsureChannelFirstd(all_keys), Orientationd(all_keys, axcodes)]
    xforms.append(MaskIntensityd(image_key, mask_key=mask_key))
    box_source = mask_key
    if template_image_key is not None:
        xforms.append(AffinePrealignd(subject, image_key, template_image_key, mode=modes, transform=transform,
                                      num_iterations=num_iterations, seed=seed, result_key=None))
        box_source = template_mask_key or mask_key
    xforms.append(CropForegroundd(subject + [box_source] if box_source not in subject else subject, source_key=box_source,
                                  margin=margin, k_divisible=k_divisible, allow_smaller=True))
    if spatial_size is not None:
        xforms.append(ResizeWithPadOrCropd(subject, spatial_size=spatial_size))
    xforms.append(ScaleIntensityRangePercentilesd(image_key, lower_percentile, upper_percentile, 0.0, 1.0, clip=True))
    xforms.append(EnsureTyped(subject, dtype=torch.float32, track_meta=True))
    return Compose(xforms)
