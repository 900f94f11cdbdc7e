"""Checks that run before a training run starts, so that a mistake costs seconds, not an epoch.

- :func:`as_bool` (from :mod:`monai_ipear.booleans`): the one boolean parser for bundle and CLI overrides.
- :func:`check_training_setup`: types and ranges of the numeric settings, the datalist's label values against
  ``num_classes``, writable checkpoint and log folders, and a checkpoint to resume from; every problem found is
  reported in one ``ValueError``.
- :class:`TrainingRunLock`: one training run per checkpoint folder. A second run into the same ``bundle_root``
  (``ckpt_dir``) is refused while the first is alive; the lock of a killed run is taken over.
"""

from __future__ import annotations

import atexit
import json
import logging
import numbers
import os
import socket
import tempfile
import time

from ..booleans import as_bool

__all__ = ["as_bool", "check_training_setup", "TrainingRunLock"]

logger = logging.getLogger(__name__)


def _positive_number(value, name: str, problems: list, integer: bool = False, minimum: float = 0.0,
                     strict: bool = True) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok and integer:
        ok = float(value) == int(value) and isinstance(value, numbers.Integral)
    if ok:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        kind = "an integer" if integer else "a number"
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        problems.append(f"{name} must be {kind} {bound}, got {value!r} ({type(value).__name__})")


def _writable(folder: str, name: str, problems: list) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test_"):
            pass
    except OSError as e:
        problems.append(f"{name} {folder!r} is not writable ({type(e).__name__}: {e.strerror or e})")


def _label_range(pairs, num_classes, problems: list) -> None:
    """Every label value of the files in ``pairs`` must lie in ``[0, num_classes)``: MONAI's one-hot Dice of the
    validation silently ignores larger values."""
    import nibabel as nib
    import numpy as np

    files = sorted({p[k] for p in pairs for k in ("moving_label", "fixed_label") if k in p})
    for f in files:
        try:
            data = np.asarray(nib.load(f).dataobj)
        except Exception:  # other formats: read with MONAI
            from monai.transforms import LoadImage

            data = np.asarray(LoadImage(image_only=True, dtype="float64")(f))
        if data.size and (np.nanmax(data) >= num_classes or np.nanmin(data) < 0):
            problems.append(f"label map {f} holds values {np.nanmin(data):g}..{np.nanmax(data):g} but num_classes="
                            f"{num_classes}: labels >= num_classes would be left out of the validation Dice; pass "
                            f"--num_classes {int(np.nanmax(data)) + 1} (or relabel)")
            return


def check_training_setup(
    ckpt_dir: str,
    output_dir: str | None = None,
    lr=None,
    max_epochs=None,
    batch_size=None,
    val_interval=None,
    num_workers=None,
    num_classes=None,
    resume=False,
    ckpt_path: str | None = None,
    shuffle=None,
    val_pairs=None,
    datalist=None,
) -> bool:
    """Validate a training configuration before any work: raise one ``ValueError`` listing every problem.

    Checks: ``lr`` a number > 0; ``max_epochs``, ``batch_size``, ``val_interval`` integers >= 1, ``num_workers``
    >= 0, ``num_classes`` >= 2; ``resume`` and ``shuffle`` booleans (:func:`as_bool`); ``ckpt_dir`` and
    ``output_dir`` writable (created); with a ``datalist``, validation pairs with label maps whose values lie in
    ``[0, num_classes)`` (the bundle's validation Dice and ``model.pt`` selection need them); with ``resume``, a
    checkpoint to resume (:func:`~monai_ipear.engines.checkpoint.find_resume_checkpoint`). Returns True.
    """
    problems: list[str] = []
    if lr is not None:
        _positive_number(lr, "lr", problems)
    for name, value in (("max_epochs", max_epochs), ("batch_size", batch_size), ("val_interval", val_interval)):
        if value is not None:
            _positive_number(value, name, problems, integer=True, minimum=1, strict=False)
    if num_workers is not None:
        _positive_number(num_workers, "num_workers", problems, integer=True, minimum=0, strict=False)
    if num_classes is not None:
        _positive_number(num_classes, "num_classes", problems, integer=True, minimum=2, strict=False)
    flags = {}
    for name, value in (("resume", resume), ("shuffle", shuffle)):
        if value is None:
            continue
        try:
            flags[name] = as_bool(value, name)
        except ValueError as e:
            problems.append(str(e).rstrip("."))
        if name == "shuffle" and isinstance(value, str):
            problems.append(f"train#dataloader#shuffle is the string {value!r}, which DataLoader takes as true: "
                            "use --shuffle false (parsed) or a Python bool (False)")
    _writable(ckpt_dir, "checkpoint folder (ckpt_dir)", problems)
    if output_dir is not None:
        _writable(output_dir, "log folder (output_dir)", problems)
    if datalist is not None and val_pairs is not None:
        if val_pairs and not all("fixed_label" in p for p in val_pairs):
            problems.append("the validation subjects have no label maps: the validation Dice (key metric of "
                            "models/model.pt) needs a 'label' per subject")
        elif val_pairs and isinstance(num_classes, numbers.Integral):
            _label_range(val_pairs, int(num_classes), problems)
    if flags.get("resume"):
        from .checkpoint import find_resume_checkpoint

        try:
            find_resume_checkpoint(ckpt_path if ckpt_path is not None else ckpt_dir)
        except FileNotFoundError as e:
            problems.append(str(e).rstrip("."))
    if problems:
        raise ValueError("training not started: " + "; ".join(problems) + ".")
    return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class TrainingRunLock:
    """A lock file ``<directory>/.training.lock`` (pid, host, start time) held for the duration of a training run.

    ``acquire`` creates it atomically (``O_EXCL``). When it exists: a lock of this process, or of a dead process on
    this host (a killed run), is taken over with a warning; a live one is refused with ``RuntimeError`` naming
    the other run. ``release`` (also at interpreter exit) removes it when it is still ours.

    Args:
        directory: the folder the run writes its checkpoints to (the bundle's ``ckpt_dir``).
        enabled: ``False`` makes acquire/release no-ops (e.g. ranks > 0 of a distributed run).
    """

    name = ".training.lock"

    def __init__(self, directory: str, enabled=True) -> None:
        self.directory = str(directory)
        self.path = os.path.join(self.directory, self.name)
        self.enabled = as_bool(enabled, "enabled")
        self.held = False

    def _read(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}

    def acquire(self) -> TrainingRunLock:
        if not self.enabled or self.held:
            return self
        os.makedirs(self.directory, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self._read()
                pid, host = other.get("pid"), other.get("host")
                if not other and time.time() - os.path.getmtime(self.path) < 5:
                    time.sleep(0.2)  # being written right now
                    continue
                mine = host == me["host"] and isinstance(pid, int)
                if other and not (mine and (pid == me["pid"] or not _alive(pid))):
                    raise RuntimeError(
                        f"another training run (pid {pid} on {host}, started {other.get('started')}) is writing to "
                        f"{self.directory}; two runs would overwrite each other's checkpoints. Use another bundle_root "
                        f"(or ckpt_dir), or wait for it to end; if no run is active, delete {self.path}.")
                logger.warning("taking over the lock of an ended training run (%s) in %s", other or "unreadable",
                               self.directory)
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            atexit.register(self.release)
            return self
        raise RuntimeError(f"could not take the training lock {self.path}.")

    def release(self) -> None:
        if self.held and self._read().get("pid") == os.getpid():
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        self.held = False
