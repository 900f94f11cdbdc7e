"""Loading the published IIRP-Net checkpoint (Torbjorn1997/IIRP-Net, voxelmorph ``LoadableModel`` format) into RPNet.

The published file is a dict ``{"config": {"in_channel", "first_channel", "size"}, "model_state": state_dict}``.
Its module names differ from ours; :func:`iirp_key_map` gives the one-to-one correspondence:

=================================  ===========================================
published                          :class:`~monai_ipear.networks.nets.RPNet`
=================================  ===========================================
``encoder.block1.main``            ``encoder.levels.0.conv``
``encoder.block{i}.main``, i > 1   ``encoder.levels.{i-1}.1.conv`` (after the pooling)
``decoder{l}.Conv1.main``          ``decoders.{l-1}.body.cl1.conv``
``decoder{l}.Conv2.main``          ``decoders.{l-1}.body.res1.conv.conv``
``decoder{l}.Conv3.main``          ``decoders.{l-1}.body.res2.conv.conv``
``decoder{l}.Conv4``               ``decoders.{l-1}.body.cl2.conv``
``decoder{l}.Conv5``               ``decoders.{l-1}.head.conv``
=================================  ===========================================

(``l`` = pyramid level, 1 = full resolution, as in both codes.) Spatial-transformer grid buffers
(``*.grid``), which the published ``LoadableModel.save`` normally strips, are accepted and ignored.
The published code warps with zero padding and ``align_corners=True`` sampling and upsamples fields with
``align_corners=True``; RPNet's defaults (``padding_mode="zeros"``, :class:`FieldComposer`) do the same.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping

import torch

from ...controllers import IterationController, IterStop
from .rpnet import RPNet

__all__ = ["IIRPCheckpointError", "iirp_key_map", "convert_iirp_state_dict", "load_iirp_checkpoint"]

_LEVELS = 4
_ENCODER = {"main": "conv"}
_DECODER = {
    "Conv1.main": "body.cl1.conv",
    "Conv2.main": "body.res1.conv.conv",
    "Conv3.main": "body.res2.conv.conv",
    "Conv4": "body.cl2.conv",
    "Conv5": "head.conv",
}


class IIRPCheckpointError(ValueError):
    """The file is not a published IIRP-Net / RP-Net checkpoint that :class:`RPNet` can represent."""


def iirp_key_map(levels: int = _LEVELS) -> dict[str, str]:
    """Published ``model_state`` key -> RPNet ``state_dict`` key, for every weight and bias."""
    mapping: dict[str, str] = {}
    for i in range(1, levels + 1):
        for p in ("weight", "bias"):
            ours_conv = "encoder.levels.0.conv" if i == 1 else f"encoder.levels.{i - 1}.1.conv"  # level i > 1: (pool, conv)
            mapping[f"encoder.block{i}.main.{p}"] = f"{ours_conv}.{p}"
            for theirs, ours in _DECODER.items():
                mapping[f"decoder{i}.{theirs}.{p}"] = f"decoders.{i - 1}.{ours}.{p}"
    return mapping


def convert_iirp_state_dict(model_state: Mapping[str, torch.Tensor], model: RPNet) -> dict[str, torch.Tensor]:
    """Rename a published ``model_state`` to ``model``'s keys, checking that every key and shape matches.

    Raises:
        IIRPCheckpointError: naming the missing, unexpected or mis-shaped entries. Nothing is loaded.
    """
    mapping = iirp_key_map(model.levels)
    target = model.state_dict()
    state = {k: v for k, v in model_state.items() if not k.endswith(".grid")}
    missing = sorted(set(mapping) - set(state))
    unexpected = sorted(set(state) - set(mapping))
    problems = []
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    converted: dict[str, torch.Tensor] = {}
    for theirs, ours in mapping.items():
        if theirs not in state:
            continue
        value = state[theirs]
        if not isinstance(value, torch.Tensor):
            problems.append(f"{theirs} is a {type(value).__name__}, not a tensor")
            continue
        if tuple(value.shape) != tuple(target[ours].shape):
            problems.append(f"{theirs} has shape {tuple(value.shape)}, {ours} needs {tuple(target[ours].shape)}")
            continue
        converted[ours] = value.detach().to(target[ours].dtype)
    uncovered = sorted(set(target) - set(mapping.values()))
    if uncovered:
        problems.append(f"the model has entries the checkpoint format does not cover: {uncovered}")
    if problems:
        raise IIRPCheckpointError("not an IIRP-Net/RP-Net checkpoint for this RPNet: " + "; ".join(problems) + ".")
    return converted


def load_iirp_checkpoint(
    path: str | os.PathLike,
    controller: IterationController | None = None,
    faithful: bool = True,
    map_location: str | torch.device = "cpu",
) -> RPNet:
    """Build an :class:`RPNet` (3D) and load the published IIRP-Net checkpoint into it, all or nothing.

    Args:
        path: the published ``.pt`` file (e.g. ``model/mind.pt`` of Torbjorn1997/IIRP-Net), read with
            ``weights_only=True``: tensors, dicts, lists and numbers only, so a crafted file cannot run code.
        controller: iteration control; default ``IterStop(faithful=faithful)``, i.e. IIRP-Net. Pass
            :class:`~monai_ipear.controllers.SinglePass` for RP-Net or :class:`~monai_ipear.controllers.TCI`
            for IIRP+TCI.
        faithful: for the default controller, reproduce the published code's IterStop decisions.
        map_location: passed to :func:`torch.load`.

    Returns:
        the network in eval mode, ``config`` of the file in ``net.iirp_config``.

    Raises:
        IIRPCheckpointError: the file is not a dict with ``config`` and ``model_state``, its config is not the
            3D single-channel ``first_channel=8`` architecture, or the weights do not match (see
            :func:`convert_iirp_state_dict`).
    """
    try:
        checkpoint = torch.load(os.fspath(path), map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():  # not a pickle at all (a text file, a truncated download)
            raise IIRPCheckpointError(f"cannot read {os.fspath(path)!r} as a torch checkpoint: {e}") from e
        # an object torch's restricted unpickler does not allow: refused, never constructed or executed
        raise IIRPCheckpointError(
            f"cannot read {os.fspath(path)!r}: it holds Python objects other than tensors, dicts, lists and numbers "
            "and is not loaded (unpickling it could run code).") from e
    except Exception as e:  # unreadable / not a torch file
        raise IIRPCheckpointError(f"cannot read {os.fspath(path)!r} as a torch checkpoint: {e}") from e
    if not isinstance(checkpoint, Mapping) or "model_state" not in checkpoint:
        keys = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise IIRPCheckpointError(f"{os.fspath(path)!r} is not a voxelmorph LoadableModel file (got {keys}).")
    config = dict(checkpoint.get("config") or {})
    in_channels = int(config.get("in_channel", 1))
    first = int(config.get("first_channel", 8))
    if first != 8:
        # the published RPNet hard-codes the decoder widths for first_channel = 8
        raise IIRPCheckpointError(f"config first_channel={first}: only the published first_channel=8 is supported.")
    size = config.get("size")
    if size is not None and len(size) != 3:
        raise IIRPCheckpointError(f"config size={size}: the published network is 3D.")
    net = RPNet(
        spatial_dims=3,
        in_channels=in_channels,
        encoder_channels=(8, 16, 32, 32),
        decoder_channels=(16, 32, 32, 32),
        controller=controller if controller is not None else IterStop(faithful=faithful),
        padding_mode="zeros",
    )
    net.load_state_dict(convert_iirp_state_dict(checkpoint["model_state"], net), strict=True)
    net.iirp_config = config
    return net.eval()
