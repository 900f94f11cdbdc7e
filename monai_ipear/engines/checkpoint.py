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
- :func:`find_resume_checkpoint`: which file ``--resume true`` loads. Given the checkpoint folder (the bundle's
  default) it takes the newest run checkpoint there (``model_final.pt`` or ``checkpoint_epoch=N.pt``), so a killed
  run resumes its own last epoch, not an older run's ``model_final.pt``; the loader logs the file it takes.
"""

from __future__ import annotations

import glob
import logging
import os
import time

import torch
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointLoader, CheckpointSaver

__all__ = ["AtomicCheckpointSaver", "ResumeCheckpointLoader", "find_resume_checkpoint"]

RUN_CHECKPOINTS = ("model_final.pt", "checkpoint_epoch=*.pt")  # what the bundle's train.json saver writes


def _run_checkpoints(folder: str) -> list[str]:
    found = {f for pattern in RUN_CHECKPOINTS for f in glob.glob(os.path.join(glob.escape(folder), pattern))}
    return sorted(found, key=lambda f: (os.path.getmtime(f), f))


def find_resume_checkpoint(path: str) -> str:
    """The checkpoint ``--resume true`` loads.

    ``path`` a folder: its newest (modification time) ``model_final.pt`` / ``checkpoint_epoch=N.pt``; a killed run
    has no ``model_final.pt`` of its own, and an older run's one must not be taken instead of its last epoch
    checkpoint. ``path`` a file: that file. ``FileNotFoundError`` with the files available when there is none.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        found = _run_checkpoints(path)
        if not found:
            raise FileNotFoundError(f"--resume true: no checkpoint to resume in {path} (model_final.pt or "
                                    "checkpoint_epoch=N.pt); start the run without --resume")
        return found[-1]
    if not os.path.isfile(path):
        folder = os.path.dirname(path) or "."
        there = [os.path.basename(f) for f in _run_checkpoints(folder)] if os.path.isdir(folder) else []
        raise FileNotFoundError(f"--resume true: checkpoint {path} does not exist"
                                + (f" (checkpoints in {folder}: {', '.join(there)})" if there else
                                   "; start the run without --resume"))
    return path


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
        # MONAI's StatsHandler (and this saver) re-raise in their EXCEPTION_RAISED handler, and ignite stops at
        # the first handler that raises: attached after a StatsHandler, the checkpoint "written on exception"
        # never was. Run this saver's exception handler first, whatever the handler order in the config.
        from ignite.engine import Events

        handlers = engine._event_handlers[Events.EXCEPTION_RAISED]
        ours = [h for h in handlers if getattr(h[0], "__self__", None) is self]
        engine._event_handlers[Events.EXCEPTION_RAISED] = ours + [h for h in handlers if h not in ours]


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
        self.requested_path = self.load_path

    def __call__(self, engine) -> None:
        self.load_path = find_resume_checkpoint(self.requested_path)
        keys = torch.load(self.load_path, map_location="cpu", weights_only=True)
        state = keys.get(self.engine_key) if isinstance(keys, dict) else None
        progress = f"epoch {state.get('epoch')}, iteration {state.get('iteration')}" if isinstance(state, dict) else \
            "weights only"
        written = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(os.path.getmtime(self.load_path)))
        logging.getLogger(__name__).warning("resuming from %s (%s, written %s)", self.load_path, progress, written)
        newer = [f for f in _run_checkpoints(os.path.dirname(self.load_path) or ".")
                 if os.path.getmtime(f) > os.path.getmtime(self.load_path)]
        if newer:
            logging.getLogger(__name__).warning(
                "%s is older than %s in the same folder (a later run?); resuming the older file as asked",
                self.load_path, ", ".join(newer))
        if isinstance(keys, dict) and self.engine_key in keys and self.engine_key not in self.load_dict:
            self.load_dict = {**self.load_dict, self.engine_key: engine}
        super().__call__(engine)
