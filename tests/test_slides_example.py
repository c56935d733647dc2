"""examples/train_from_slides.py: the premise (the label is gone from pyramid level 1 up)
and a --quick run that learns from the files through a DataLoader worker."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import numpy as np
import pytest

pytest.importorskip("tifffile")  # the 'slides' extra, installed by the 'test' extra

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "examples" / "train_from_slides.py"


def load():
    spec = importlib.util.spec_from_file_location("train_from_slides", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_label_only_at_level_zero(tmp_path):
    ts = load()
    pos = ts.make_slide(np.random.default_rng(3), 96, True, 16)
    neg = ts.make_slide(np.random.default_rng(3), 96, False, 16)
    assert np.abs(pos.astype(int) - neg).max() == ts.CHECKER  # the texture, at full resolution
    path = tmp_path / "pos.tif"
    ts.write_slide(path, pos, levels=3, tile=32)
    import fxstream

    assert np.array_equal(np.asarray(fxstream.open_image(path))[0, 1], pos)  # level 0 keeps the texture
    for level in (1, 2):  # read back from the file: identical to the negative's pyramid
        rgb = np.asarray(fxstream.open_image(path, level))[0]
        assert all(np.array_equal(channel, ts.pyramid(neg, 3)[level]) for channel in rgb)


def test_quick_run_learns_from_files(tmp_path):
    ts = load()
    result = ts.main(["--quick", "--dir", str(tmp_path)])
    assert len(list(tmp_path.glob("*.tif"))) == 32
    assert all(math.isfinite(loss) for _, loss, _ in result["history"])
    assert result["accuracy"] >= 0.9
    assert result["seconds_per_step"] > 0 and result["file_bytes"] > 0 and result["peak_rss"] > 0
