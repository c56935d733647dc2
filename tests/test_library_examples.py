"""examples/timm_classifier.py and examples/smp_segmentation.py run with --quick: the model
streams in several tiles, matches the plain model, and trains for the requested steps."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


@pytest.mark.parametrize("script", ["timm_classifier.py", "smp_segmentation.py"])
def test_example_quick(script):
    cmd = [sys.executable, os.path.join(EXAMPLES, script), "--quick", "--threads", "1"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    tiles = re.search(r"in (\d+) tiles", proc.stdout)
    assert tiles and int(tiles.group(1)) >= 2, output
    difference = re.search(r"max relative difference (\S+)", proc.stdout)
    assert difference and float(difference.group(1)) < 1e-4, output  # float32 rounding
    losses = [float(m.group(1)) for m in re.finditer(r"^ +\d+ (?: +\d )? *(\d+\.\d{4}) +\d+\.\ds$", proc.stdout, re.M)]
    assert len(losses) == 4, output
