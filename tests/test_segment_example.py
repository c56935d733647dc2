"""examples/segment_megapixel.py --quick trains the streamed U-Net for real: the loss
goes down, the held-out IoU goes up from zero, and the picture is written."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile

EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "segment_megapixel.py")
# step (5 columns) | loss (8) | held-out IoU (13) | elapsed time; loss/IoU may be blank
ROW = re.compile(r"^ *(\d+) (.{8}) (.{13}) +\d+\.\ds$")


def parse_curve(stdout: str) -> tuple[list[float], list[float]]:
    """(loss per step, held-out IoU per evaluation) from the example's table."""
    losses, ious = [], []
    for line in stdout.splitlines():
        match = ROW.match(line)
        if not match:
            continue
        step, loss, iou = (group.strip() or None for group in match.groups())
        if int(step) > 0 and loss is None:  # a training row always has a loss
            raise AssertionError(f"row without loss: {line!r}")
        if loss is not None:
            losses.append(float(loss))
        if iou is not None:
            ious.append(float(iou))
    return losses, ious


def load_example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("segment_megapixel", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_segment_example_quick_learns(tmp_path):
    """Run from an empty directory without --out: the picture goes to a new temporary
    folder (whose path is printed), and the current directory stays empty."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cmd = [sys.executable, EXAMPLE, "--quick", "--threads", "1"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, cwd=cwd)
    output = proc.stdout + proc.stderr
    picture = re.search(r"picture: (.+)$", proc.stdout, re.MULTILINE)
    folder = os.path.dirname(picture.group(1)) if picture else ""
    written = {}
    if os.path.basename(folder).startswith("fxstream-segment-") and os.path.dirname(folder) == tempfile.gettempdir():
        written = {name: os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)}
        shutil.rmtree(folder)
    assert list(cwd.iterdir()) == [], output
    assert proc.returncode == 0, output
    tiles = re.search(r"(\d+) tiles", proc.stdout)
    assert tiles and int(tiles.group(1)) >= 2, output  # really streamed, in several tiles
    losses, ious = parse_curve(proc.stdout)
    assert len(losses) == 24 and len(ious) == 5, output
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first - 0.2, output  # the loss goes down
    assert ious[0] < 0.2 and ious[-1] >= 0.35 and ious[-1] > ious[0] + 0.25, output  # the model learned the blobs
    assert picture and written, output  # printed, in a new temporary folder
    assert list(written) == [os.path.basename(picture.group(1))], output
    assert list(written)[0].startswith("segment_megapixel.") and list(written.values())[0] > 1000, output


def test_picture_path_in_the_out_folder(tmp_path):
    example = load_example()
    out = tmp_path / "results" / "run1"  # created if missing
    path = example.picture_path(example.parse_args(["--quick", "--out", str(out)]).out)
    assert path == str(out / "segment_megapixel.png") and out.is_dir()
    default = example.picture_path(example.parse_args(["--quick"]).out)  # a new temporary folder
    try:
        assert os.path.dirname(default) != os.getcwd() and os.listdir(os.path.dirname(default)) == []
    finally:
        shutil.rmtree(os.path.dirname(default))


def test_picture_without_matplotlib(tmp_path, monkeypatch):
    """Without matplotlib the picture is a binary PGM: image | true mask | predicted mask."""
    import torch

    example = load_example()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    image, mask = example.make_sample(32, torch.Generator().manual_seed(0))
    pred = 1 - mask[0]
    path = example.save_picture(image[0, 0], mask[0], pred, str(tmp_path / "pic.png"))
    assert path == str(tmp_path / "pic.pgm")
    data = open(path, "rb").read()
    header = b"P5\n96 32\n255\n"
    assert data.startswith(header) and len(data) == len(header) + 96 * 32
    pixels = torch.frombuffer(bytearray(data[len(header) :]), dtype=torch.uint8).view(32, 96)
    assert torch.equal(pixels[:, 32:64], (mask[0] * 255).to(torch.uint8))
    assert torch.equal(pixels[:, 64:], (pred * 255).to(torch.uint8))
