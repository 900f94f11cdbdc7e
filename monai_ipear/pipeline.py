"""Register two brain MRIs end to end: :class:`RegistrationPipeline` (behind ``register`` and the bundle's
``register`` run).

Given a fixed and a moving scan in any storage order, spacing and intensity range (optionally with brain masks
and a moving label map), the pipeline presents the pair to the network the way the packaged model was trained
(``python -m monai_ipear.preprocessing`` on IXI) and returns ONE displacement field on the fixed image's own
full-resolution grid:

1. read (``LoadImage``, channel first; any reader MONAI has), mask (``MaskIntensity``, mask > 0);
2. the working grid: the fixed mask (or fixed image > 0) reoriented to RAS (``Orientation``), resampled to the
   model's spacing (``Spacing``) and boxed (``CropForeground``: margin 4 voxels, sizes a multiple of 16);
3. affine pre-alignment of the masked moving image to the masked fixed image on that grid (elastix, Mattes MI,
   as the training data; ``prealign="none"`` trusts the scanner coordinates);
4. both images resampled onto the working grid (one interpolation each from the native files, Gaussian
   anti-aliasing where the file is finer than the model's spacing) and scaled to [0, 1] between the 0.5 and 99.5
   percentiles of the box (``ScaleIntensityRangePercentiles``);
5. the network (iPEAR with TCI) -> a field ``u`` on the working grid;
6. composition: the field on the fixed grid ``ddf`` with ``moving point (world) = T(A_F (x + ...))`` written
   below; the moving image and labels are sampled ONCE through it, in their original units.

Field convention (MONAI's DDF, extended to a moving image on any grid): ``ddf`` has shape
``(spatial_dims, *fixed_shape)``, voxel units of the fixed array, pull: the moving image's value at fixed voxel
``x`` is read at the world point ``A_F @ (x + ddf(x))`` (``A_F``: the fixed file's voxel-to-world affine).
When the moving image lies on the fixed grid (same shape and affine) this is exactly
``monai.networks.blocks.Warp``'s ``moving(x + ddf(x))``; for a moving image on another grid,
:func:`warp_to_fixed` samples it at ``A_M^-1 A_F (x + ddf(x))``. ``ddf_to_mm(ddf, A_F)`` gives world
millimetres. With ``u`` the network's field (working voxels), ``A_W`` the working grid's affine and ``T`` the
pre-alignment (fixed world -> moving world), ``A_F (x + ddf(x)) = T(A_F x + A_W_lin u(A_W^-1 A_F x))``; outside
the box ``u`` is extended by its border values (continuous, no folding at the box's edge).

Sampling uses MONAI's :class:`~monai.transforms.Resample` (torch ``grid_sample``) on coordinates computed from
the affines; the only hand-written part is that coordinate algebra, which MONAI's ``SpatialResample`` cannot do
for a displacement field followed by an affine.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    CropForeground,
    EnsureChannelFirst,
    GaussianSmooth,
    LoadImage,
    Orientation,
    Resample,
    ScaleIntensityRangePercentiles,
    Spacing,
)

from .booleans import as_bool
from .controllers import controller_from_spec
from .data.transforms import check_image_content
from .pretrained import DEFAULT_PREPROCESSING, load_pretrained
from .runtime import reduced_precision

__all__ = ["RegistrationPipeline", "set_iteration_control", "iteration_control", "warp_to_fixed", "save_nifti",
           "resample_at", "index_grid", "PREALIGN_CHOICES"]

PREALIGN_CHOICES = ("affine", "none")
_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def set_iteration_control(network: torch.nn.Module, iterations: str | int) -> torch.nn.Module:
    """Give ``network`` (or the network a wrapper such as the bundle's ``ExportableRegistrationNet`` holds) the
    controller of ``iterations`` (``"tci"`` or ``k`` updates per level, :func:`controller_from_spec`); returns it.

    Raises:
        ValueError: an unknown ``iterations``, or a network without iteration control.
    """
    controller = controller_from_spec(iterations)
    _control_target(network).controller = controller
    return network


@contextlib.contextmanager
def iteration_control(network: torch.nn.Module, iterations: str | int | None):
    """:func:`set_iteration_control` for the duration of a ``with`` block; the network's own controller comes back
    afterwards, also when the block raises. ``iterations=None`` changes nothing."""
    if iterations is None:
        yield network
        return
    target = _control_target(network)
    own = target.controller
    set_iteration_control(network, iterations)
    try:
        yield network
    finally:
        target.controller = own


def _control_target(network: torch.nn.Module) -> torch.nn.Module:
    """The module whose ``controller`` the iteration settings change: ``network`` or the network it wraps."""
    target = network if hasattr(network, "controller") else getattr(network, "network", None)
    if target is None or not hasattr(target, "controller"):
        raise ValueError(f"{type(network).__name__} has no iteration control: 'iterations' does not apply.")
    return target


def index_grid(shape: Sequence[int]) -> torch.Tensor:
    """Voxel indices ``(spatial_dims, *shape)`` float32 (channel ``i`` = index along axis ``i``)."""
    return torch.stack(torch.meshgrid(*[torch.arange(int(s), dtype=torch.float32) for s in shape], indexing="ij"))


def _apply_affine(matrix: torch.Tensor | np.ndarray, coords: torch.Tensor) -> torch.Tensor:
    """``matrix`` ((d+1) x (d+1)) applied to points ``coords`` ``(d, *spatial)``."""
    m = torch.as_tensor(np.asarray(matrix, dtype=np.float64))
    d = coords.shape[0]
    lin, shift = m[:d, :d].float(), m[:d, d].float()
    return torch.einsum("ij,j...->i...", lin, coords) + shift.view(d, *[1] * d)


def resample_at(image: torch.Tensor, coords: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
    """Sample ``image`` ``(C, *in_shape)`` at voxel coordinates ``coords`` ``(d, *out_shape)`` (index units of
    ``image``) -> ``(C, *out_shape)`` float32, with MONAI's :class:`~monai.transforms.Resample`.

    Same sampling as :class:`monai.networks.blocks.Warp` (voxel ``i`` sits at coordinate ``i``; ``"zeros"``
    padding blends with 0 beyond the border voxels).
    """
    img = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
    d = coords.shape[0]
    centre = torch.tensor([(s - 1) / 2.0 for s in img.shape[1:]], dtype=torch.float32).view(d, *[1] * d)
    grid = torch.cat([coords.float() - centre, torch.ones_like(coords[:1], dtype=torch.float32)])
    # norm_coords: centred coordinates scaled by 2/size, i.e. grid_sample with align_corners=False, which puts
    # voxel i exactly at coordinate i
    out = Resample(mode=mode, padding_mode=padding_mode, norm_coords=True, align_corners=False)(
        img.float(), grid=grid)
    return out.as_tensor() if isinstance(out, MetaTensor) else torch.as_tensor(out)


def _affine(x) -> np.ndarray:
    if isinstance(x, MetaTensor):
        return np.asarray(x.affine, dtype=np.float64)
    raise TypeError("a MetaTensor with an affine is required")


def warp_to_fixed(moving: MetaTensor, ddf: torch.Tensor, fixed_affine, mode: str = "bilinear",
                  padding_mode: str = "zeros") -> torch.Tensor:
    """Apply a field of this module's convention to a moving image on ANY grid.

    Args:
        moving: ``(C, *moving_shape)`` MetaTensor (its affine places it in world coordinates).
        ddf: ``(spatial_dims, *fixed_shape)`` voxels of the fixed grid.
        fixed_affine: the fixed grid's voxel-to-world affine.
        mode: ``"bilinear"`` (images) or ``"nearest"`` (label maps).

    Returns ``(C, *fixed_shape)``: ``moving`` sampled at ``A_M^-1 A_F (x + ddf(x))``; equal to
    ``Warp(mode)(moving, ddf)`` when ``moving`` is on the fixed grid.
    """
    a_f = np.asarray(fixed_affine, dtype=np.float64)
    to_moving = np.linalg.inv(_affine(moving)) @ a_f
    coords = _apply_affine(to_moving, index_grid(ddf.shape[1:]) + ddf.float().cpu())
    return resample_at(moving, coords, mode, padding_mode)


def save_nifti(array: torch.Tensor, affine, path: str, dtype=np.float32) -> None:
    """Write ``array`` ``(C, *spatial)`` (one channel: a plain volume; several: channel-last) with ``affine``.

    MONAI's ``NibabelWriter`` without ``set_metadata``: in MONAI 1.6 that call resamples a single-channel
    volume as if it were 2D and fails (or misbehaves) for affines that permute axes (sagittal storage), even with
    ``resample=False``; the affine is the fixed file's own, so no resampling is wanted anyway.
    """
    from monai.data import NibabelWriter

    writer = NibabelWriter(output_dtype=dtype)
    writer.set_data_array(torch.as_tensor(array).detach().cpu(), channel_dim=0)
    writer.affine = torch.as_tensor(np.asarray(affine, dtype=np.float64))
    writer.write(path, verbose=False)


def _spacing(affine: np.ndarray) -> np.ndarray:
    d = affine.shape[0] - 1
    return np.sqrt((affine[:d, :d] ** 2).sum(0))


class RegistrationPipeline:
    """The whole registration of two scans with a pretrained network (see the module docstring).

    Args:
        model: a pretrained file (:mod:`monai_ipear.pretrained` format); default: the packaged model.
        network: instead of ``model``, any module ``network(moving, fixed) -> ddf`` ``(B, d, *spatial)`` in
            voxels (e.g. an iPEAR trained on the bundle), used with ``metadata``.
        metadata: spacing and preprocessing for ``network`` (default: the packaged model's settings).
        prealign: ``"affine"`` (default, elastix) or ``"none"``.
        device: where the network runs (default: CUDA when available).
        prealign_iterations: elastix iterations per resolution (default: the model's preprocessing, 256).
        iterations: the network's iteration control, ``"tci"`` or ``k`` updates at every pyramid level
            (:func:`~monai_ipear.controllers.controller_from_spec`; sets ``network.controller``); default: the
            network's own (TCI for the packaged model).
        autocast: run the network under ``torch.autocast`` (bfloat16 on CPU, float16 on CUDA:
            :func:`~monai_ipear.runtime.reduced_precision`); the field is returned in float32. Faster on CPUs with
            native bfloat16 and on GPUs; its agreement with float32 for the packaged model: docs/pretrained.md.

    ``pipeline(fixed, moving, fixed_mask=None, moving_mask=None, moving_label=None)`` takes file paths or
    channel-first MetaTensors and returns a dict: ``ddf`` ``(d, *fixed_shape)``, ``warped_image`` (original
    units), ``warped_label`` (with a moving label map), ``fixed_affine``, ``prealign`` (4x4 world map, fixed ->
    moving), ``working_affine`` / ``working_shape``, ``working_ddf`` (the network's field), ``iterations``
    (updates per level, level 1 first), ``folding_pct`` (% det J <= 0 of ``ddf`` in the fixed mask, or over the
    grid without a mask), ``times`` (s) and ``summary`` (one line). :meth:`write` saves the files.
    ``last`` holds the working geometry of the pair being registered (``working_affine``, ``working_shape``,
    ``prealign``) as soon as it is known.
    """

    def __init__(
        self,
        model: str | None = None,
        network: torch.nn.Module | None = None,
        metadata: dict | None = None,
        prealign: str = "affine",
        device: torch.device | str | None = None,
        prealign_iterations: int | None = None,
        iterations: str | int | None = None,
        autocast: bool = False,
    ) -> None:
        if prealign not in PREALIGN_CHOICES:
            raise ValueError(f"prealign must be one of {PREALIGN_CHOICES}, got {prealign!r}.")
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda:0" if torch.cuda.is_available() else "cpu")
        if network is None:
            network, metadata = load_pretrained(model, self.device)
        self.network = network.to(self.device).eval()
        self.autocast = as_bool(autocast, "autocast")
        if iterations is not None:
            set_iteration_control(self.network, iterations)
        meta = dict(metadata or {})
        self.metadata = meta
        pre = meta.get("preprocessing", DEFAULT_PREPROCESSING)
        self.spacing = tuple(float(s) for s in meta.get("spacing", (2.0, 2.0, 2.0)))
        self.axcodes = pre.get("axcodes", "RAS")
        self.margin = int(pre.get("box", {}).get("margin_voxels", 4))
        self.k_divisible = int(pre.get("box", {}).get("k_divisible", 16))
        inten = pre.get("intensity", DEFAULT_PREPROCESSING["intensity"])
        self.scale = ScaleIntensityRangePercentiles(
            float(inten["lower_percentile"]), float(inten["upper_percentile"]), float(inten["b_min"]),
            float(inten["b_max"]), clip=bool(inten.get("clip", True)))
        pa = pre.get("prealign", DEFAULT_PREPROCESSING["prealign"])
        self.prealign = prealign
        self.prealign_iterations = int(prealign_iterations or pa.get("num_iterations", 256))
        self.prealign_resolutions = int(pa.get("num_resolutions", 3))
        self.prealign_metric = pa.get("metric", "AdvancedMattesMutualInformation")
        self.last: dict = {}

    # ---------------------------------------------------------------- inputs
    @staticmethod
    def load(x, what: str = "image") -> MetaTensor:
        """A path or array -> channel-first float32 MetaTensor with its affine."""
        if isinstance(x, (str, os.PathLike)):
            if not os.path.isfile(str(x)):
                raise FileNotFoundError(f"{what} file not found: {x}")
            x = LoadImage(image_only=True)(str(x))
            x = EnsureChannelFirst()(x)
        if not isinstance(x, MetaTensor):
            raise TypeError(f"{what}: a file path or a channel-first MetaTensor is required, got {type(x).__name__}.")
        return x.float() if x.dtype != torch.float32 else x

    @staticmethod
    def _check_same_grid(a: MetaTensor, b: MetaTensor, what: str) -> None:
        if tuple(a.shape[1:]) != tuple(b.shape[1:]) or not np.allclose(_affine(a), _affine(b), atol=1e-3):
            raise ValueError(f"{what} is not on its image's grid (shape {tuple(b.shape[1:])} vs {tuple(a.shape[1:])} "
                             "or different affine).")

    def _sd(self, x: MetaTensor) -> int:
        return x.ndim - 1

    # ---------------------------------------------------------------- geometry
    def working_grid(self, box_source: MetaTensor) -> tuple[np.ndarray, tuple[int, ...]]:
        """Affine and shape of the working grid: ``box_source`` (> 0 inside) in RAS at the model's spacing,
        boxed with the margin and rounded up to a multiple of ``k_divisible``."""
        sd = self._sd(box_source)
        m = (box_source > 0).float()
        m = Orientation(axcodes=self.axcodes[:sd], labels=_LABELS[:sd])(m)
        m = Spacing(pixdim=self.spacing[:sd], mode="nearest")(m)
        if not bool((m > 0).any()):
            raise ValueError("the fixed mask (or the fixed image, without a mask) is empty.")
        m = CropForeground(select_fn=lambda v: v > 0, margin=self.margin, k_divisible=self.k_divisible,
                           allow_smaller=False)(m)
        return np.asarray(m.affine, dtype=np.float64), tuple(int(s) for s in m.shape[1:])

    def _smooth_for(self, image: MetaTensor) -> torch.Tensor:
        """Gaussian anti-aliasing (sigma = (factor - 1) / 2 voxels per axis) where the image is finer than the model."""
        sd = self._sd(image)
        target = float(np.mean(self.spacing[:sd]))
        sigma = [max(0.0, (target / s - 1.0) / 2.0) for s in _spacing(_affine(image))]
        if max(sigma) < 0.1:
            return image.as_tensor()
        return torch.as_tensor(GaussianSmooth(sigma=sigma)(image.as_tensor()))

    def _onto(self, image_t: torch.Tensor, image_affine: np.ndarray, world_map: np.ndarray, affine: np.ndarray,
              shape: Sequence[int], mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
        """``image`` sampled on the grid (affine, shape) through ``world_map`` (grid world -> image world)."""
        to_image = np.linalg.inv(image_affine) @ world_map @ affine
        return resample_at(image_t, _apply_affine(to_image, index_grid(shape)), mode, padding_mode)

    def _prealign(self, moving_masked: MetaTensor, fixed_w: torch.Tensor, a_w: np.ndarray) -> np.ndarray:
        """Elastix affine of the masked moving image (RAS, model spacing) onto the masked fixed working image;
        returns the world map fixed -> moving ((d+1) x (d+1))."""
        from .preprocessing.elastix import elastix_register, has_elastix

        if not has_elastix():
            raise ImportError("affine pre-alignment needs itk-elastix (pip install itk-elastix), or prealign='none'.")
        sd = self._sd(moving_masked)
        m = MetaTensor(self._smooth_for(moving_masked), affine=moving_masked.affine)
        m = Orientation(axcodes=self.axcodes[:sd], labels=_LABELS[:sd])(m)
        m = Spacing(pixdim=self.spacing[:sd], mode="bilinear")(m)
        result = elastix_register(m[0], fixed_w[0], self.spacing[:sd], "affine", self.prealign_iterations,
                                  self.prealign_resolutions, metric=self.prealign_metric)
        h = np.eye(sd + 1)
        h[:sd, :sd] = result.matrix
        h[:sd, sd] = result.center + result.translation - result.matrix @ result.center
        s = np.diag(list(self.spacing[:sd]) + [1.0])  # elastix sees voxel index * spacing (origin 0, no rotation)
        return np.asarray(m.affine, dtype=np.float64) @ np.linalg.inv(s) @ h @ s @ np.linalg.inv(a_w)

    def compose(self, working_ddf: torch.Tensor, working_affine: np.ndarray, prealign: np.ndarray,
                fixed_affine: np.ndarray, fixed_shape: Sequence[int]) -> torch.Tensor:
        """The network's field ``(d, *working_shape)`` and the pre-alignment as one field ``(d, *fixed_shape)``
        (see the module docstring)."""
        sd = working_ddf.shape[0]
        a_f, a_w, t = fixed_affine, working_affine, prealign
        u = self._onto(working_ddf.float().cpu(), a_w, np.eye(sd + 1), a_f, fixed_shape, "bilinear", "border")
        idx = index_grid(fixed_shape)
        inv_f = np.linalg.inv(a_f)
        m1 = inv_f @ t @ a_f
        m2 = inv_f[:sd, :sd] @ t[:sd, :sd] @ a_w[:sd, :sd]
        lin2 = torch.as_tensor(m2).float()
        return _apply_affine(m1, idx) + torch.einsum("ij,j...->i...", lin2, u) - idx

    # ---------------------------------------------------------------- run
    def __call__(self, fixed, moving, fixed_mask=None, moving_mask=None, moving_label=None) -> dict:
        start = time.perf_counter()
        times: dict[str, float] = {}
        f = self.load(fixed, "fixed")
        m = self.load(moving, "moving")
        sd = int(getattr(self.network, "spatial_dims", len(self.spacing)))
        for x, what in ((f, "fixed"), (m, "moving")):
            if self._sd(x) != sd:  # e.g. a 4D series read as four spatial axes, or a 2D slice for a 3D model
                hint = ": give one volume of the series" if self._sd(x) > sd else ""
                raise ValueError(f"the {what} image is {self._sd(x)}D (shape {tuple(x.shape[1:])}) and the model "
                                 f"registers {sd}D images{hint}.")
            if x.shape[0] != 1:  # a 4D series (x, y, z, t) is read with its volumes as channels
                raise ValueError(f"the {what} image holds {x.shape[0]} volumes or channels (shape "
                                 f"{tuple(x.shape[1:])} x {x.shape[0]}): give one {sd}D volume.")
        fm = self.load(fixed_mask, "fixed mask") if fixed_mask is not None else None
        mm = self.load(moving_mask, "moving mask") if moving_mask is not None else None
        ml = self.load(moving_label, "moving label") if moving_label is not None else None
        for a, b, what in ((f, fm, "fixed mask"), (m, mm, "moving mask"), (m, ml, "moving label")):
            if b is not None:
                self._check_same_grid(a, b, what)
        a_f, a_m = _affine(f), _affine(m)
        f_masked = f * (fm > 0) if fm is not None else f
        m_masked = m * (mm > 0) if mm is not None else m
        for image, mask, masked, what in ((f, fm, f_masked, "fixed"), (m, mm, m_masked, "moving")):
            check_image_content(image, f"the {what} image")  # the raw image: a NaN outside the mask stays NaN
            if mask is not None:  # an empty mask, or one around a constant region only
                check_image_content(masked, f"the {what} image inside its mask")
        times["load"] = time.perf_counter() - start

        t0 = time.perf_counter()
        a_w, s_w = self.working_grid(fm if fm is not None else f_masked)
        fixed_w = self._onto(self._smooth_for(f_masked), a_f, np.eye(sd + 1), a_w, s_w)
        self.last = {"working_affine": a_w, "working_shape": s_w}
        prealign = np.eye(sd + 1)
        if self.prealign == "affine":
            prealign = self._prealign(m_masked, fixed_w, a_w)
        self.last["prealign"] = prealign
        moving_w = self._onto(self._smooth_for(m_masked), a_m, prealign, a_w, s_w)
        times["prealign"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        fixed_n = torch.as_tensor(self.scale(fixed_w)).float()
        moving_n = torch.as_tensor(self.scale(moving_w)).float()
        with torch.no_grad(), reduced_precision(self.device, self.autocast):
            u = self.network(moving_n[None].to(self.device), fixed_n[None].to(self.device)).float()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        u = u[0].cpu()
        iters = getattr(self.network, "last_iterations", None)
        times["network"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        ddf = self.compose(u, a_w, prealign, a_f, f.shape[1:])
        warped = warp_to_fixed(m, ddf, a_f)
        out = {"ddf": ddf, "warped_image": warped, "fixed_affine": a_f, "prealign": prealign,
               "working_affine": a_w, "working_shape": s_w, "working_ddf": u,
               "working_fixed": fixed_n, "working_moving": moving_n,
               "iterations": [int(v) for v in iters[0]] if iters is not None else None}
        if ml is not None:
            out["warped_label"] = warp_to_fixed(ml, ddf, a_f, mode="nearest").round()
        from .metrics import folding_percentage

        mask = (fm > 0).as_tensor()[None] if fm is not None else None
        out["folding_pct"] = float(folding_percentage(ddf[None], mask)[0])
        times["compose"] = time.perf_counter() - t0
        times["total"] = time.perf_counter() - start
        out["times"] = times
        out["summary"] = self._summary(out)
        return out

    def _summary(self, out: dict) -> str:
        t = out["times"]
        it = out["iterations"]
        iters = "/".join(str(v) for v in it) if it else "n/a"
        where = "of the fixed mask" if out.get("folding_pct") is not None else ""
        return (f"registered in {t['total']:.2f} s (pre-alignment {t['prealign']:.2f} s, network {t['network']:.2f} s, "
                f"composition {t['compose']:.2f} s); updates per level 1..{len(it) if it else '?'}: {iters}; "
                f"folding {out['folding_pct']:.4f} % {where}".rstrip())

    # ---------------------------------------------------------------- outputs
    def write(self, result: dict, out_dir: str, name: str, ddf_units: str = "voxel") -> dict:
        """Write ``<name>_warped.nii.gz`` (float32, original units), ``<name>_ddf.nii.gz`` (last axis: one
        component per array axis; ``voxel`` or ``mm`` along the world axes), ``<name>_ddf_itk.nii.gz`` (the same
        composed field for ITK, SimpleITK and ANTs: 5D vector NIfTI, intent 1007, LPS millimetres; applied to the
        raw moving file, see :mod:`monai_ipear.itk_fields`), ``<name>_warped_label.nii.gz`` (integers) and
        ``<name>_summary.json``, all with the fixed image's affine. Returns the paths."""
        from .engines import ddf_to_mm
        from .itk_fields import write_itk_displacement_field

        if ddf_units not in ("voxel", "mm"):
            raise ValueError(f"ddf_units must be 'voxel' or 'mm', got {ddf_units!r}.")
        os.makedirs(out_dir, exist_ok=True)
        aff = torch.as_tensor(result["fixed_affine"])
        prefix = os.path.join(out_dir, name)
        paths = {"warped": f"{prefix}_warped.nii.gz", "ddf": f"{prefix}_ddf.nii.gz"}
        save = save_nifti
        save(result["warped_image"], aff, paths["warped"])
        field = result["ddf"] if ddf_units == "voxel" else ddf_to_mm(result["ddf"], aff)
        save(field, aff, paths["ddf"])
        # the composed field maps a fixed voxel i to the world point A_f (i + ddf(i)) of the moving scan, so its
        # physical displacement is the fixed affine's linear part applied to ddf: the ITK field on the fixed grid
        paths["ddf_itk"] = write_itk_displacement_field(result["ddf"], np.asarray(result["fixed_affine"]),
                                                        f"{prefix}_ddf_itk.nii.gz")
        if "warped_label" in result:
            lab = result["warped_label"]
            dtype = np.int16 if float(lab.abs().max()) <= np.iinfo(np.int16).max else np.int32
            paths["warped_label"] = f"{prefix}_warped_label.nii.gz"
            save(lab, aff, paths["warped_label"], dtype=dtype)
        paths["summary_json"] = f"{prefix}_summary.json"
        with open(paths["summary_json"], "w") as fh:
            json.dump({"summary": result["summary"], "times_s": result["times"], "iterations_per_level": result["iterations"],
                       "folding_pct": result["folding_pct"], "prealign_world_fixed_to_moving": np.asarray(result["prealign"]).tolist(),
                       "working_affine": np.asarray(result["working_affine"]).tolist(),
                       "working_shape": list(result["working_shape"]), "ddf_units": ddf_units,
                       "model": {k: self.metadata.get(k) for k in ("network", "spacing", "placeholder")}}, fh, indent=2)
        return paths

    def run_files(self, fixed, moving, out_dir, fixed_mask=None, moving_mask=None, moving_label=None,
                  ddf_units: str = "voxel", name: str | None = None) -> dict:
        """Register and write (the CLI's ``register`` and the bundle's ``register`` run call this). Returns
        ``{"summary": one line, <output>: path, "iterations_per_level": [...], "folding_pct": ...}``."""
        if name is None:
            from .data.datalist import pair_name

            name = pair_name(str(moving), str(fixed)) if isinstance(moving, (str, os.PathLike)) and isinstance(
                fixed, (str, os.PathLike)) else "moving_to_fixed"
        result = self(fixed, moving, fixed_mask, moving_mask, moving_label)
        paths = self.write(result, str(out_dir), name, ddf_units)
        return {"summary": result["summary"], **paths, "iterations_per_level": result["iterations"],
                "folding_pct": result["folding_pct"]}
