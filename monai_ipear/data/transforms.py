"""Preprocessing for registration pairs read from files, built from MONAI dictionary transforms."""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import (
    Compose,
    DivisiblePadd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    ScaleIntensityd,
    Spacingd,
)

__all__ = ["registration_pair_transforms"]

IMAGE_KEYS = ("moving_image", "fixed_image")
LABEL_KEYS = ("moving_label", "fixed_label")


def registration_pair_transforms(
    image_keys: Sequence[str] = IMAGE_KEYS,
    label_keys: Sequence[str] = LABEL_KEYS,
    reader: str | None = None,
    pixdim: Sequence[float] | None = None,
    divisible_k: int | None = None,
    allow_missing_keys: bool = True,
) -> Compose:
    """Load, scale and (optionally) resample and pad a pair dict of image/label paths.

    - :class:`~monai.transforms.LoadImaged` (``reader=None`` picks nibabel or ITK by file type; ``"NibabelReader"``
      or ``"ITKReader"`` forces one), channel first;
    - optional :class:`~monai.transforms.Spacingd` to ``pixdim`` mm (linear for images, nearest for labels);
    - images min-max scaled to [0, 1] (:class:`~monai.transforms.ScaleIntensityd`);
    - optional :class:`~monai.transforms.DivisiblePadd` to multiples of ``divisible_k`` at the far end of each
      axis (``method="end"`` keeps the voxel origin, so the affine is unchanged). The networks pad and crop
      internally, so inference needs no padding; training with batches > 1 of mixed sizes does.

    Label keys missing from the dict are skipped (``allow_missing_keys``).
    """
    image_keys, label_keys = list(image_keys), list(label_keys)
    keys = image_keys + label_keys
    xforms = [
        LoadImaged(keys, reader=reader, image_only=True, allow_missing_keys=allow_missing_keys),
        EnsureChannelFirstd(keys, allow_missing_keys=allow_missing_keys),
    ]
    if pixdim is not None:
        xforms.append(
            Spacingd(keys, pixdim=pixdim, mode=["bilinear"] * len(image_keys) + ["nearest"] * len(label_keys),
                     allow_missing_keys=allow_missing_keys)
        )
    xforms.append(ScaleIntensityd(image_keys, minv=0.0, maxv=1.0))
    if divisible_k is not None and divisible_k > 1:
        xforms.append(DivisiblePadd(keys, k=divisible_k, method="end", allow_missing_keys=allow_missing_keys))
    xforms.append(EnsureTyped(keys, dtype="float32", allow_missing_keys=allow_missing_keys))
    return Compose(xforms)
