"""Deployment: a one-tensor wrapper for MONAI's ``verify_net_in_out`` / ``ckpt_export``, and export helpers.

The registration networks take two tensors (``net(moving, fixed)``) and, at inference, iterate under a
data-dependent controller (TCI, IterStop) in Python. MONAI's bundle tools call ``net(x)`` with one tensor, and
graph exporters need a fixed control flow, so :class:`ExportableRegistrationNet` stacks moving and fixed as
channels and runs the network with a FIXED number of updates per level (:class:`FixedIterations`, or
:class:`SinglePass` with ``iterations=1``). Exported graphs are specialised to the example input's shape
(padding and cropping sizes are traced as constants): export once per image size.

Which export paths work (measured by ``tests/test_export.py``, see docs/README.md "Deployment"):

- TorchScript by tracing (:func:`export_torchscript`, ``python -m monai.bundle ckpt_export --use_trace True``);
  ``torch.jit.script`` does not (the pyramid's per-sample controller loop uses Python lists and closures).
- ``torch.export`` (:func:`export_program`).
- ONNX (:func:`export_onnx`) only when the ``onnx`` package is installed (it is not a dependency).
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .controllers import FixedIterations, SinglePass

__all__ = ["ExportableRegistrationNet", "export_torchscript", "export_program", "export_onnx", "max_abs_difference"]


class ExportableRegistrationNet(nn.Module):
    """``ddf = net(x)`` with ``x = cat([moving, fixed], dim=1)``: the one-tensor form MONAI's bundle tools use.

    Args:
        network: a registration network ``ddf = network(moving, fixed)`` (e.g. ``iPEAR``); it is copied, the
            original keeps its controller.
        iterations: updates per pyramid level at inference (``FixedIterations(iterations)``; 1 =
            ``SinglePass``); ``None`` keeps the network's own controller (data-dependent: not exportable).
        in_channels: channels of ONE image (default ``network.in_channels`` or 1).

    ``forward(x)``: ``(B, 2 * in_channels, *spatial)`` -> DDF ``(B, spatial_dims, *spatial)`` in voxels (pull
    convention), in eval mode. ``state_dict`` / ``load_state_dict`` are the wrapped network's, so the bundle's
    ``models/model.pt`` loads directly (``ckpt_export``, ``CheckpointLoader``).
    """

    def __init__(self, network: nn.Module, iterations: int | None = 3, in_channels: int | None = None) -> None:
        super().__init__()
        self.network = copy.deepcopy(network)
        if iterations is not None and hasattr(self.network, "controller"):
            self.network.controller = SinglePass() if int(iterations) == 1 else FixedIterations(int(iterations))
        self.in_channels = int(in_channels or getattr(network, "in_channels", 1))
        self.iterations = iterations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 3 or x.shape[1] != 2 * self.in_channels:
            raise ValueError(
                f"expected (B, {2 * self.in_channels}, *spatial) with moving then fixed as channels, got {tuple(x.shape)}.")
        return self.network(x[:, : self.in_channels], x[:, self.in_channels :])

    def state_dict(self, *args, **kwargs):
        return self.network.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.network.load_state_dict(state_dict, strict=strict, assign=assign)


def max_abs_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b|`` as a float (the agreement figure reported for exported models)."""
    return float((a.detach().float().cpu() - b.detach().float().cpu()).abs().max())


def export_torchscript(model: nn.Module, example: torch.Tensor, path: str | None = None) -> torch.jit.ScriptModule:
    """Trace ``model`` (eval mode) on ``example`` with ``torch.jit.trace``; save to ``path`` when given."""
    model = model.eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
    if path is not None:
        torch.jit.save(traced, path)
    return traced


def export_program(model: nn.Module, example: torch.Tensor, path: str | None = None):
    """``torch.export.export`` of ``model`` (eval mode) on ``example``; saved with ``torch.export.save``."""
    model = model.eval()
    with torch.no_grad():
        program = torch.export.export(model, (example,))
    if path is not None:
        torch.export.save(program, path)
    return program


def export_onnx(model: nn.Module, example: torch.Tensor, path: str, opset_version: int = 18) -> str:
    """ONNX export (needs the optional ``onnx`` package); raises ``ImportError`` naming it when absent."""
    try:
        import onnx  # noqa: F401
    except ImportError as e:
        raise ImportError("ONNX export needs the optional 'onnx' package (pip install onnx onnxscript).") from e
    model = model.eval()
    with torch.no_grad():
        torch.onnx.export(model, (example,), path, input_names=["image"], output_names=["ddf"],
                          opset_version=opset_version)
    return path
