"""The packaged default model and its file format.

``ipear_ixi_t1_2mm.pt`` (package data, next to this file) is a ``torch.save`` of one dict::

    {
        "format": "monai_ipear.pretrained/1",
        "network": "iPEAR",
        "config": {...},            # keyword arguments of monai_ipear.iPEAR
        "state_dict": {...},        # tensors stored in float16 (about 1 MB), loaded as float32
        "spacing": [2.0, 2.0, 2.0], # mm, the grid the network was trained on
        "preprocessing": {...},     # how the pipeline must present a pair (see DEFAULT_PREPROCESSING)
        "training": {...},          # data, recipe, steps, hardware (model card facts)
        "placeholder": bool,        # True: random weights standing in for the trained file
    }

``ipear_ixi_t1_2mm.json`` next to it holds the same dict without ``state_dict`` (human-readable; written by
:func:`save_pretrained`, checked against the ``.pt`` by the tests). :func:`load_pretrained` reads the ``.pt``.

Replace the weights with a trained bundle checkpoint::

    python -m monai_ipear.pretrained --checkpoint models/model_final.pt --steps 100000 \\
        --hardware "1x H100" --training-time "5 h" [--out monai_ipear/pretrained/ipear_ixi_t1_2mm.pt]

which stores float16 weights and measures, on a synthetic pair at the model's box size, how far the float16
model's field is from the float32 one (``fp16_field_difference`` in the metadata).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import warnings

import torch

__all__ = [
    "DEFAULT_MODEL_PATH",
    "DEFAULT_PREPROCESSING",
    "FORMAT",
    "PretrainedModelError",
    "is_pretrained_file",
    "load_pretrained",
    "save_pretrained",
    "fp16_field_difference",
]

FORMAT = "monai_ipear.pretrained/1"
DEFAULT_MODEL_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ipear_ixi_t1_2mm.pt")

#: Preprocessing of the IXI training data (``python -m monai_ipear.preprocessing``), which the pipeline repeats.
DEFAULT_PREPROCESSING = {
    "axcodes": "RAS",
    "mask": "brain mask applied to the image (training: DLMUSE label > 0)",
    "box": {"margin_voxels": 4, "k_divisible": 16, "around": "fixed brain mask"},
    "intensity": {"lower_percentile": 0.5, "upper_percentile": 99.5, "b_min": 0.0, "b_max": 1.0, "clip": True,
                  "over": "the masked image in the box (background zeros included)"},
    "prealign": {"method": "elastix", "transform": "affine", "metric": "AdvancedMattesMutualInformation",
                 "num_iterations": 256, "num_resolutions": 3},
}


class PretrainedModelError(ValueError):
    """The file is not a pretrained-model file of this package (or does not match its network)."""


def is_pretrained_file(path: str) -> bool:
    """True when ``path`` is a file in this format (a dict with ``format`` and ``state_dict``)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    return isinstance(obj, dict) and obj.get("format") == FORMAT and "state_dict" in obj


def _network(name: str, config: dict) -> torch.nn.Module:
    from ..networks import nets

    if not hasattr(nets, name):
        raise PretrainedModelError(f"unknown network '{name}' in the pretrained file.")
    return getattr(nets, name)(**config)


def load_pretrained(path: str | None = None, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict]:
    """Build the network of a pretrained file and load its (float16-stored) weights as float32.

    Args:
        path: the ``.pt`` file (default: the packaged :data:`DEFAULT_MODEL_PATH`).
        device: where the network goes.

    Returns:
        ``(network in eval mode, metadata)``; the metadata is the file's dict without ``state_dict``.
        A placeholder file (random weights) loads with a ``UserWarning``.
    """
    path = str(path or DEFAULT_MODEL_PATH)
    if not os.path.isfile(path):
        raise PretrainedModelError(f"model file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PretrainedModelError(f"cannot read model file {path}: {type(e).__name__}") from e
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT and "state_dict" in obj):
        raise PretrainedModelError(f"{path} is not a '{FORMAT}' file (a dict with 'format', 'config', 'state_dict').")
    meta = {k: v for k, v in obj.items() if k != "state_dict"}
    net = _network(meta.get("network", "iPEAR"), dict(meta.get("config", {})))
    state = {k: v.float() if torch.is_floating_point(v) else v for k, v in obj["state_dict"].items()}
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise PretrainedModelError(f"{path}: weights do not match {meta.get('network')}({meta.get('config')}): {e}") from e
    if meta.get("placeholder"):
        warnings.warn(f"{os.path.basename(path)} is a placeholder with random weights, not a trained model: its fields "
                      "are meaningless (the trained file replaces it).", UserWarning, stacklevel=2)
    return net.to(device).eval(), meta


def save_pretrained(
    net: torch.nn.Module,
    path: str,
    config: dict,
    spacing=(2.0, 2.0, 2.0),
    preprocessing: dict | None = None,
    training: dict | None = None,
    placeholder: bool = False,
    dtype: torch.dtype = torch.float16,
    extra: dict | None = None,
) -> dict:
    """Write ``net``'s weights (stored as ``dtype``) with the metadata to ``path`` and the metadata to the ``.json``
    of the same stem. Returns the metadata."""
    meta = {
        "format": FORMAT,
        "network": type(net).__name__,
        "config": dict(config),
        "spacing": [float(s) for s in spacing],
        "preprocessing": copy.deepcopy(preprocessing if preprocessing is not None else DEFAULT_PREPROCESSING),
        "training": dict(training or {}),
        "placeholder": bool(placeholder),
        "storage_dtype": str(dtype).replace("torch.", ""),
    }
    meta.update(extra or {})
    state = {k: (v.detach().cpu().to(dtype) if torch.is_floating_point(v) else v.detach().cpu())
             for k, v in net.state_dict().items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({**meta, "state_dict": state}, path)
    with open(os.path.splitext(path)[0] + ".json", "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    return meta


def fp16_field_difference(net: torch.nn.Module, shape=(80, 112, 80), seed: int = 0) -> dict:
    """Fields of ``net`` (float32) and of a copy with float16-rounded weights on one smooth random pair.

    Returns ``max_abs_voxels`` / ``mean_abs_voxels`` (field difference, voxels of the model's grid) and whether
    the iteration controller kept the same number of updates per level in both.
    """
    from monai.transforms import GaussianSmooth

    g = torch.Generator().manual_seed(seed)
    smooth = GaussianSmooth(sigma=3.0)
    pair = [smooth(torch.rand(1, *shape, generator=g)) for _ in range(2)]
    pair = [((p - p.min()) / (p.max() - p.min()))[None] for p in pair]
    half = copy.deepcopy(net)
    half.load_state_dict({k: v.half().float() if torch.is_floating_point(v) else v for k, v in net.state_dict().items()})
    out = {}
    with torch.no_grad():
        a = net.eval()(*pair)
        ia = getattr(net, "last_iterations", None)
        b = half.eval()(*pair)
        ib = getattr(half, "last_iterations", None)
    d = (a - b).abs()
    out["max_abs_voxels"] = float(d.max())
    out["mean_abs_voxels"] = float(d.mean())
    out["same_iterations"] = bool(ia is None or torch.equal(ia, ib))
    out["shape"] = list(shape)
    return out


def export_main(argv=None) -> dict:
    """``python -m monai_ipear.pretrained``: a trained bundle checkpoint -> the packaged float16 file."""
    p = argparse.ArgumentParser(prog="python -m monai_ipear.pretrained", description=export_main.__doc__)
    p.add_argument("--checkpoint", help="state_dict or training checkpoint ({'model': ...}) of iPEAR(spatial_dims=3)")
    p.add_argument("--placeholder", action="store_true", help="write random weights (seed 0) marked as a placeholder")
    p.add_argument("--out", default=DEFAULT_MODEL_PATH)
    p.add_argument("--steps", type=int, default=None, help="training steps (model card)")
    p.add_argument("--hardware", default=None)
    p.add_argument("--training-time", default=None)
    p.add_argument("--lr", default="1e-4", help="the learning rate(s) of the run, as written on the model card "
                                                "(e.g. '1e-4 for steps 1-2700, then 3e-5')")
    p.add_argument("--passes", default="one decoder pass per level",
                   help="the decoder passes per level in training, as written on the model card (e.g. 'one decoder "
                        "pass per level for steps 1-3300, then unrolled under TCI')")
    p.add_argument("--note", default=None, help="free text for the training metadata")
    p.add_argument("--check-shape", default="80x112x80", help="size of the fp16-vs-fp32 check pair")
    a = p.parse_args(argv)
    from ..networks import iPEAR

    config = {"spatial_dims": 3}
    torch.manual_seed(0)
    net = iPEAR(**config)
    if not a.placeholder:
        if not a.checkpoint:
            p.error("--checkpoint is required (or --placeholder)")
        state = torch.load(a.checkpoint, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
        net.load_state_dict(state)
    training = {
        "data": "IXI T1 (40 subjects of ixi_dlmuse_2mm; the last 6 of the sorted list held out for validation), "
                "CC BY-SA 3.0, IXI dataset, Imperial College London",
        "recipe": "local NCC (window 9, squared) + 1.0 x gradient smoothness (forward differences), "
                  f"Adam lr {a.lr}, batch 1, {a.passes}",
        "steps": a.steps, "hardware": a.hardware, "training_time": a.training_time, "note": a.note,
    }
    check = fp16_field_difference(net, tuple(int(v) for v in a.check_shape.lower().split("x")))
    meta = save_pretrained(net, a.out, config, training=training, placeholder=a.placeholder,
                           extra={"fp16_field_difference": check})
    size = os.path.getsize(a.out)
    print(f"wrote {a.out} ({size / 2**20:.2f} MiB); fp16 vs fp32 field: max {check['max_abs_voxels']:.2e}, "
          f"mean {check['mean_abs_voxels']:.2e} voxels, same updates per level: {check['same_iterations']}")
    return meta
