"""Every Python snippet of README.md runs, on small inputs.

Each ```python block in the README is preceded by ``<!-- readme-test: NAME -->``. The test
runs block NAME in a fresh namespace after the textual substitutions in ``SMALL[NAME]``
(smaller images and tiles; each must match the block, so a README edit that drops one fails
here), then the checks in ``CHECKS[NAME]`` on the names the block defined. The README's
``fxstream plan`` command line runs too (it allocates nothing full-size).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch

import fxstream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
BLOCK = re.compile(r"<!-- readme-test: (\w+) -->\n```python\n(.*?)```", re.S)

# name -> [(text in the README, replacement)]: the same code on a small image.
SMALL = {
    "quickstart": [("tile_size=1024", "tile_size=256"), ("3000, 2001", "300, 233")],
    "train": [("tile_size=1024", "tile_size=256"), ("(4, 3, 2048, 1536)", "(4, 3, 260, 197)")],
    "slides": [("tile_size=2048", "tile_size=256")],
    # shape-only (the image is never allocated), but the search takes ~40 s at this size
    "auto": [("resnet34", "resnet18"), ("8GiB", "1GiB"), ("(1, 3, 8192, 8192)", "(1, 3, 2048, 2048)")],
    "contract": [("tile_size=512", "tile_size=256"), ("1000, 700", "300, 233")],
    "errors": [],
    "statistics": [],
    "pyramid": [("tile_size=512", "tile_size=256"), ("900, 700", "400, 333")],
}


def check_quickstart(ns: dict) -> None:
    """The streamed gradients are the plain model's (float32 rounding)."""
    model, x = ns["model"], ns["x"]
    streamed = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), torch.tensor([3])).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(streamed[name], p.grad, rtol=1e-4, atol=1e-4 * p.grad.abs().max().item()), name
    assert ns["smodel"].shape_plan(*x.shape[2:]).num_tiles >= 2


def check_train(ns: dict) -> None:
    assert torch.isfinite(ns["loss"])
    assert all(p.grad is not None for p in ns["model"].parameters())


def check_slides(ns: dict) -> None:
    assert isinstance(ns["slide"], fxstream.SlideArray)
    assert ns["logits"].shape == (1, 2)
    assert torch.isfinite(ns["loss"])
    assert ns["smodel"].shape_plan(*ns["slide"].shape[2:]).num_tiles >= 2


def check_auto(ns: dict) -> None:
    tile = ns["smodel"]._config[0]  # the chosen tile size
    assert isinstance(tile, (int, tuple)) and tile != "auto"


def check_contract(ns: dict) -> None:
    assert ns["features"]["layer4"].shape[:2] == (1, 512)


def check_statistics(ns: dict) -> None:
    """Two levels of statistics, three streamed passes, and the plain model's gradients."""
    smodel, model, x = ns["smodel"], ns["model"], ns["x"]
    assert smodel.plan.levels == 2
    assert smodel.last_stats.passes == 3
    assert smodel.shape_plan(*x.shape[2:]).num_tiles >= 2
    streamed = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model(x).sum().backward()
    # A conv bias before InstanceNorm has a zero gradient (the norm removes it), float32
    # rounding noise on both sides, and the sum over 60,000 outputs cancels: the tolerance is
    # scaled by the largest gradient overall (float64 exactness: tests/test_statistics.py).
    scale = max(p.grad.abs().max().item() for p in model.parameters())
    for name, p in model.named_parameters():
        assert torch.allclose(streamed[name], p.grad, rtol=1e-3, atol=1e-3 * scale), name


def check_pyramid(ns: dict) -> None:
    """Each map is the plain backbone's, from a streamed call over several tiles."""
    x = torch.randn(1, 3, 400, 333)
    plain = ns["backbone"](x)
    streamed = ns["streamed"](x)
    assert len(streamed) == len(plain) == 3
    assert all(torch.allclose(s, p, rtol=1e-4, atol=1e-4) for s, p in zip(streamed, plain))
    assert ns["streamed"].shape_plan(400, 333).num_tiles >= 2


CHECKS = {
    "quickstart": check_quickstart,
    "train": check_train,
    "slides": check_slides,
    "auto": check_auto,
    "contract": check_contract,
    "errors": lambda ns: None,
    "statistics": check_statistics,
    "pyramid": check_pyramid,
}


def readme_blocks() -> dict[str, str]:
    with open(README) as f:
        return dict(BLOCK.findall(f.read()))


def test_every_python_block_is_tested():
    with open(README) as f:
        text = f.read()
    assert text.count("```python") == len(BLOCK.findall(text)), "a ```python block without <!-- readme-test: NAME -->"
    assert sorted(readme_blocks()) == sorted(SMALL)


def write_slide(path: str, size: tuple[int, int] = (300, 233)) -> None:
    """A small tiled RGB TIFF with one pyramid level below it."""
    tifffile = pytest.importorskip("tifffile")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, tile=(64, 64), photometric="rgb", subifds=1)
        tif.write(image[::2, ::2].copy(), tile=(64, 64), photometric="rgb", subfiletype=1)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_readme_block_runs(name, tmp_path, monkeypatch, capsys):
    code = readme_blocks()[name]
    for old, new in SMALL[name]:
        assert old in code, f"README block {name!r} no longer contains {old!r}: update SMALL"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    if name == "slides":
        for path, size in (("slide.tif", (300, 233)), ("a.tif", (300, 233)), ("b.tif", (280, 251))):
            write_slide(path, size)
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"readme_{name}"}
    exec(compile(code, f"README.md:{name}", "exec"), namespace)
    CHECKS[name](namespace)
    if name == "errors":
        message = capsys.readouterr().out
        assert "circular" in message and "fix:" in message, message


def test_readme_error_output_is_current(capsys):
    """The message shown under the errors block is what the block prints."""
    code = readme_blocks()["errors"]
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(code, "README.md:errors", "exec"), {"__name__": "readme_errors"})
    with open(README) as f:
        text = f.read()
    shown = re.search(r"<!-- readme-test: errors -->\n```python\n.*?```\n\n```\n(.*?)```", text, re.S)
    assert shown is not None, "the errors block's output is not shown below it"
    assert shown.group(1).strip() == out.getvalue().strip()


def test_readme_plan_command_runs():
    with open(README) as f:
        line = re.search(r"^\$ (fxstream plan .*)$", f.read(), re.M).group(1)
    args = shlex.split(line.replace("8192,8192", "2048,2048"))[2:]  # the same command, faster (~20 s -> ~5 s)
    assert args != shlex.split(line)[2:], "update the input shape substituted here"
    proc = subprocess.run(
        [sys.executable, "-m", "fxstream", "plan", *args], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "predicted peak, training" in proc.stdout, proc.stdout


def anchors(path: str) -> set[str]:
    """GitHub's anchors of the headings of a Markdown file."""
    with open(path) as f:
        headings = re.findall(r"^#+ (.*)$", f.read(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


DOCS = [
    "README.md",
    "BENCHMARKS.md",
    *sorted(f"docs/{n}" for n in os.listdir(os.path.join(ROOT, "docs")) if n.endswith(".md")),
]


@pytest.mark.parametrize("doc", DOCS)
def test_relative_links_resolve(doc):
    path = os.path.join(ROOT, doc)
    with open(path) as f:
        links = re.findall(r"\]\(([^)\s]+)\)", f.read())
    for link in links:
        if link.startswith(("http://", "https://")):
            continue
        target, _, anchor = link.partition("#")
        target_path = os.path.normpath(os.path.join(os.path.dirname(path), target)) if target else path
        assert os.path.exists(target_path), f"{doc}: broken link {link}"
        if anchor:
            assert anchor in anchors(target_path), f"{doc}: no heading for #{anchor} in {target or doc}"
