"""Affine (and B-spline) registration of voxel arrays with elastix (``itk-elastix``, optional extra ``prealign``).

Why elastix and not ANTs: ``itk-elastix`` installs as one wheel on top of the ``itk`` this package already
needs, with no pinned numpy/scipy (``antspyx`` 0.6 pins ``numpy<2.4`` and ``scipy<1.16``, which would downgrade
the environment), and it is a well-kept ITK module. Nothing here is a hand-written optimiser or resampler:
elastix estimates the transform and transformix resamples or produces the displacement field.

Arrays are handed to ITK in voxel grids with origin 0, identity direction and the given spacing, so the
result does not depend on how scanner headers place the head; the transform is initialised at the centres of
gravity. Both images must share the axis orientation (use ``Orientationd`` first). Arrays are ``(*spatial)``
numpy/torch, axis order as in MONAI; ITK sees them reversed (``itk.image_from_array``), which is undone here.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence

import numpy as np
import torch
from monai.utils import optional_import

itk, has_itk = optional_import("itk")

__all__ = ["has_elastix", "ElastixResult", "elastix_register", "elastix_resample", "elastix_ddf"]


def has_elastix() -> bool:
    """True when ``itk-elastix`` is importable (``itk.elastix_registration_method`` exists)."""
    return bool(has_itk) and hasattr(itk, "elastix_registration_method")


def _require() -> None:
    if not has_elastix():
        raise ImportError("elastix registration needs the optional extra: pip install 'monai-ipear[prealign]' (itk-elastix).")


def _to_itk(array, spacing: Sequence[float] | None):
    arr = np.ascontiguousarray(torch.as_tensor(array).detach().cpu().numpy().astype(np.float32))
    image = itk.image_from_array(arr)
    if spacing is not None:
        image.SetSpacing([float(s) for s in reversed(list(spacing))])
    return image


class ElastixResult:
    """Transform parameters of one elastix run (``itk.ParameterObject``) and the fixed grid they live on.

    ``matrix``/``translation``: for affine transforms, the map fixed point -> moving point in voxel-grid mm
    (``y = matrix @ (x - c) + c + translation``, MONAI axis order, ``c`` = ``center``).
    """

    def __init__(self, parameters, fixed_shape: Sequence[int], spacing: Sequence[float] | None) -> None:
        self.parameters = parameters
        self.fixed_shape = tuple(int(s) for s in fixed_shape)
        self.spacing = tuple(float(s) for s in spacing) if spacing is not None else (1.0,) * len(self.fixed_shape)

    def _affine_parts(self):
        n = len(self.fixed_shape)
        p = self.parameters.GetParameterMap(self.parameters.GetNumberOfParameterMaps() - 1)
        if p["Transform"][0] != "AffineTransform":
            raise ValueError(f"not an affine transform: {p['Transform'][0]}")
        values = np.array([float(v) for v in p["TransformParameters"]])
        m_itk, t_itk = values[: n * n].reshape(n, n), values[n * n :]
        c_itk = np.array([float(v) for v in p["CenterOfRotationPoint"]])
        rev = list(range(n - 1, -1, -1))  # ITK (x, y, z) -> MONAI axis order
        return m_itk[np.ix_(rev, rev)], t_itk[rev], c_itk[rev]

    @property
    def matrix(self) -> np.ndarray:
        return self._affine_parts()[0]

    @property
    def translation(self) -> np.ndarray:
        return self._affine_parts()[1]

    @property
    def center(self) -> np.ndarray:
        return self._affine_parts()[2]


def elastix_register(
    moving,
    fixed,
    spacing: Sequence[float] | None = None,
    transform: str = "affine",
    num_iterations: int = 256,
    num_resolutions: int = 3,
    seed: int = 0,
    num_threads: int | None = None,
    metric: str = "AdvancedMattesMutualInformation",
) -> ElastixResult:
    """Estimate the transform mapping ``fixed`` voxel-grid points to ``moving`` (elastix, multi-resolution).

    Args:
        moving, fixed: ``(*spatial)`` arrays (2D or 3D); shapes may differ.
        spacing: voxel size in mm, MONAI axis order (default 1); both images are assumed to share it.
        transform: elastix default map name: ``"translation"``, ``"rigid"``, ``"affine"`` or ``"bspline"``
            (B-spline runs after an affine stage).
        num_iterations: optimiser iterations per resolution.
        num_resolutions: pyramid levels.
        seed: elastix ``RandomSeed`` of the sampler (runs are repeatable for a fixed seed and thread count).
        num_threads: ITK threads (default: ITK's).
        metric: elastix metric (``AdvancedMattesMutualInformation`` or ``AdvancedNormalizedCorrelation``).
    """
    _require()
    fixed_itk, moving_itk = _to_itk(fixed, spacing), _to_itk(moving, spacing)
    po = itk.ParameterObject.New()
    stages = ["affine", "bspline"] if transform == "bspline" else [transform]
    for stage in stages:
        pm = po.GetDefaultParameterMap(stage, num_resolutions)
        pm["MaximumNumberOfIterations"] = [str(int(num_iterations))]
        pm["Metric"] = [metric] + list(pm["Metric"])[1:]
        pm["RandomSeed"] = [str(int(seed))]
        pm["WriteResultImage"] = ["false"]
        if stage != "bspline":
            pm["AutomaticTransformInitialization"] = ["true"]
            pm["AutomaticTransformInitializationMethod"] = ["CenterOfGravity"]
        po.AddParameterMap(pm)
    kwargs = {"parameter_object": po, "log_to_console": False}
    if num_threads is not None:
        kwargs["number_of_threads"] = int(num_threads)
    _, params = itk.elastix_registration_method(fixed_itk, moving_itk, **kwargs)
    return ElastixResult(params, np.shape(fixed), spacing)


def elastix_resample(moving, result: ElastixResult, mode: str = "bilinear", spacing: Sequence[float] | None = None) -> np.ndarray:
    """Resample ``moving`` ``(*spatial)`` onto the fixed grid of ``result`` with transformix.

    ``mode``: ``"bilinear"`` (linear interpolation, images) or ``"nearest"`` (label maps). Outside: 0.
    """
    _require()
    po = itk.ParameterObject.New()
    for i in range(result.parameters.GetNumberOfParameterMaps()):
        pm = result.parameters.GetParameterMap(i)
        if mode == "nearest":
            pm["ResampleInterpolator"] = ["FinalNearestNeighborInterpolator"]
            pm["ResultImagePixelType"] = ["float"]
        else:
            pm["ResampleInterpolator"] = ["FinalLinearInterpolator"]
        pm["DefaultPixelValue"] = ["0"]
        po.AddParameterMap(pm)
    out = itk.transformix_filter(_to_itk(moving, spacing if spacing is not None else result.spacing), po, log_to_console=False)
    return np.asarray(itk.array_from_image(out), dtype=np.float32)


def elastix_ddf(result: ElastixResult, moving) -> torch.Tensor:
    """The transform of ``result`` as a MONAI DDF ``(spatial_dims, *fixed_shape)`` in voxels (pull convention:
    ``warped(x) = moving(x + ddf(x))``, as transformix defines its deformation field)."""
    _require()
    # transformix writes deformationField.nii into its output directory, the working directory by default
    with tempfile.TemporaryDirectory() as scratch:
        field = itk.transformix_deformation_field(_to_itk(moving, result.spacing), result.parameters,
                                                  log_to_console=False, output_directory=scratch)
    arr = np.asarray(itk.array_from_image(field), dtype=np.float32)  # (*spatial, n) in mm, ITK component order
    n = arr.shape[-1]
    comps = [arr[..., n - 1 - i] / result.spacing[i] for i in range(n)]
    return torch.from_numpy(np.stack(comps))
