"""``python -m captum_chains.cli``."""

import sys

from captum_chains.cli import main

if __name__ == "__main__":  # importing this module (e.g. for API docs) runs nothing
    sys.exit(main())
