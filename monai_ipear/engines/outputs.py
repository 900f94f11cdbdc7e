"""Ignite handlers that write registration results: NIfTI outputs per pair and the iterations table."""

from __future__ import annotations

import csv
import os

import numpy as np
import torch
from monai.data import MetaTensor, NibabelWriter

__all__ = ["RegistrationOutputWriter", "pair_names", "fixed_affines", "ddf_to_mm", "input_paths", "refuse_overwrite"]


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
    """Writes, per pair, ``<pair>_warped.nii.gz``, ``<pair>_ddf.nii.gz`` and (with a moving label)
    ``<pair>_warped_label.nii.gz`` on the fixed image's grid with its affine, and after the run
    ``iterations.csv`` (pair, then the updates kept per pyramid level, level 1 = full resolution first).

    Attach to an evaluator running :class:`~monai_ipear.engines.RegistrationEvalIteration`.

    Args:
        output_dir: folder for the outputs (created).
        ddf_units: ``"voxel"`` (default: displacement in voxels along the array axes) or ``"mm"``
            (millimetres along the world axes of the fixed image's affine).
        fixed_key: batch key of the fixed image (its affine is the outputs' affine).
        iterations_file: name of the iterations table (``None``: not written).

    The DDF file holds one component per axis in its last dimension: ``(H, W, D, 3)`` (``(H, W, 2)`` in 2D).
    """

    def __init__(
        self,
        output_dir: str = "./outputs",
        ddf_units: str = "voxel",
        fixed_key: str = "fixed_image",
        iterations_file: str | None = "iterations.csv",
    ) -> None:
        if ddf_units not in ("voxel", "mm"):
            raise ValueError(f"ddf_units must be 'voxel' or 'mm', got '{ddf_units}'.")
        self.output_dir = output_dir
        self.ddf_units = ddf_units
        self.fixed_key = fixed_key
        self.iterations_file = iterations_file
        self.rows: list[list] = []
        self.count = 0

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        engine.add_event_handler(Events.COMPLETED, self._write_iterations)

    def _reset(self, engine=None) -> None:
        self.rows, self.count = [], 0

    @staticmethod
    def _save(array: torch.Tensor, affine: torch.Tensor, path: str, dtype=np.float32) -> None:
        writer = NibabelWriter(output_dtype=dtype)
        writer.set_data_array(array.detach().cpu(), channel_dim=0)
        # the affine is already the fixed image's (RAS for NIfTI): no resampling, no LPS->RAS flip. Set directly:
        # MONAI 1.6's set_metadata(resample=False) still resamples, treats a single-channel volume as 2D and fails
        # for affines that permute axes (sagittal storage)
        writer.affine = torch.as_tensor(affine).detach().cpu().double()
        writer.write(path, verbose=False)

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
            for suffix in ("warped", "ddf", "warped_label"):
                refuse_overwrite(f"{prefix}_{suffix}.nii.gz", inputs)
            field = ddf[b] if self.ddf_units == "voxel" else ddf_to_mm(ddf[b], affines[b])
            self._save(out["warped_image"][b], affines[b], f"{prefix}_warped.nii.gz")
            self._save(field, affines[b], f"{prefix}_ddf.nii.gz")
            if "warped_label" in out:
                self._save(out["warped_label"][b].round(), affines[b], f"{prefix}_warped_label.nii.gz", dtype=np.int16)
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
