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

from .controllers import FixedIterations, SinglePass, controller_from_spec

__all__ = ["ExportableRegistrationNet", "export_torchscript", "export_program", "export_onnx", "max_abs_difference"]


class ExportableRegistrationNet(nn.Module):
    """``ddf = net(x)`` with ``x = cat([moving, fixed], dim=1)``: the one-tensor form MONAI's bundle tools use.

    The bundle's ``network_def`` is this wrapper around the package's two-argument network (``iterations=None``:
    the network keeps its controller, e.g. TCI), so the Model Zoo's ``verify_net_in_out`` can call it with one
    2-channel tensor as ``mednist_reg`` does; ``export_network_def`` (configs/export.json) wraps it again with a
    FIXED number of updates per level for graph export. The package's own API stays ``network(moving, fixed)``:
    the wrapper also accepts that call (the training and evaluation iterations use it).

    Args:
        network: a registration network ``ddf = network(moving, fixed)`` (e.g. ``iPEAR``), or another
            ``ExportableRegistrationNet`` (its network is used). With ``iterations`` it is copied (the original
            keeps its controller); without, it is wrapped as is.
        iterations: updates per pyramid level at inference (``FixedIterations(iterations)``; 1 =
            ``SinglePass``); ``None`` keeps the network's own controller (data-dependent: runs eagerly, and
            tracing it raises, since a traced graph would freeze the iteration counts of the example).
        in_channels: channels of ONE image (default ``network.in_channels`` or 1).

    ``forward(x)``: ``(B, 2 * in_channels, *spatial)`` -> DDF ``(B, spatial_dims, *spatial)`` in voxels (pull
    convention); ``forward(moving, fixed)`` is the same with the two images. ``state_dict`` / ``load_state_dict``
    use the wrapped network's keys (no ``network.`` prefix, also inside a larger module such as
    ``DistributedDataParallel``), so the bundle's ``models/model.pt`` and the package network's state dicts are
    interchangeable. ``last_iterations`` is the wrapped network's.
    """

    def __init__(self, network: nn.Module, iterations: int | None = 3, in_channels: int | None = None) -> None:
        super().__init__()
        if isinstance(network, ExportableRegistrationNet):
            network = network.network
        if iterations is not None:
            network = copy.deepcopy(network)
            if hasattr(network, "controller"):
                network.controller = controller_from_spec(int(iterations))
        self.network = network
        self.in_channels = int(in_channels or getattr(network, "in_channels", 1))
        self.iterations = iterations
        # state dicts without the "network." level (nn.Module's hooks, so they also apply when nested)
        self._register_state_dict_hook(_drop_network_prefix)
        self._register_load_state_dict_pre_hook(_add_network_prefix)

    @property
    def last_iterations(self):
        return getattr(self.network, "last_iterations", None)

    def _data_dependent(self) -> bool:
        controller = getattr(self.network, "controller", None)
        return self.iterations is None and controller is not None and not isinstance(
            controller, (SinglePass, FixedIterations))

    def forward(self, x: torch.Tensor, fixed: torch.Tensor | None = None) -> torch.Tensor:
        if fixed is not None:
            return self.network(x, fixed)
        if x.ndim < 3 or x.shape[1] != 2 * self.in_channels:
            raise ValueError(
                f"expected (B, {2 * self.in_channels}, *spatial) with moving then fixed as channels, got {tuple(x.shape)}.")
        if torch.jit.is_tracing() and self._data_dependent():
            raise RuntimeError(
                f"{type(self.network.controller).__name__} decides the number of updates from the data; a traced graph "
                "would freeze the counts of the example input. Export 'export_network_def' (configs/export.json, "
                "fixed updates per level) instead of 'network_def'.")
        return self.network(x[:, : self.in_channels], x[:, self.in_channels :])


def _drop_network_prefix(module, state_dict, prefix, local_metadata):
    inner = prefix + "network."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)
    return state_dict


def _add_network_prefix(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    inner = prefix + "network."
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(inner)]:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)


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
