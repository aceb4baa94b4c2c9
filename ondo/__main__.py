"""`python -m ondo`: the `ondo` command (see ondo/cli)."""
import sys

from ondo.cli import main

if __name__ == "__main__":
    sys.exit(main())
