"""Registration tools people use instead of a trained network, as rows of the speed study.

The speed study times its rows interleaved in one process, so that their ratios come from one run; these modules
let it time two other tools the same way, each through its own Python API and with its own defaults:

- :class:`AntsSyN`: ANTsPy's ``ants.registration(fixed, moving, "SyN")`` (antspyx; its defaults: an affine stage,
  then SyN), up to the transform files it writes; nothing is resampled.
- :class:`UniGradICON`: uniGradICON's ``register_pair`` (packages ``unigradicon`` and ``icon_registration``), what
  its ``unigradicon-register`` command runs between reading and writing files: both images resampled to its
  175x175x175 input, the network in both directions, optionally its instance optimisation, and the ITK transforms.

Neither package is a dependency of this one: antspyx pins numpy < 2.4, and icon_registration asks for torchvision,
of which no CPU build exists on PyPI (``pip install --no-deps icon_registration unigradicon`` then ``footsteps
blosc pyyaml`` is what it needs to import). Run the benchmark from an environment that has them, for example a
virtual environment made with ``--system-site-packages``. uniGradICON's published weights are a GitHub release
that its code downloads on first use; without them (``--weights unigradicon=<Step_2_final.trch>``) the network is
random: the row then times the same computation but registers nothing, so it is a speed figure only.
"""

from __future__ import annotations

import contextlib
import io
import os

import torch

__all__ = ["AntsSyN", "UniGradICON", "has_unigradicon", "UNIGRADICON_MISSING"]

UNIGRADICON_MISSING = (
    "skipped: unigradicon / icon_registration not importable (pip install --no-deps unigradicon icon_registration; "
    "pip install footsteps blosc pyyaml)"
)


def has_unigradicon() -> bool:
    """Whether ``unigradicon`` (and with it ``icon_registration``) imports in this Python."""
    try:
        import unigradicon  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means the row cannot run
        return False
    return True


def _numpy_image(x: torch.Tensor, tool: str):
    """The one image of a ``(1, 1, *spatial)`` batch as a float32 array; the tools register one pair per call."""
    if x.ndim < 4 or x.shape[0] != 1 or x.shape[1] != 1:
        raise ValueError(f"{tool} takes one single-channel pair per call, (1, 1, *spatial); got {tuple(x.shape)}.")
    return x.detach().float().cpu()[0, 0].numpy()


class AntsSyN(torch.nn.Module):
    """ANTs SyN with ANTsPy's defaults as a timed call: ``forward(moving, fixed)`` with ``(1, 1, D, H, W)`` images
    returns ANTsPy's result dictionary (transform files), like the registration a user waits for; nothing is resampled.

    ITK's thread count follows torch's (``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``, unless already set), so that a
    study run with ``--threads 2`` gives ANTs 2 threads too.
    """

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor):
        import ants

        os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(torch.get_num_threads()))
        f_img, m_img = ants.from_numpy(_numpy_image(fixed, "ANTs SyN")), ants.from_numpy(_numpy_image(moving, "ANTs SyN"))
        return ants.registration(f_img, m_img, type_of_transform="SyN")


class UniGradICON(torch.nn.Module):
    """uniGradICON as a timed call: ``forward(moving, fixed)`` with ``(1, 1, D, H, W)`` images in [0, 1] (its MRI
    preprocessing's range) runs ``icon_registration.itk_wrapper.register_pair`` and returns its two ITK transforms.

    Args:
        weights: the published ``Step_2_final.trch`` (its ``regis_net`` state dict); None: random weights (speed only).
        io_steps: instance-optimisation steps (its command's ``--io_iterations``, default 50 there); None: the
            network alone (``--io_iterations None``).
    """

    def __init__(self, weights: str | None = None, io_steps: int | None = None) -> None:
        super().__init__()
        import unigradicon

        if io_steps is not None and io_steps < 1:
            raise ValueError(f"io_steps must be None or >= 1, got {io_steps}.")
        self.net = unigradicon.make_network(unigradicon.input_shape, include_last_step=True)
        if weights is not None:
            self.net.regis_net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        self.net.eval()
        self.io_steps = io_steps

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor):
        import itk
        from icon_registration import itk_wrapper

        if moving.ndim != 5:
            raise ValueError(f"uniGradICON registers 3D images, (1, 1, D, H, W); got {tuple(moving.shape)}.")
        m_img, f_img = (itk.image_from_array(_numpy_image(x, "uniGradICON")) for x in (moving, fixed))
        # its instance optimisation takes gradients (the study calls under no_grad); register_pair prints losses
        try:
            with torch.set_grad_enabled(self.io_steps is not None), contextlib.redirect_stdout(io.StringIO()):
                return itk_wrapper.register_pair(self.net, m_img, f_img, finetune_steps=self.io_steps)
        finally:
            # the network keeps the last call's transforms as closures over its tensors: memory held between calls,
            # and a module that no longer pickles (the study measures peak memory in a spawned process)
            self.net.clean()
