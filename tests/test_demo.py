"""The README's demo runs end to end: `examples/demo.py --quick` exits 0 and reports
the float64 exactness check."""

from __future__ import annotations

import os
import subprocess
import sys

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "demo.py")


def test_demo_quick():
    proc = subprocess.run([sys.executable, DEMO, "--quick"], check=False, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "max relative error:" in proc.stdout, output
    assert "peak memory" in proc.stdout, output
