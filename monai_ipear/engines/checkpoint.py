"""Checkpoint handlers that never leave a corrupt checkpoint and resume a training run where it stopped.

- :class:`AtomicCheckpointSaver`: MONAI's :class:`~monai.handlers.CheckpointSaver` with ignite's atomic disk
  writes switched on. MONAI builds its ``DiskSaver`` objects with ``atomic=False`` (its comment is about file
  permissions; ignite >= 0.4 adds group/other read permission after the atomic ``os.replace``), so a crash while
  ``torch.save`` runs truncates the previous checkpoint of the same name (``model_final.pt``, ``model.pt``).
  With ``atomic=True`` ignite writes a temporary file in the same folder and renames it over the target only
  after the write succeeded. Optionally the engine itself (epoch, iteration) is saved with the objects.
- :class:`ResumeCheckpointLoader`: MONAI's :class:`~monai.handlers.CheckpointLoader` that also restores the
  engine's epoch and iteration when the checkpoint holds them (``"trainer"``), so ``--resume true`` with the same
  ``max_epochs`` finishes the run instead of training ``max_epochs`` more epochs. The engine cannot be named in a
  bundle config's ``save_dict`` / ``load_dict`` (the trainer's handlers would refer to the trainer: a circular
  reference), hence these two small subclasses add it when they are attached / called.
"""

from __future__ import annotations

import torch
from monai.handlers import CheckpointLoader, CheckpointSaver

__all__ = ["AtomicCheckpointSaver", "ResumeCheckpointLoader"]


class AtomicCheckpointSaver(CheckpointSaver):
    """:class:`monai.handlers.CheckpointSaver` (same arguments) whose checkpoints are written atomically.

    Args:
        save_engine: also save the engine the handler is attached to (epoch, iteration, max_epochs) under
            ``engine_key``, for :class:`ResumeCheckpointLoader`.
        engine_key: key of the engine's state in the checkpoint dict.
        args, kwargs: those of :class:`monai.handlers.CheckpointSaver`.
    """

    def __init__(self, *args, save_engine: bool = False, engine_key: str = "trainer", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.save_engine = save_engine
        self.engine_key = engine_key
        for ckpt in self._checkpoints():
            ckpt.save_handler._atomic = True  # ignite's DiskSaver flag: temp file + os.replace

    def _checkpoints(self) -> list:
        return [c for c in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint)
                if c is not None]

    def attach(self, engine) -> None:
        if self.save_engine:
            for ckpt in self._checkpoints():
                ckpt.to_save = {**ckpt.to_save, self.engine_key: engine}
        super().attach(engine)


class ResumeCheckpointLoader(CheckpointLoader):
    """:class:`monai.handlers.CheckpointLoader` (same arguments) that also restores the engine's progress.

    When the checkpoint has an ``engine_key`` entry (written by ``AtomicCheckpointSaver(save_engine=True)``) and
    ``load_dict`` does not name it, the engine being resumed is loaded from it: the run continues at the saved
    epoch up to the engine's ``max_epochs`` (MONAI raises a clear error when the checkpoint is already past it).
    Checkpoints without it load as with :class:`monai.handlers.CheckpointLoader` (weights only, epoch 0).
    """

    def __init__(self, *args, engine_key: str = "trainer", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.engine_key = engine_key

    def __call__(self, engine) -> None:
        keys = torch.load(self.load_path, map_location="cpu", weights_only=True)
        if isinstance(keys, dict) and self.engine_key in keys and self.engine_key not in self.load_dict:
            self.load_dict = {**self.load_dict, self.engine_key: engine}
        super().__call__(engine)
