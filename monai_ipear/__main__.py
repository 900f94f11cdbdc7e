"""``python -m monai_ipear register | warp | jacobian``: see :mod:`monai_ipear.cli`."""

import sys

from .cli import cli_main

if __name__ == "__main__":
    sys.exit(cli_main())
