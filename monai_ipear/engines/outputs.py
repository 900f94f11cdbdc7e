"""Ignite handlers that write registration results: NIfTI outputs per pair and the iterations table."""

from __future__ import annotations

import csv
import os

import numpy as np
import torch
from monai.data import MetaTensor, NibabelWriter

from ..booleans import as_bool

__all__ = [
    "RegistrationOutputWriter", "pair_names", "fixed_affines", "ddf_to_mm", "input_paths", "refuse_overwrite",
    "write_nifti", "write_label_map", "label_dtype", "check_finite",
]


def check_finite(x: torch.Tensor, what: str, hint: str = "nothing written; check the model weights (a diverged "
                 "training?) and the inputs.") -> None:
    """The one finiteness check of the package's outputs (and of label maps read from files): raise
    ``FloatingPointError`` naming ``what`` and the share of non-finite values when ``x`` holds NaN or Inf."""
    x = torch.as_tensor(x)
    if x.is_floating_point():
        bad = ~torch.isfinite(x)
        if bool(bad.any()):
            raise FloatingPointError(
                f"{what} holds non-finite values (NaN/Inf in {100.0 * float(bad.float().mean()):.3g} % of "
                f"{bad.numel()} voxels): {hint}")


def label_dtype(array) -> np.dtype:
    """The smallest integer NIfTI dtype holding every value of ``array`` (uint8, int16, int32 or int64)."""
    a = np.asarray(array)
    lo, hi = (int(a.min()), int(a.max())) if a.size else (0, 0)
    for dt in (np.uint8, np.int16, np.int32, np.int64):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dt)
    raise ValueError(f"label values {lo}..{hi} do not fit in int64.")


def write_nifti(array: torch.Tensor, affine: torch.Tensor, path: str, dtype=np.float32) -> None:
    """Write a channel-first ``(C, *spatial)`` array as NIfTI with exactly ``affine``, in any orientation, 2D or 3D.

    MONAI's :class:`~monai.data.NibabelWriter` is used for the channel-last layout and the header (sform and qform
    code 1, as ITK reads them), but not its ``set_metadata``: that always runs a ``SpatialResample``, which fails
    on coronal / sagittal affines and on 2D images even with ``resample=False``. The data are already on the fixed
    image's grid, so the affine is set as is.
    """
    writer = NibabelWriter(output_dtype=dtype)
    writer.set_data_array(array.detach().cpu(), channel_dim=0)
    writer.affine = np.asarray(torch.as_tensor(affine).detach().cpu().double())
    writer.write(path, verbose=False)


def write_label_map(array: torch.Tensor, affine: torch.Tensor, path: str) -> np.dtype:
    """The one label-map writer: round to the nearest integer and write with :func:`label_dtype`, so every label
    value survives (a fixed int16 turned 40000 into -25536). Non-finite labels are refused. Returns the dtype."""
    check_finite(array, f"label map for {os.path.basename(str(path))}")
    values = torch.as_tensor(array).detach().cpu().double().round()
    dtype = label_dtype(values.numpy())
    write_nifti(values, affine, path, dtype=dtype)
    return dtype


def pair_names(batch: dict, size: int, offset: int = 0) -> list[str]:
    """Names of the pairs of a collated batch (``batch["pair"]``), or ``pair_<index>`` when absent."""
    names = batch.get("pair") if isinstance(batch, dict) else None
    if names is None:
        return [f"pair_{offset + i:04d}" for i in range(size)]
    return [str(n) for n in (names if isinstance(names, (list, tuple)) else [names])]


def fixed_affines(batch: dict, key: str, size: int) -> list[torch.Tensor]:
    """Per-sample 4x4 (or (d+1)x(d+1)) affines of ``batch[key]`` (identity when it carries no metadata)."""
    x = batch.get(key) if isinstance(batch, dict) else None
    if isinstance(x, MetaTensor):
        aff = x.affine
        aff = aff if aff.ndim == 3 else aff[None].expand(size, *aff.shape)
        return [a.detach().cpu().double() for a in aff]
    return [torch.eye(4, dtype=torch.float64) for _ in range(size)]


def ddf_to_mm(ddf: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    """Convert one DDF ``(spatial_dims, *spatial)`` from voxels to millimetres in world (affine) axes.

    ``d_world_i = sum_j A_ij d_vox_j`` with ``A`` the linear part of the voxel-to-world ``affine``.
    """
    sd = ddf.shape[0]
    lin = affine[:sd, :sd].to(ddf.dtype).to(ddf.device)
    return torch.einsum("ij,j...->i...", lin, ddf)


def input_paths(batch: dict) -> set[str]:
    """Real paths of the files a collated batch was read from (``filename_or_obj`` of its MetaTensors)."""
    paths: set[str] = set()
    for value in (batch.values() if isinstance(batch, dict) else []):
        names = value.meta.get("filename_or_obj") if isinstance(value, MetaTensor) else None
        for n in (names if isinstance(names, (list, tuple)) else [names]):
            if isinstance(n, (str, os.PathLike)) and str(n):
                paths.add(os.path.realpath(str(n)))
    return paths


def refuse_overwrite(path: str, inputs: set[str]) -> None:
    """Raise ``ValueError`` when ``path`` is one of the (real) ``inputs`` paths: outputs never replace inputs."""
    if os.path.realpath(str(path)) in inputs:
        raise ValueError(f"refusing to overwrite the input file {path} with an output; choose another output folder or name.")


class RegistrationOutputWriter:
    """Writes, per pair, ``<pair>_warped.nii.gz``, ``<pair>_ddf.nii.gz``, ``<pair>_ddf_itk.nii.gz`` (the same
    field for ITK, SimpleITK and ANTs: 5D vector NIfTI, intent 1007, LPS millimetres; see
    :mod:`monai_ipear.itk_fields`) and (with a moving label)
    ``<pair>_warped_label.nii.gz`` on the fixed image's grid with its affine, and after the run
    ``iterations.csv`` (pair, then the updates kept per pyramid level, level 1 = full resolution first).

    Attach to an evaluator running :class:`~monai_ipear.engines.RegistrationEvalIteration`.

    Args:
        output_dir: folder for the outputs (created).
        ddf_units: ``"voxel"`` (default: displacement in voxels along the array axes) or ``"mm"``
            (millimetres along the world axes of the fixed image's affine).
        fixed_key: batch key of the fixed image (its affine is the outputs' affine).
        iterations_file: name of the iterations table (``None``: not written).
        itk_field: also write ``<pair>_ddf_itk.nii.gz`` (default ``True``).

    The DDF file holds one component per axis in its last dimension: ``(H, W, D, 3)`` (``(H, W, 2)`` in 2D).
    """

    def __init__(
        self,
        output_dir: str = "./outputs",
        ddf_units: str = "voxel",
        fixed_key: str = "fixed_image",
        iterations_file: str | None = "iterations.csv",
        itk_field: bool = True,
    ) -> None:
        if ddf_units not in ("voxel", "mm"):
            raise ValueError(f"ddf_units must be 'voxel' or 'mm', got '{ddf_units}'.")
        self.output_dir = output_dir
        self.ddf_units = ddf_units
        self.fixed_key = fixed_key
        self.iterations_file = iterations_file
        self.itk_field = as_bool(itk_field, "itk_field")
        self.rows: list[list] = []
        self.count = 0
        self.names: set[str] = set()  # output names written in this run: a second pair of the same name is refused

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._write_iterations)

    def _reset(self, engine=None) -> None:
        self.rows, self.count, self.names = [], 0, set()

    @staticmethod
    def _save(array: torch.Tensor, affine: torch.Tensor, path: str, dtype=np.float32) -> None:
        # the affine is already the fixed image's (RAS for NIfTI): no resampling, no LPS->RAS flip
        write_nifti(array, affine, path, dtype=dtype)

    def __call__(self, engine) -> None:
        out, batch = engine.state.output, engine.state.batch
        ddf = out["ddf"]
        size = ddf.shape[0]
        names = pair_names(batch, size, self.count)
        affines = fixed_affines(batch, self.fixed_key, size)
        os.makedirs(self.output_dir, exist_ok=True)
        inputs = input_paths(batch)
        for b in range(size):
            prefix = os.path.join(self.output_dir, names[b])
            if names[b] in self.names:
                raise ValueError(
                    f"two pairs of this run have the output name '{names[b]}': the second would overwrite the first's "
                    "files. Give the pairs unique 'pair' names (load_registration_pairs adds the parent folder when "
                    "file names collide).")
            self.names.add(names[b])
            for suffix in ("warped", "ddf", "ddf_itk", "warped_label"):
                refuse_overwrite(f"{prefix}_{suffix}.nii.gz", inputs)
            field = ddf[b] if self.ddf_units == "voxel" else ddf_to_mm(ddf[b], affines[b])
            self._save(out["warped_image"][b], affines[b], f"{prefix}_warped.nii.gz")
            self._save(field, affines[b], f"{prefix}_ddf.nii.gz")
            if self.itk_field:
                from ..itk_fields import write_itk_displacement_field

                write_itk_displacement_field(ddf[b], affines[b], f"{prefix}_ddf_itk.nii.gz")
            if "warped_label" in out:
                write_label_map(out["warped_label"][b], affines[b], f"{prefix}_warped_label.nii.gz")
            iters = out.get("iterations")
            self.rows.append([names[b]] + ([int(v) for v in iters[b]] if iters is not None else []))
        self.count += size

    def _write_iterations(self, engine=None) -> None:
        if self.iterations_file is None or not self.rows:
            return
        levels = max(len(r) for r in self.rows) - 1
        os.makedirs(self.output_dir, exist_ok=True)
        with open(os.path.join(self.output_dir, self.iterations_file), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["pair"] + [f"level_{i + 1}" for i in range(levels)])
            w.writerows(self.rows)
