"""The README's demo runs end to end: `examples/demo.py --quick` exits 0, reports the
float64 exactness check and the measured peaks, prints the predicted peaks at gigapixel
sides, and saves its plot into the folder it names (never the current directory)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

DEMO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "demo.py")


def test_demo_quick(tmp_path):
    out, cwd = tmp_path / "out", tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.run(
        [sys.executable, DEMO, "--quick", "--out", str(out)],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "max relative error:" in proc.stdout, output
    assert "peak memory" in proc.stdout, output
    # the prediction table (GiB): plain against carry, banded carry and recompute at 8k, 32k
    # and 100k; plain the largest, and at 100k carry's stripe store makes it the largest
    # streamed figure
    rows = re.findall(r"^\s+([\d,]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\d+)x$", proc.stdout, re.M)
    assert [r[0] for r in rows] == ["8,192", "32,768", "100,000"], output
    for _, plain, carry, banded, recompute, _ in rows:
        assert float(plain) > 5 * max(float(carry), float(banded), float(recompute)), output
    _, _, carry, banded, recompute, _ = rows[-1]
    assert float(carry) > max(float(banded), float(recompute)), output
    png = out / "memory-vs-side.png"
    assert f"plot of predicted memory against image side: {png}" in proc.stdout, output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(cwd.iterdir()) == []  # nothing written into the current directory
