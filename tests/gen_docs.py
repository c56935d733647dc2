"""Regenerate the ``fxstream plan`` examples of docs/planning.md, and docs/plan-resnet34.png.

    python tests/gen_docs.py            # rewrite the outputs in place (about 30 s on one core)

Each example in the doc is a ``<!-- plan-example: NAME -->`` line followed by a code block
whose first line is the command (``$ fxstream plan ...``) and the rest its output, abridged
by ``KEEP[NAME]``: the lines that match one of ``lines``, or lie from the first line that
matches ``start`` up to the next that matches ``stop``; each run of dropped lines is one
``...`` line. The command is the doc's: edit it there and rerun this script. A ``--png FILE``
in a command writes FILE next to the doc. tests/test_docs_planning.py reruns every command
and compares.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(ROOT, "docs", "planning.md")
EXAMPLE = re.compile(r"<!-- plan-example: (\w+) -->\n```\n\$ (fxstream plan .*?)\n(.*?)```", re.S)


@dataclass(frozen=True)
class Keep:
    lines: tuple[str, ...] = ()  # regexes (re.match): single lines to keep
    start: str | None = None  # keep from the first line matching this ...
    stop: str | None = None  # ... up to (not including) the next line matching this


SUMMARY_PEAKS = (r"tile grid ", r"schedule ", r"predicted peak, training ", r"  cuda device / host ")
KEEP = {
    "resnet34": Keep(
        lines=(r"node ", r"-{20}", r"conv1 ", r"bn1 ", r"relu ", r"maxpool ", r"layer4_2_relu_1 ", r"$"),
        start=r"region: ",
    ),
    "host": Keep(lines=(*SUMMARY_PEAKS, r"  device peak ", r"  host peak ")),
    "banded": Keep(lines=SUMMARY_PEAKS[1:]),
    "statistics": Keep(
        lines=(r"boundary ", r"trunk outputs ", r"  layer1_", *SUMMARY_PEAKS[1:]),
        start=r"statistics: ",
    ),
    "auto": Keep(start=r"fxstream: chose", stop=r"$"),
    "auto_banded": Keep(start=r"fxstream: chose", stop=r"$"),
}


def examples(text: str) -> list[tuple[str, str, str]]:
    """(name, command, shown output) of every marked example of the doc's text."""
    return EXAMPLE.findall(text)


def argv(command: str, folder: str) -> list[str]:
    """The arguments after ``fxstream``, with a ``--png`` file put into ``folder``."""
    args = shlex.split(command)[1:]
    for i, arg in enumerate(args[:-1]):
        if arg == "--png":
            args[i + 1] = os.path.join(folder, args[i + 1])
    return args


def run(command: str, folder: str) -> str:
    """The stdout of ``command`` (in this process: the same as the console script's)."""
    from fxstream.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv(command, folder))
    if code != 0:
        raise RuntimeError(f"{command!r} exited with status {code}")
    return out.getvalue()


def abridge(output: str, keep: Keep) -> str:
    """The lines of ``output`` that ``keep`` selects, each run of dropped lines as ``...``."""
    lines = [line.rstrip() for line in output.rstrip("\n").split("\n")]
    selected = [any(re.match(p, line) for p in keep.lines) for line in lines]
    if keep.start is not None:
        first = next((i for i, line in enumerate(lines) if re.match(keep.start, line)), None)
        if first is None:
            raise ValueError(f"no line of the output matches {keep.start!r}")
        stops = (i for i in range(first + 1, len(lines)) if keep.stop is not None and re.match(keep.stop, lines[i]))
        for i in range(first, next(stops, len(lines))):
            selected[i] = True
    shown = []
    for i, line in enumerate(lines):
        if selected[i]:
            shown.append(line)
        elif i == 0 or selected[i - 1]:
            shown.append("...")
    return "\n".join(shown) + "\n"


def shown(name: str, command: str, folder: str) -> str:
    """What the doc shows under the command of example ``name``."""
    return abridge(run(command, folder), KEEP[name])


def main() -> None:
    import torch

    torch.set_num_threads(1)
    with open(DOC) as f:
        text = f.read()
    found = examples(text)
    if sorted(name for name, _, _ in found) != sorted(KEEP):
        raise SystemExit(f"{DOC}: examples {sorted(n for n, _, _ in found)} != KEEP {sorted(KEEP)}")
    for name, command, _ in found:
        output = shown(name, command, os.path.dirname(DOC))
        text = re.sub(
            rf"(<!-- plan-example: {name} -->\n```\n\$ .*?\n).*?```",
            lambda m, output=output: m.group(1) + output + "```",
            text,
            count=1,
            flags=re.S,
        )
        print(f"{name}: {command}", file=sys.stderr)
    with open(DOC, "w") as f:
        f.write(text)


if __name__ == "__main__":
    sys.path.insert(0, ROOT)  # this checkout's fxstream
    main()
