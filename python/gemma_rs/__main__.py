"""``python -m gemma_rs``: the ``gemma-rs`` command."""

import sys

from gemma_rs.cli import main

sys.exit(main())
