"""Preprocessing for registration pairs read from files, built from MONAI dictionary transforms."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import torch
from monai.data import MetaTensor
from monai.transforms import (
    AsDiscreted,
    Compose,
    DivisiblePadd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    ScaleIntensityd,
    Spacingd,
)

from ..booleans import as_bool

__all__ = [
    "registration_pair_transforms", "SameGridCheckd", "FiniteLabelsd", "check_same_grid", "check_image_content",
]

IMAGE_KEYS = ("moving_image", "fixed_image")
LABEL_KEYS = ("moving_label", "fixed_label")


class SameGridCheckd(MapTransform):
    """Refuse a pair whose images are not on one voxel grid (same spatial shape and voxel-to-world affine).

    The networks register arrays voxel by voxel and the outputs carry the fixed image's affine, so a moving image
    on another grid (other shape, spacing, origin or orientation) would give silently wrong geometry. This
    package refuses it (``ValueError`` naming both grids) instead of resampling implicitly: resample or pre-align
    the moving image onto the fixed grid first (CLI: ``--prealign affine``; real scans:
    ``monai_ipear.preprocessing``).

    Args:
        keys: keys to compare with ``reference_key`` (missing keys are skipped with ``allow_missing_keys``).
        reference_key: the fixed image.
        atol: tolerance on the affine entries (mm).
    """

    def __init__(self, keys, reference_key: str = "fixed_image", atol: float = 1e-3,
                 allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reference_key, self.atol = reference_key, float(atol)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if key != self.reference_key:
                check_same_grid(d[key], d[self.reference_key], key, self.reference_key, self.atol)
        return d


def check_same_grid(x: torch.Tensor, ref: torch.Tensor, name: str, ref_name: str, atol: float = 1e-3) -> None:
    """Raise ``ValueError`` unless channel-first ``x`` and ``ref`` have the same spatial shape and (for
    MetaTensors) the same voxel-to-world affine within ``atol``. Used by :class:`SameGridCheckd` and by the CLI
    (``warp`` / ``jacobian`` compare the image or mask with the field's grid)."""
    if tuple(x.shape[1:]) != tuple(ref.shape[1:]):
        raise ValueError(f"{name} {tuple(x.shape[1:])} and {ref_name} {tuple(ref.shape[1:])} are not "
                         "on the same voxel grid: resample or pre-align onto the fixed grid first.")
    if isinstance(ref, MetaTensor) and isinstance(x, MetaTensor):
        aff, ref_aff = x.affine.double(), ref.affine.double()
        if aff.shape != ref_aff.shape or not torch.allclose(aff, ref_aff, rtol=0.0, atol=float(atol)):
            raise ValueError(
                f"{name} and {ref_name} have the same shape but different affines "
                f"({aff.tolist()} vs {ref_aff.tolist()}): not on the same voxel grid; resample or pre-align "
                "onto the fixed grid first.")


class FiniteLabelsd(MapTransform):
    """Refuse label maps holding NaN or Inf (``FloatingPointError`` naming the key and the file): rounding and the
    integer cast of the writers would silently turn them into label 0 or a huge negative value."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        from ..engines.outputs import check_finite

        d = dict(data)
        for key in self.key_iterator(d):
            src = d[key].meta.get("filename_or_obj", "") if isinstance(d[key], MetaTensor) else ""
            check_finite(d[key], f"{key} {src}".strip(), hint="a label map must hold integer label values.")
        return d


def check_image_content(x: torch.Tensor, name: str) -> None:
    """The content check of the images that go through the affine pre-alignment and the pretrained model's
    intensity normalisation (:class:`~monai_ipear.pipeline.RegistrationPipeline`, ``register --prealign affine``):
    refuse NaN/Inf (``FloatingPointError``) and a constant image (``ValueError``: an empty file, or an empty mask,
    leaves nothing to align), which elastix would otherwise fail on with an unrelated "internal elastix error".
    The bundle's own pair transforms keep their documented behaviour (docs/reliability.md: a constant image is
    scaled to 0 and registered to finite outputs; the networks refuse NaN/Inf).

    Args:
        x: the image (any shape), or the image multiplied by its mask.
        name: how the message names it, e.g. ``"the moving image inside its mask"``.
    """
    from ..engines.outputs import check_finite

    check_finite(x, name, hint="replace or mask them (for example set them to 0) before registering.")
    lo, hi = (float(v) for v in torch.aminmax(torch.as_tensor(x)))
    if lo == hi:
        raise ValueError(f"{name} is constant (every voxel {lo:g}): there is nothing to register.")


def registration_pair_transforms(
    image_keys: Sequence[str] = IMAGE_KEYS,
    label_keys: Sequence[str] = LABEL_KEYS,
    reader: str | None = None,
    pixdim: Sequence[float] | None = None,
    divisible_k: int | None = None,
    allow_missing_keys: bool = True,
    check_grid: bool = True,
) -> Compose:
    """Load, scale and (optionally) resample and pad a pair dict of image/label paths.

    - :class:`~monai.transforms.LoadImaged` (``reader=None`` picks nibabel or ITK by file type; ``"NibabelReader"``
      or ``"ITKReader"`` forces one), channel first;
    - optional :class:`~monai.transforms.Spacingd` to ``pixdim`` mm (linear for images, nearest for labels);
    - label maps rounded to the nearest integer (:class:`~monai.transforms.AsDiscreted`; float-valued files);
    - images min-max scaled to [0, 1] (:class:`~monai.transforms.ScaleIntensityd`; a constant image becomes 0, and
      the networks refuse NaN/Inf);
    - optional :class:`~monai.transforms.DivisiblePadd` to multiples of ``divisible_k`` at the far end of each
      axis (``method="end"`` keeps the voxel origin, so the affine is unchanged). The networks pad and crop
      internally, so inference needs no padding; training with batches > 1 of mixed sizes does.

    Label keys missing from the dict are skipped (``allow_missing_keys``). With ``check_grid`` (default) every
    image and label must be on the last image key's (the fixed image's) grid: :class:`SameGridCheckd` refuses
    the pair otherwise.
    """
    image_keys, label_keys = list(image_keys), list(label_keys)
    keys = image_keys + label_keys
    xforms = [LoadImaged(image_keys, reader=reader, image_only=True)]
    if label_keys:  # label maps read as float64: exact for integer labels up to 2**53 (float32: up to 2**24)
        xforms.append(LoadImaged(label_keys, reader=reader, image_only=True, dtype="float64",
                                 allow_missing_keys=allow_missing_keys))
    xforms.append(EnsureChannelFirstd(keys, allow_missing_keys=allow_missing_keys))
    if pixdim is not None:
        xforms.append(
            Spacingd(keys, pixdim=pixdim, mode=["bilinear"] * len(image_keys) + ["nearest"] * len(label_keys),
                     allow_missing_keys=allow_missing_keys)
        )
    if as_bool(check_grid, "check_grid") and len(image_keys) >= 2:
        xforms.append(SameGridCheckd(keys, reference_key=image_keys[-1], allow_missing_keys=allow_missing_keys))
    if label_keys:  # float-valued label maps (1.9999 / 2.0001): nearest integer, not truncation, downstream
        xforms.append(FiniteLabelsd(label_keys, allow_missing_keys=allow_missing_keys))
        xforms.append(AsDiscreted(label_keys, rounding="torchrounding", dtype=torch.float64,
                                  allow_missing_keys=allow_missing_keys))
    xforms.append(ScaleIntensityd(image_keys, minv=0.0, maxv=1.0))
    if divisible_k is not None and divisible_k > 1:
        xforms.append(DivisiblePadd(keys, k=divisible_k, method="end", allow_missing_keys=allow_missing_keys))
    xforms.append(EnsureTyped(image_keys, dtype="float32"))
    if label_keys:  # float64 holds every integer label value up to 2**53 (float32 merges values above 2**24)
        xforms.append(EnsureTyped(label_keys, dtype="float64", allow_missing_keys=allow_missing_keys))
    return Compose(xforms)
