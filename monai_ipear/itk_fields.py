"""Displacement fields for ITK, SimpleITK and ANTs: conversion, writing, reading and applying.

The package's DDF (MONAI's convention) is ``(spatial_dims, *spatial)`` in VOXELS along the array axes of the fixed
image's tensor, pull convention ``warped(x) = moving(x + ddf(x))``. ITK-based tools (ITK, SimpleITK, ANTs) expect
a displacement field image instead: a vector image on the fixed image's grid whose components are PHYSICAL
displacements in millimetres in ITK's LPS world frame, written as a 5D NIfTI ``(X, Y, Z, 1, 3)`` with intent code
1007 (``NIFTI_INTENT_VECTOR``). ITK's displacement fields are pull fields too (``T(p) = p + d(p)`` maps a fixed
point to the moving point to sample), so no inversion is needed:

``d_lps(i) = F . L . ddf(i)`` with ``L`` the linear part of the fixed image's voxel-to-RAS affine and
``F = diag(-1, -1, 1)`` (RAS -> LPS; ``diag(-1, -1)`` in 2D).

When the moving image was affinely pre-aligned (``register --prealign affine``), the mapping from the fixed image
to the ORIGINAL moving image is ``p -> A(p + d(p))``; :func:`write_itk_composite` writes it as one ITK composite
transform (``.h5``: the affine, then the displacement field, applied field first) that ``antsApplyTransforms -t``
and SimpleITK's ``ReadTransform`` apply in one step.

MONAI has no writer for ITK transforms or vector displacement images, so this module uses ITK (already a
dependency) for the files, and MONAI's :class:`~monai.transforms.Resample` for sampling (:func:`apply_field`).
"""

from __future__ import annotations

import os

import numpy as np
import torch

__all__ = [
    "ras_to_lps",
    "ddf_to_itk_displacement",
    "itk_displacement_image",
    "write_itk_displacement_field",
    "write_itk_composite",
    "read_field",
    "LoadedField",
    "apply_field",
    "itk_field_path",
    "itk_composite_path",
]


def ras_to_lps(spatial_dims: int) -> np.ndarray:
    """``diag(-1, -1, 1)`` (3D) or ``diag(-1, -1)`` (2D): NIfTI/MONAI's RAS world axes to ITK's LPS axes."""
    f = np.ones(spatial_dims)
    f[:2] = -1.0
    return np.diag(f)


def itk_field_path(ddf_path: str) -> str:
    """``<pair>_ddf.nii.gz`` -> ``<pair>_ddf_itk.nii.gz`` (the ITK displacement field written next to the DDF)."""
    base = str(ddf_path)
    for ext in (".nii.gz", ".nii"):
        if base.endswith(ext):
            return base[: -len(ext)] + "_itk" + ext
    return base + "_itk.nii.gz"


def itk_composite_path(ddf_path: str) -> str:
    """``<pair>_ddf.nii.gz`` -> ``<pair>_composite.h5`` (affine + displacement field)."""
    base = str(ddf_path)
    for ext in ("_ddf.nii.gz", "_ddf.nii", ".nii.gz", ".nii"):
        if base.endswith(ext):
            return base[: -len(ext)] + "_composite.h5"
    return base + "_composite.h5"


def _geometry(affine, spatial_dims: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Origin, spacing and direction (ITK, LPS) of a voxel-to-RAS ``affine`` ((d+1)x(d+1) or 4x4)."""
    a = np.asarray(affine, dtype=np.float64)
    sd = spatial_dims
    lin, trans = a[:sd, :sd], a[:sd, -1]
    spacing = np.linalg.norm(lin, axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"affine has a zero-length voxel axis: {a.tolist()}")
    f = ras_to_lps(sd)
    return f @ trans, spacing, f @ (lin / spacing)


def _affine_from_itk(image) -> np.ndarray:
    """Voxel-to-RAS affine ((d+1)x(d+1)) of an ITK image."""
    sd = image.GetImageDimension()
    direction = np.asarray(itk_array(image.GetDirection()), dtype=np.float64).reshape(sd, sd)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    f = ras_to_lps(sd)
    out = np.eye(sd + 1)
    out[:sd, :sd] = f @ direction @ np.diag(spacing)
    out[:sd, -1] = f @ origin
    return out


def itk_array(matrix) -> np.ndarray:
    import itk

    return np.asarray(itk.array_from_matrix(matrix))


def ddf_to_itk_displacement(ddf, affine) -> np.ndarray:
    """One DDF ``(spatial_dims, *spatial)`` in voxels -> ``(*spatial, spatial_dims)`` float64 LPS millimetres.

    Args:
        ddf: displacement in voxels along the array axes (tensor or array), pull convention.
        affine: the voxel-to-RAS affine of the grid the DDF lives on (the fixed image's), 4x4 or (d+1)x(d+1).
    """
    d = ddf.detach().cpu().double().numpy() if isinstance(ddf, torch.Tensor) else np.asarray(ddf, dtype=np.float64)
    sd = d.shape[0]
    if d.ndim != sd + 1 or sd not in (2, 3):
        raise ValueError(f"expected a DDF (spatial_dims, *spatial) with spatial_dims 2 or 3, got shape {d.shape}.")
    a = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    m = ras_to_lps(sd) @ a[:sd, :sd]
    return np.einsum("ij,j...->...i", m, d)


def itk_displacement_image(ddf, affine, pixel_type=None):
    """The ITK vector image (``itk.Image[itk.Vector[F, d], d]``) of :func:`ddf_to_itk_displacement` on the grid of
    ``affine`` (origin, spacing and direction in LPS)."""
    import itk

    disp = ddf_to_itk_displacement(ddf, affine)
    sd = disp.shape[-1]
    dtype = np.float32 if pixel_type in (None, itk.F) else np.float64
    # ITK's numpy view is in reversed axis order (z, y, x, component)
    arr = np.ascontiguousarray(np.transpose(disp, tuple(range(sd - 1, -1, -1)) + (sd,)).astype(dtype))
    image = itk.image_from_array(arr, is_vector=True)
    origin, spacing, direction = _geometry(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, sd)
    image.SetOrigin([float(v) for v in origin])
    image.SetSpacing([float(v) for v in spacing])
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(direction)))
    return image


def write_itk_displacement_field(ddf, affine, path: str) -> str:
    """Write one DDF (voxels) as an ITK displacement field: 5D vector NIfTI, intent 1007, LPS millimetres, float32.

    ``antsApplyTransforms -t <path>``, ``sitk.DisplacementFieldTransform`` and ITK's ``DisplacementFieldTransform``
    read it directly. Returns ``path``.
    """
    import itk

    itk.imwrite(itk_displacement_image(ddf, affine), str(path))
    return str(path)


def _read_vector_field(path: str, spatial_dims: int):
    """An ITK displacement field file as ``itk.Image[itk.Vector[itk.F, d], d]`` (whatever precision it was written in)."""
    import itk

    image_type = itk.Image[itk.Vector[itk.F, spatial_dims], spatial_dims]
    reader = itk.ImageFileReader[image_type].New(FileName=str(path))
    reader.Update()
    return reader.GetOutput()


def _read_transforms(path: str) -> list:
    """The transforms of an ITK transform file in single precision, composites flattened, in the order ITK stores
    them (ITK applies them last-first). Single precision: ITK Python wraps vector images of ``float`` only, and
    ITK's readers convert a file's precision."""
    import itk

    reader = itk.TransformFileReaderTemplate[itk.F].New(FileName=str(path))
    reader.Update()
    out = []
    transforms = reader.GetTransformList()
    for i in range(len(transforms)):
        t = itk.down_cast(transforms[i])  # (iterating the list yields untyped SWIG pointers; indexing does not)
        if t.GetNameOfClass() == "CompositeTransform":
            out.extend(itk.down_cast(t.GetNthTransform(i)) for i in range(t.GetNumberOfTransforms()))
        else:
            out.append(t)
    return out


def write_itk_composite(affine_transform, field_path: str, out_path: str) -> str:
    """Write ``p -> A(p + d(p))`` as one ITK composite transform file (``.h5``).

    Args:
        affine_transform: the pre-alignment (fixed physical point -> moving physical point), an ITK transform or
            the path of a transform file (e.g. ``register``'s ``_affine.tfm``).
        field_path: the ITK displacement field (:func:`write_itk_displacement_field`) on the fixed grid.
        out_path: ``.h5`` file to write.

    ITK applies a composite's transforms last-added first: the affine is added first and the displacement field
    second, so a fixed point is displaced first and then mapped by the affine.
    """
    import itk

    if isinstance(affine_transform, (str, os.PathLike)):
        transforms = _read_transforms(str(affine_transform))
        if len(transforms) != 1:
            raise ValueError(f"{affine_transform} holds {len(transforms)} transforms; expected one affine.")
        affine_transform = transforms[0]
    import nibabel as nib

    sd = int(nib.load(str(field_path)).header.get_data_shape()[-1])
    field = _read_vector_field(str(field_path), sd)
    disp = itk.DisplacementFieldTransform[itk.F, sd].New()
    disp.SetDisplacementField(field)
    affine = itk.AffineTransform[itk.F, sd].New()
    affine.SetCenter([float(v) for v in affine_transform.GetCenter()])
    affine.SetMatrix(itk.matrix_from_array(itk_array(affine_transform.GetMatrix()).astype(np.float32)))
    affine.SetTranslation([float(v) for v in affine_transform.GetTranslation()])
    composite = itk.CompositeTransform[itk.F, sd].New()
    composite.AddTransform(affine)
    composite.AddTransform(disp)
    itk.transformwrite([composite], str(out_path), compression=True)
    return str(out_path)


class LoadedField:
    """A field file read by :func:`read_field`.

    Attributes:
        kind: ``"monai-ddf"`` (voxels along array axes, 4D NIfTI ``(*spatial, d)``), ``"itk-displacement"``
            (5D vector NIfTI, LPS mm) or ``"itk-composite"`` (``.h5`` / ``.tfm`` with a displacement field).
        affine: voxel-to-RAS affine ((d+1)x(d+1)) of the output grid (the fixed image's).
        spatial_shape: the output grid's size.
        ddf: ``(1, d, *spatial)`` voxel DDF (``monai-ddf`` only).
        points: ``(d, *spatial)`` RAS millimetres of the moving point each output voxel samples (ITK kinds only).
    """

    def __init__(self, kind, affine, spatial_shape, ddf=None, points=None):
        self.kind, self.affine, self.spatial_shape, self.ddf, self.points = kind, affine, tuple(spatial_shape), ddf, points

    def describe(self) -> str:
        return {
            "monai-ddf": "MONAI DDF (voxels along the array axes)",
            "itk-displacement": "ITK displacement field (LPS millimetres)",
            "itk-composite": "ITK composite transform (affine + displacement field)",
        }[self.kind]


def _grid_points_lps(image) -> np.ndarray:
    """``(N, d)`` LPS physical points of every voxel of an ITK image, x fastest (ITK's buffer order)."""
    sd = image.GetImageDimension()
    size = list(image.GetLargestPossibleRegion().GetSize())
    idx = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in size], indexing="ij"), axis=-1)
    idx = np.transpose(idx, tuple(range(sd - 1, -1, -1)) + (sd,)).reshape(-1, sd)  # z slowest, x fastest
    direction = itk_array(image.GetDirection()).reshape(sd, sd)
    m = direction @ np.diag(np.asarray(image.GetSpacing(), dtype=np.float64))
    return idx @ m.T + np.asarray(image.GetOrigin(), dtype=np.float64)


def _field_points(field_image, affines: list) -> np.ndarray:
    """Moving points (RAS mm, ``(d, *spatial)`` in array order) of ``p -> A_k(...A_1(p + d(p)))``."""
    sd = field_image.GetImageDimension()
    size = list(field_image.GetLargestPossibleRegion().GetSize())
    import itk

    disp = itk.array_view_from_image(field_image).reshape(-1, sd).astype(np.float64)
    pts = _grid_points_lps(field_image) + disp
    for t in affines:  # in application order
        m = itk_array(t.GetMatrix()).reshape(sd, sd)
        pts = pts @ m.T + np.asarray(t.GetOffset(), dtype=np.float64)
    pts = pts @ ras_to_lps(sd).T  # LPS -> RAS (the flip is its own inverse)
    pts = pts.reshape(tuple(reversed(size)) + (sd,))  # (z, y, x, d)
    return np.transpose(pts, (sd,) + tuple(range(sd - 1, -1, -1)))  # (d, x, y, z)


def read_field(path: str) -> LoadedField:
    """Read a field file written by this package (or by ITK / ANTs) and say which form it is.

    - ``.h5`` / ``.tfm`` / ``.txt`` / ``.mat``: an ITK transform file; a composite must contain exactly one
      displacement field transform, applied first (ITK order: added last), and any number of matrix-offset
      transforms (affine, rigid, ...) applied after it. The output grid is the displacement field's.
    - NIfTI with 5 dimensions and intent code 1007 (vector): an ITK displacement field (LPS mm).
    - NIfTI ``(*spatial, d)``: the package's DDF in voxels along the array axes.
    """
    import itk
    import nibabel as nib

    p = str(path)
    if p.endswith((".h5", ".hdf5", ".tfm", ".txt", ".mat")):
        transforms = _read_transforms(p)
        # ITK applies the stored list last-first
        order = list(reversed(transforms))
        fields = [i for i, t in enumerate(order) if t.GetNameOfClass() == "DisplacementFieldTransform"]
        if len(fields) != 1 or fields[0] != 0:
            raise ValueError(f"{p}: expected one displacement field transform applied first, then affine transforms; "
                             f"found {[t.GetNameOfClass() for t in order]} in application order.")
        for t in order[1:]:
            if not t.IsLinear():
                raise ValueError(f"{p}: unsupported transform {t.GetNameOfClass()} after the displacement field.")
        field = order[0].GetDisplacementField()
        return LoadedField("itk-composite", _affine_from_itk(field), tuple(field.GetLargestPossibleRegion().GetSize()),
                           points=_field_points(field, order[1:]))
    header = nib.load(p).header
    if len(header.get_data_shape()) == 5 and int(header["intent_code"]) == 1007:
        field = _read_vector_field(p, int(header.get_data_shape()[-1]))
        return LoadedField("itk-displacement", _affine_from_itk(field),
                           tuple(field.GetLargestPossibleRegion().GetSize()), points=_field_points(field, []))
    img = nib.load(p)
    data = np.asarray(img.dataobj, dtype=np.float32)
    if data.ndim == 4 and data.shape[-1] == 2 and data.shape[2] == 1:  # a 2D DDF is written (H, W, 1, 2)
        data = data[:, :, 0, :]
    sd = data.shape[-1]
    if data.ndim - 1 != sd or sd not in (2, 3):
        raise ValueError(f"{p} is not a displacement field: expected (*spatial, d) voxels or a 5D ITK vector field, "
                         f"got shape {data.shape}.")
    ddf = torch.from_numpy(np.moveaxis(data, -1, 0).copy())[None]
    aff = np.asarray(img.affine, dtype=np.float64)
    if sd == 2:
        aff = aff[np.ix_([0, 1, 3], [0, 1, 3])]
    return LoadedField("monai-ddf", aff, data.shape[:-1], ddf=ddf)


def apply_field(image: torch.Tensor, image_affine, points: torch.Tensor | np.ndarray, mode: str = "bilinear",
                padding_mode: str = "zeros") -> torch.Tensor:
    """Sample ``image`` ``(C, *in_spatial)`` (voxel-to-RAS ``image_affine``) at RAS points ``(d, *out_spatial)``.

    Uses MONAI's :class:`~monai.transforms.Resample` (centred voxel coordinates); the output has the points'
    spatial shape. ``mode="nearest"`` for label maps.
    """
    from monai.transforms import Resample

    pts = torch.as_tensor(np.asarray(points), dtype=torch.float64)
    sd = pts.shape[0]
    a = np.asarray(image_affine.detach().cpu() if isinstance(image_affine, torch.Tensor) else image_affine,
                   dtype=np.float64)
    if a.shape[0] == 4 and sd == 2:
        a = a[np.ix_([0, 1, 3], [0, 1, 3])]
    inv = torch.as_tensor(np.linalg.inv(a))
    vox = torch.einsum("ij,j...->i...", inv[:sd, :sd], pts) + inv[:sd, -1].reshape((sd,) + (1,) * sd)
    centre = torch.tensor([(s - 1) / 2.0 for s in image.shape[1:]], dtype=torch.float64).reshape((sd,) + (1,) * sd)
    grid = torch.cat([vox - centre, torch.ones((1,) + tuple(pts.shape[1:]), dtype=torch.float64)]).float()
    img = image.as_tensor() if hasattr(image, "as_tensor") else torch.as_tensor(image)
    out = Resample(mode=mode, padding_mode=padding_mode, norm_coords=True)(img.float(), grid)
    return out.as_tensor() if hasattr(out, "as_tensor") else out
