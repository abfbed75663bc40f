"""Entry point frozen by PyInstaller: the same `main` as the `qpc` console script."""

import sys

from qpc_node.cli import main

if __name__ == "__main__":
    sys.exit(main())
