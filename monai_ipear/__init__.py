"""monai_ipear: iPEAR and comparable pyramid registration networks as MONAI components.

Importing the package makes every component resolvable by its short name in MONAI bundle configs
(``"_target_": "FARM"``), because MONAI's ComponentLocator scans loaded modules whose names start with
``monai``.
"""

__version__ = "0.1.0"

from .controllers import *  # noqa: F401,F403
from .networks import *  # noqa: F401,F403
from .data import *  # noqa: F401,F403
from .engines import *  # noqa: F401,F403
from .losses import *  # noqa: F401,F403
from .metrics import *  # noqa: F401,F403
from .export import ExportableRegistrationNet  # noqa: F401
