"""Input checks and layout helpers shared by the registration networks."""

from __future__ import annotations

import functools

import torch

__all__ = [
    "check_registration_pair", "channels_last_format", "tracing", "records_grad", "cpu_training", "concat_channels",
]


def channels_last_format(ndim: int) -> torch.memory_format:
    """The channels-last memory format of a 4D (2D images) or 5D (3D volumes) tensor."""
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


def tracing() -> bool:
    """Whether a graph is being captured (``jit.trace``/``jit.script``, ``torch.export``, ``torch.compile``): the
    fast paths built on in-place ops and custom autograd functions then give way to plain differentiable ops."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()


def records_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an op on any of ``tensors`` (grad mode on and one of them requires grad): where the
    fast paths that overwrite their inputs or reorder their layout must give way."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def concat_channels(tensors: list[torch.Tensor], channels_last: bool = False) -> torch.Tensor:
    """``torch.cat(tensors, dim=1)``; ``channels_last``: made channels-last (4D or 5D), the layout of channels-last
    convolutions that read it, which would otherwise each make a channels-last copy of it beside it. Without
    autograd the concatenation is written straight into a channels-last tensor (one pass, no second full-size map:
    a 16-channel 160x192x160 map on the development CPU, 26-28 ms into a reused tensor against 191-198 ms for
    concatenating and then copying)."""
    if not channels_last or tensors[0].ndim not in (4, 5) or tracing():
        return torch.cat(tensors, dim=1)
    fmt = channels_last_format(tensors[0].ndim)
    if records_grad(*tensors):  # ``out=`` is not differentiable
        return torch.cat(tensors, dim=1).contiguous(memory_format=fmt)
    first = tensors[0]
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    shape = (first.shape[0], sum(t.shape[1] for t in tensors), *first.shape[2:])
    return torch.cat(tensors, dim=1, out=torch.empty(shape, dtype=dtype, device=first.device, memory_format=fmt))


def cpu_training(x: torch.Tensor) -> bool:
    """Whether ``x`` is on the CPU while autograd records, in eager mode: where the training-only layout path of
    ``ConvGELUBlock.fast`` applies."""
    return x.device.type == "cpu" and torch.is_grad_enabled() and not tracing()


def check_registration_pair(
    moving: torch.Tensor, fixed: torch.Tensor, spatial_dims: int, in_channels: int, min_size: int = 1
) -> None:
    """Raise ``ValueError`` naming the problem and the shapes when ``(moving, fixed)`` is not a valid pair.

    Valid: tensors ``(B, in_channels, *spatial)`` with ``spatial_dims`` spatial axes, equal shapes, every
    spatial size ``>= min_size``, finite values.
    """
    for name, t in (("moving", moving), ("fixed", fixed)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.ndim != spatial_dims + 2:
            raise ValueError(
                f"{name} must have {spatial_dims + 2} dimensions (B, C, {'H, W, D' if spatial_dims == 3 else 'H, W'}) "
                f"for spatial_dims={spatial_dims}, got shape {tuple(t.shape)}."
            )
        if t.shape[1] != in_channels:
            raise ValueError(f"{name} must have {in_channels} channel(s), got shape {tuple(t.shape)}.")
    for name, t in (("moving", moving), ("fixed", fixed)):
        if not t.is_floating_point():
            raise TypeError(f"{name} has dtype {t.dtype}; the networks take floating-point images: pass "
                            f"{name}.float() (intensities scaled to [0, 1]).")
    if moving.dtype != fixed.dtype:
        raise TypeError(f"moving ({moving.dtype}) and fixed ({fixed.dtype}) have different dtypes; cast both to the "
                        "network's dtype (float32 unless you converted it), or run under torch.autocast.")
    if moving.shape != fixed.shape:
        raise ValueError(f"moving and fixed shapes differ: moving {tuple(moving.shape)}, fixed {tuple(fixed.shape)}.")
    if min(moving.shape[2:]) < min_size:
        raise ValueError(
            f"spatial size {tuple(moving.shape[2:])} of input shape {tuple(moving.shape)} is too small: every axis "
            f"needs at least {min_size} voxels for this network's number of levels."
        )
    if torch.compiler.is_compiling():  # torch.export / torch.compile: no data-dependent branch in the graph
        return
    for name, t in (("moving", moving), ("fixed", fixed)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} {tuple(t.shape)} contains NaN or Inf values.")
