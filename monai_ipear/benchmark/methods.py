"""The registration methods the benchmark compares, behind one call: ``ddf = method.register(moving, fixed)``.

Learned methods (``ipear``, ``ipear-fixed3``, ``ipear-single``, ``rpnet``, ``rpnet-fixed3``, ``iirpnet``, ``voxelmorph``) are networks of this
package or MONAI's :class:`~monai.networks.nets.VoxelMorph`; ``iirpnet`` is RP-Net's weights under IterStop
(IIRP-Net is RP-Net with iterative inference) and ``ipear-fixed3`` iPEAR's weights with 3 updates per level.
Classical baselines: ``elastix-affine`` (affine only) and ``elastix-bspline`` (optional extra ``prealign``),
``ants-syn`` (``antspyx``, not a dependency: skipped with a note when absent).
Speed rows only (:mod:`~monai_ipear.benchmark.external`): ``unigradicon`` (its network alone) and
``unigradicon-io<N>`` (with N instance-optimisation steps; its command's default is 50); ``ants-syn`` is a speed
row too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from monai.networks.nets import VoxelMorph
from monai.utils import optional_import

from ..controllers import FixedIterations, IterStop, SinglePass
from ..networks.nets import RPNet, iPEAR
from ..preprocessing.elastix import elastix_ddf, elastix_register, has_elastix
from ..runtime import reduced_precision
from .external import UNIGRADICON_MISSING, AntsSyN, UniGradICON, has_unigradicon

ants, has_ants = optional_import("ants")

__all__ = ["VoxelMorphDDF", "BenchmarkMethod", "build_method", "display_name", "METHOD_NAMES", "LEARNED_METHODS"]

METHOD_NAMES = ("ipear", "rpnet", "iirpnet", "ipear-fixed3", "voxelmorph", "elastix-affine", "elastix-bspline", "ants-syn",
                "ipear-single", "rpnet-fixed3")
#: method -> the trained weights it uses (the architecture trained by the recipe).
LEARNED_METHODS = {"ipear": "ipear", "ipear-fixed3": "ipear", "rpnet": "rpnet", "iirpnet": "rpnet", "voxelmorph": "voxelmorph",
                   "ipear-single": "ipear", "rpnet-fixed3": "rpnet"}

DISPLAY = {
    "ipear": "iPEAR (TCI)", "ipear-fixed3": "iPEAR, fixed 3 iterations", "rpnet": "RP-Net (single pass)",
    "iirpnet": "IIRP-Net (RP-Net + IterStop)", "voxelmorph": "MONAI VoxelMorph", "elastix-affine": "affine only (elastix)",
    "elastix-bspline": "elastix affine + B-spline", "ants-syn": "ANTs SyN",
    "ipear-fixed-at-tci": "iPEAR, fixed at TCI's update counts", "ipear-single": "iPEAR, single pass",
    "rpnet-fixed3": "RP-Net, fixed 3 iterations",
    "encoder:ipear": "encoder of iPEAR (NA), stacked pair", "encoder:rpnet": "encoder of RP-Net (conv), stacked pair",
    "train:ipear": "training step of iPEAR (forward + backward)", "train:rpnet": "training step of RP-Net (forward + backward)",
    "unigradicon": "uniGradICON (network only)",
}
_IO = re.compile(r"unigradicon-io(\d+)")


def display_name(method: str) -> str:
    """The name a report gives a method or row (``unigradicon-io<N>`` spelled out)."""
    io_steps = _IO.fullmatch(method)
    if io_steps:
        steps = int(io_steps.group(1))
        return f"uniGradICON, {steps} instance-optimisation step{'s' if steps != 1 else ''}"
    return DISPLAY.get(method, method)


class VoxelMorphDDF(torch.nn.Module):
    """MONAI :class:`~monai.networks.nets.VoxelMorph` under this package's contract: ``ddf = net(moving, fixed)``.

    MONAI's VoxelMorph returns ``(warped, ddf)`` (a stationary velocity integrated by scaling and squaring, DDF
    in voxels, pull convention); this wrapper keeps the DDF. Sizes must be divisible by 16 (its U-Net).
    """

    def __init__(self, spatial_dims: int = 3, integration_steps: int = 7) -> None:
        super().__init__()
        self.net = VoxelMorph(integration_steps=integration_steps, spatial_dims=spatial_dims)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return self.net(moving, fixed)[1]


def make_network(arch: str, spatial_dims: int = 3) -> torch.nn.Module:
    """A fresh network of an architecture trained by the recipe: ``"ipear"``, ``"rpnet"`` or ``"voxelmorph"``."""
    if arch == "ipear":
        return iPEAR(spatial_dims=spatial_dims)
    if arch == "rpnet":
        return RPNet(spatial_dims=spatial_dims)
    if arch == "voxelmorph":
        return VoxelMorphDDF(spatial_dims=spatial_dims)
    raise ValueError(f"unknown architecture {arch!r}")


@dataclass
class BenchmarkMethod:
    """One method: ``register(moving, fixed)`` with ``(1, 1, *spatial)`` images -> ``(1, spatial_dims, *spatial)``
    DDF in voxels. ``network`` (learned methods) exposes ``last_iterations``; ``parameters`` is its count."""

    name: str
    register: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None
    parameters: int | None = None
    network: torch.nn.Module | None = None
    """what the speed study times (learned methods: the network; ``ants-syn`` and ``unigradicon``: the tool)."""
    note: str = ""
    timed_once: bool = False
    """slow classical methods: one timed call per pair, no warm-up."""

    @property
    def display(self) -> str:
        return display_name(self.name)

    @property
    def available(self) -> bool:
        return self.register is not None


def _net_method(name: str, net: torch.nn.Module, note: str, autocast: bool = False) -> BenchmarkMethod:
    """A learned method; ``autocast``: its forward under :func:`~monai_ipear.runtime.reduced_precision`, field in
    float32."""
    net = net.eval()

    def register(moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), reduced_precision(moving.device, autocast):
            return net(moving, fixed).float()

    return BenchmarkMethod(name, register, sum(p.numel() for p in net.parameters()), net, note)


def _coordinate_ddf(warp_image: Callable, shape) -> torch.Tensor:
    """DDF of any method that can only warp images: warp the voxel-coordinate images linearly (x + ddf(x))."""
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in shape], indexing="ij")
    return torch.stack([torch.as_tensor(warp_image(g)) - g for g in grids])[None]


def build_method(
    name: str,
    weights: Mapping[str, str | torch.nn.Module] | None = None,
    spatial_dims: int = 3,
    elastix_iterations: int = 256,
) -> BenchmarkMethod:
    """Build a method by name (see :data:`METHOD_NAMES`).

    Args:
        weights: per architecture (``"ipear"``, ``"rpnet"``, ``"voxelmorph"``) a ``state_dict`` file or a module.
            Missing weights leave the network random, with a note saying so.
        spatial_dims: 2 or 3.
        elastix_iterations: optimiser iterations per resolution of the elastix baselines.
    """
    weights = dict(weights or {})
    if name in LEARNED_METHODS:
        arch = LEARNED_METHODS[name]
        w = weights.get(arch)
        if isinstance(w, torch.nn.Module):
            net, note = w, ""
        else:
            net = make_network(arch, spatial_dims)
            note = "random weights (untrained)"
            if w is not None:
                _load_weights(net, arch, w)
                note = ""
        if name in ("ipear-fixed3", "rpnet-fixed3"):
            net = _shallow_with_controller(net, FixedIterations(3))
        elif name == "ipear-single":
            net = _shallow_with_controller(net, SinglePass())
        elif name == "iirpnet":
            net = _shallow_with_controller(net, IterStop(faithful=False))
        return _net_method(name, net, note)
    if name in ("elastix-affine", "elastix-bspline"):
        if not has_elastix():
            return BenchmarkMethod(name, None, note="skipped: itk-elastix not installed (pip install 'monai-ipear[prealign]')")
        transform = "affine" if name == "elastix-affine" else "bspline"

        def register(moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
            result = elastix_register(moving[0, 0], fixed[0, 0], None, transform, elastix_iterations,
                                      metric="AdvancedNormalizedCorrelation")
            return elastix_ddf(result, moving[0, 0])[None]

        return BenchmarkMethod(name, register, note=f"elastix {transform}, NCC, {elastix_iterations} iterations x 3 resolutions, "
                               "timed once per pair", timed_once=True)
    if name == "ants-syn":
        if not has_ants:
            return BenchmarkMethod(name, None, note="skipped: antspyx not installed (it pins numpy<2.4 and scipy<1.16)")

        syn = AntsSyN()  # the one SyN call: the speed row times it, the accuracy table adds the field

        def register(moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
            reg = syn(moving, fixed)
            f_img = ants.from_numpy(fixed[0, 0].float().numpy())

            def warp(coord: torch.Tensor):
                out = ants.apply_transforms(f_img, ants.from_numpy(coord.numpy()), reg["fwdtransforms"], interpolator="linear")
                return out.numpy()

            return _coordinate_ddf(warp, fixed.shape[2:])

        note = "antspyx SyN defaults (an affine stage, then SyN); the accuracy table times it once per pair"
        return BenchmarkMethod(name, register, network=syn, note=note, timed_once=True)
    io_steps = _IO.fullmatch(name)
    if name == "unigradicon" or io_steps:
        if not has_unigradicon():
            return BenchmarkMethod(name, None, note=UNIGRADICON_MISSING)
        path = weights.get("unigradicon")
        tool = UniGradICON(path if isinstance(path, str) else None, int(io_steps.group(1)) if io_steps else None)
        note = "speed row only" + ("" if path else "; random weights (its published weights are a download): "
                                   "the same computation, no registration")
        return BenchmarkMethod(name, None, sum(p.numel() for p in tool.parameters()), tool, note)
    raise ValueError(f"unknown method {name!r}; choose from {METHOD_NAMES}")


def _load_weights(net: torch.nn.Module, arch: str, path: str) -> None:
    """A ``state_dict`` file, a training checkpoint holding one (``network``/``model``/``state_dict`` key), or for
    ``rpnet`` the published IIRP-Net checkpoint (converted by :func:`~monai_ipear.networks.nets.convert_iirp_state_dict`)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - the published IIRP-Net file stores a Python config dict
        state = None
    if isinstance(state, dict):
        for key in ("network", "model", "state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if state is not None:
        try:
            net.load_state_dict(state)
            return
        except RuntimeError:
            if arch != "rpnet":
                raise
    if arch != "rpnet":
        raise ValueError(f"could not load weights for {arch} from {path}")
    from ..networks.nets import load_iirp_checkpoint

    net.load_state_dict(load_iirp_checkpoint(path).state_dict())


def _shallow_with_controller(net: torch.nn.Module, controller) -> torch.nn.Module:
    """A copy of a pyramid network sharing its weights, with another iteration controller at every level."""
    import copy

    clone = copy.copy(net)
    clone._modules = dict(net._modules)  # same submodules (weights shared), own module dict
    clone.controller = controller
    return clone
