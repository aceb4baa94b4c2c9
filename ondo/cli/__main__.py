"""`python -m ondo.cli`: the `ondo` command."""
import sys

from ondo.cli import main

if __name__ == "__main__":
    sys.exit(main())
