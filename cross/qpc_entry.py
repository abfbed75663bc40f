"""Entry point frozen by PyInstaller: the same `main` as the `qpc` console script."""

import os
import sys

if __name__ == "__main__":
    if os.environ.get("QPC_MEASURE_BARE"):
        # cross/measure.py's reference: the bundled interpreter with nothing of qpc
        # imported, so the node's RSS is reported as a ratio that holds across machines.
        with open("/proc/self/status") as status:
            print(next(ln.split()[1] for ln in status if ln.startswith("VmRSS:")))
        sys.exit(0)
    from qpc_node.cli import main

    sys.exit(main())
