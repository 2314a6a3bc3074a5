"""``python -m captum_chains.cli``."""

import sys

from captum_chains.cli import main

sys.exit(main())
