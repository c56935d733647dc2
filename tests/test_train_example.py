"""examples/train_megapixel.py: the task's premise (the label vanishes when downsized)
and a short run of both trainings at a small size."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import torch

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "train_megapixel.py"


def load():
    spec = importlib.util.spec_from_file_location("train_megapixel", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_texture_vanishes_when_downsized():
    tm = load()
    pos = tm.make_image(torch.Generator().manual_seed(3), 256, True, 2, 16, 0.5)
    neg = tm.make_image(torch.Generator().manual_seed(3), 256, False, 2, 16, 0.5)
    assert abs((pos - neg).abs().max().item() - 1.0) < 1e-6  # the checkerboard, at full resolution
    assert (tm.downsize(pos, 8) - tm.downsize(neg, 8)).abs().max() < 1e-6  # gone at 1/8


def test_short_run_learns_streamed_only():
    tm = load()
    argv = "--size 256 --tile 96 --steps 40 --batch 8 --micro-batch 4 --val 32 --eval-every 20 --downsize 8"
    curves = tm.main(argv.split())
    streamed, downsized = curves["streamed 256px"], curves["downsized 32px"]
    assert [c[0] for c in streamed] == [c[0] for c in downsized] == [20, 40]
    assert all(math.isfinite(c[1]) for c in streamed + downsized)
    assert streamed[-1][2] >= 0.9
    assert downsized[-1][2] <= 0.75
