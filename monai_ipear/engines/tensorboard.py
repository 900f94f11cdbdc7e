"""TensorBoard image slices for registration: fixed, moving, warped and the field as a colour map.

MONAI's ``TensorBoardImageHandler`` shows one image/label/prediction per call (3D as an animated GIF) and has
no displacement-field rendering, so this small handler writes the central slices of the four panels itself.
"""

from __future__ import annotations

import torch

__all__ = ["RegistrationImageLogger", "ddf_colour_map"]


def ddf_colour_map(ddf_slice: torch.Tensor) -> torch.Tensor:
    """A 2D displacement slice ``(spatial_dims, H, W)`` -> RGB ``(3, H, W)`` in [0, 1]: each component mapped
    to one colour channel, 0.5 = no displacement, scaled by the slice's largest absolute value."""
    scale = ddf_slice.abs().max().clamp_min(1e-6)
    rgb = 0.5 + 0.5 * ddf_slice / scale
    if rgb.shape[0] == 2:
        rgb = torch.cat([rgb, torch.full_like(rgb[:1], 0.5)])
    return rgb.clamp(0, 1)


def _central_slice(x: torch.Tensor) -> torch.Tensor:
    """``(C, *spatial)`` -> ``(C, H, W)``: the middle slice along the last axis in 3D."""
    return x[..., x.shape[-1] // 2] if x.ndim == 4 else x


class RegistrationImageLogger:
    """Every ``interval`` epochs (or iterations), write central slices of the first pair of the last batch.

    Args:
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter`` (share it with ``TensorBoardStatsHandler``),
            or ``None`` to create one in ``log_dir``.
        log_dir: used when ``summary_writer`` is None.
        interval: how often to log.
        epoch_level: log at epoch (True) or iteration (False) completion.
        tag_prefix: prefix of the image tags.

    Reads the engine output of the registration iterations: ``image``/``label``/``pred`` (train) or
    ``moving_image``/``fixed_image``/``warped_image`` (evaluation), and ``ddf``.
    """

    def __init__(self, summary_writer=None, log_dir: str = "./runs", interval: int = 1, epoch_level: bool = True,
                 tag_prefix: str = "") -> None:
        if summary_writer is None:
            from torch.utils.tensorboard import SummaryWriter

            summary_writer = SummaryWriter(log_dir=log_dir)
        self.writer = summary_writer
        self.interval = interval
        self.epoch_level = epoch_level
        self.tag_prefix = tag_prefix

    def attach(self, engine) -> None:
        from ignite.engine import Events

        event = Events.EPOCH_COMPLETED if self.epoch_level else Events.ITERATION_COMPLETED
        engine.add_event_handler(event(every=self.interval), self)

    def __call__(self, engine) -> None:
        out = engine.state.output
        if isinstance(out, list):  # decollated
            out = out[0]
        moving = out.get("moving_image", out.get("image"))
        fixed = out.get("fixed_image", out.get("label"))
        warped = out.get("warped_image", out.get("pred"))
        ddf = out.get("ddf")
        step = engine.state.epoch if self.epoch_level else engine.state.iteration
        panels = {"fixed": fixed, "moving": moving, "warped": warped}
        for name, img in panels.items():
            if img is None:
                continue
            sl = _central_slice(img[0].detach().float().cpu())[:1]  # first pair, first channel
            self.writer.add_image(f"{self.tag_prefix}{name}", sl.clamp(0, 1), step, dataformats="CHW")
        if ddf is not None:
            self.writer.add_image(
                f"{self.tag_prefix}ddf", ddf_colour_map(_central_slice(ddf[0].detach().float().cpu())), step,
                dataformats="CHW",
            )
        self.writer.flush()
