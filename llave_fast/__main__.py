"""``python -m llave_fast`` is the ``llave-fast`` command."""

import sys

from .cli import main

sys.exit(main())
