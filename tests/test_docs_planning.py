"""Every ``fxstream plan`` output shown in docs/planning.md is what the command prints now,
and docs/plan-resnet34.png is drawn by a command the doc shows.

The examples are the doc's ``<!-- plan-example: NAME -->`` blocks; tests/gen_docs.py
rewrites them (``python tests/gen_docs.py``), and this test reruns each command (in this
process, like the generator) and compares its abridged output with the block, line by line.
Nothing is normalised but trailing whitespace: the plan's output holds no timings, only
sizes and predictions from shapes, which are deterministic for a given torch and
torchvision. A failure here means the doc drifted from the CLI: rerun the generator and
read the diff. The picture is compared by its pixel size only (not pixel-exact): it must be
a PNG that the doc's command writes, of the size that command writes.
"""

from __future__ import annotations

import os
import re
import struct

import gen_docs
import pytest

with open(gen_docs.DOC) as _f:
    TEXT = _f.read()
EXAMPLES = {name: (command, shown) for name, command, shown in gen_docs.examples(TEXT)}
PICTURE = "plan-resnet34.png"
ROOT = gen_docs.ROOT


def test_every_example_is_marked_and_has_its_rule():
    assert sorted(EXAMPLES) == sorted(gen_docs.KEEP)
    # every command line shown in the doc is a marked example's
    shown = re.findall(r"^\$ ((?:python -m )?fxstream .*)$", TEXT, re.M)
    assert shown == [command for command, _ in EXAMPLES.values()]


@pytest.mark.parametrize("name", sorted(gen_docs.KEEP))
def test_example_output_is_current(name, tmp_path):
    command, shown = EXAMPLES[name]
    assert "--png" not in command or PICTURE in command
    output = gen_docs.shown(name, command, str(tmp_path))
    assert [line.rstrip() for line in shown.splitlines()] == output.splitlines(), (
        f"docs/planning.md example {name!r} is stale: run `python tests/gen_docs.py`"
    )
    if "--png" in command:
        written = tmp_path / PICTURE
        assert png_size(written.read_bytes()) == png_size(open(os.path.join(ROOT, "docs", PICTURE), "rb").read())


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG, from its IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_the_picture_is_the_commands():
    """The doc shows the picture, and exactly one example's command draws it."""
    assert f"]({PICTURE})" in TEXT
    drawing = [name for name, (command, _) in EXAMPLES.items() if f"--png {PICTURE}" in command]
    assert drawing == ["resnet34"]


def test_abridge_marks_every_dropped_run():
    keep = gen_docs.Keep(lines=(r"a",), start=r"s", stop=r"$")
    text = "x\na1\ny\nz\na2\ns1\ns2\n\nw\n"
    assert gen_docs.abridge(text, keep) == "...\na1\n...\na2\ns1\ns2\n...\n"
    with pytest.raises(ValueError, match="no line"):
        gen_docs.abridge("x\n", gen_docs.Keep(start="q"))
