"""Run a snippet in a fresh interpreter: what a process imports can only be seen from outside
a test process that has imported everything already."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any


def run_fresh(code: str) -> Any:
    """Run ``code`` in a new ``python -c``; it sets ``RESULT`` (JSON-able), which is returned."""
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport json, sys\nprint(json.dumps(RESULT))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])
