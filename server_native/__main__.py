"""``python -m server_native``: the command line (see :mod:`server_native.cli`)."""

import sys

from .cli.main import main

if __name__ == "__main__":
    sys.exit(main())
