"""``python -m locconf``: the ``locconf`` command."""

import sys

from .cli import main

sys.exit(main())
