"""Checkpoint handlers that never leave a corrupt checkpoint and resume a training run where it stopped.

- :class:`AtomicCheckpointSaver`: MONAI's :class:`~monai.handlers.CheckpointSaver` with ignite's atomic disk
  writes switched on. MONAI builds its ``DiskSaver`` objects with ``atomic=False`` (its comment is about file
  permissions; ignite >= 0.4 adds group/other read permission after the atomic ``os.replace``), so a crash while
  ``torch.save`` runs truncates the previous checkpoint of the same name (``model_final.pt``, ``model.pt``).
  With ``atomic=True`` ignite writes a temporary file in the same folder and renames it over the target only
  after the write succeeded, and the checkpoints it replaces are removed only after that (ignite removes them
  first). Optionally the engine itself (epoch, iteration) is saved with the objects.
- :class:`ResumeCheckpointLoader`: MONAI's :class:`~monai.handlers.CheckpointLoader` that also restores the
  engine's epoch and iteration when the checkpoint holds them (``"trainer"``), so ``--resume true`` with the same
  ``max_epochs`` finishes the run instead of training ``max_epochs`` more epochs. The engine cannot be named in a
  bundle config's ``save_dict`` / ``load_dict`` (the trainer's handlers would refer to the trainer: a circular
  reference), hence these two small subclasses add it when they are attached / called.
"""

from __future__ import annotations

import os

import torch
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointLoader, CheckpointSaver

__all__ = ["AtomicCheckpointSaver", "ResumeCheckpointLoader"]


class _WriteThenRemove(BaseSaveHandler):
    """Wraps ignite's ``DiskSaver`` (atomic): old checkpoints are removed only AFTER the new one was written.

    ignite's ``Checkpoint`` removes the checkpoint that falls out of ``n_saved`` (or the file of the same name)
    before writing the new one, so a crash while writing would leave no checkpoint at all with ``n_saved=1``.
    Here removals are queued and done after the next successful write; a file being written again is replaced
    by the atomic rename instead of being removed.
    """

    def __init__(self, inner) -> None:
        self.inner = inner
        self.pending: list[str] = []

    def _name(self, filename: str) -> str:
        return getattr(self.inner, "filename", None) or filename  # MONAI's fixed-name saver writes its own name

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
        self.inner(checkpoint, filename, metadata)
        written = self._name(filename)
        pending, self.pending = self.pending, []
        for name in pending:
            if self._name(name) != written and os.path.exists(os.path.join(self.inner.dirname, self._name(name))):
                self.inner.remove(name)

    def remove(self, filename: str) -> None:
        self.pending.append(filename)


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
            ckpt.save_handler = _WriteThenRemove(ckpt.save_handler)

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
