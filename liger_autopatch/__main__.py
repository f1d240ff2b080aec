"""``python -m liger_autopatch``: see :mod:`liger_autopatch.cli`."""

import sys

from liger_autopatch.cli import main

sys.exit(main())
