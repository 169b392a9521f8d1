"""``python -m difftrain``: the same as the ``difftrain`` command."""

import sys

from difftrain.cli import main

sys.exit(main())
