"""The bundle's code, in the MONAI Model Zoo layout (``<bundle_root>/scripts``).

In the released archive the ``monai_ipear`` package source travels in ``scripts/monai_ipear`` (``python -m
bundle.make_bundle build`` copies it there), so the bundle needs no unpublished package: importing ``scripts`` puts
this folder first on ``sys.path`` and imports that copy. In the repository (no ``scripts/monai_ipear``) it imports
the package itself. The configs import ``scripts`` after adding ``bundle_root`` to ``sys.path`` (``initialize``; when
``bundle_root`` has no ``scripts/``, e.g. a run folder outside the repository, the installed package instead), and
in ``imports`` for tools that parse a config without running it (the bundle root is then already on the path, as in
the zoo's CI or ``python -m monai.bundle`` started in the bundle folder); the package's short ``_target_`` names
(``iPEAR``, ``TCI``, ...) resolve once it is imported.
"""

import os
import sys
import warnings

_HERE = os.path.dirname(os.path.abspath(__file__))
_BUNDLED = os.path.join(_HERE, "monai_ipear")

if os.path.isdir(_BUNDLED):
    _loaded = sys.modules.get("monai_ipear")
    if _loaded is not None and os.path.dirname(os.path.abspath(str(_loaded.__file__))) != _BUNDLED:
        warnings.warn(f"monai_ipear was already imported from {_loaded.__file__}; the bundle's copy in {_BUNDLED} "
                      "is not used.")
    elif _HERE not in sys.path:
        sys.path.insert(0, _HERE)

import monai_ipear  # noqa: E402
from monai_ipear import *  # noqa: E402,F401,F403

__version__ = monai_ipear.__version__
