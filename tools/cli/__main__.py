"""`python -m tools.cli`: the same as the `lookalike` command."""

import sys

from tools.cli import main

sys.exit(main())
