"""The package's one boolean parser for values that may come from a bundle override or the command line.

``python -m monai.bundle run ... --resume false`` or ``--network_def#network#unroll_training false`` hands the
config the non-empty string ``'false'`` (``fire`` only turns ``False`` into a bool), which Python treats as true.
Every boolean setting that a config or a command can set is read through :func:`as_bool`.
"""

from __future__ import annotations

import numbers

__all__ = ["as_bool"]

_TRUE = {"true", "yes", "on", "1", "y", "t"}
_FALSE = {"false", "no", "off", "0", "n", "f"}


def as_bool(value, name: str = "value") -> bool:
    """``True``/``False`` from a bool, 0/1, or a string such as ``true``/``False``/``yes``/``off``
    (case-insensitive). Anything else raises ``ValueError`` naming ``name``: ``'flase'`` is not silently true."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and int(value) in (0, 1):
        return bool(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalar
        return as_bool(value.item(), name)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{name} must be a boolean (true/false), got {value!r}.")
