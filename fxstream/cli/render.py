"""Renderings of a plan report (:mod:`fxstream.cli.report`): text table, Graphviz dot, PNG.

* :func:`text` - one row per trunk node and a summary;
* :func:`dot`  - the traced graph with the trunk and the head coloured and the boundary marked;
* :func:`png`  - the tile grid over the image, one tile's block and the input it reads, a legend,
  the predicted peaks and a caption (matplotlib; :func:`figure`, :func:`highlight`).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

import torch.fx as fx

from ..memory.units import format_bytes
from ..planning.plan import Plan
from ..planning.tiling import Pair, ShapePlan


def _x(values) -> str:
    if values is None:
        return "-"
    return "x".join(str(v) for v in values)


def _pairs(pairs) -> str:
    if pairs is None:
        return "-"
    return " ".join(f"{lo},{hi}" for lo, hi in pairs)


COLUMNS = (
    ("node", 24, "name", str),
    ("op", 14, "op", str),
    ("module", 20, "module_path", str),
    ("lvl", 3, "level", str),
    ("kernel", 7, "kernel", _x),
    ("s", 5, "op_stride", _x),
    ("pad (lo,hi)", 11, "padding", _pairs),
    ("dil", 5, "dilation", _x),
    ("stride", 7, "stride", _x),
    ("rf", 9, "receptive_field", _x),
    ("halo (l,r)", 15, "halo", _pairs),
    ("region", 11, "interior_region", _x),
    ("act. bytes", 11, "activation_bytes", format_bytes),
)


def text(report: dict) -> str:
    """The per-node table and the summary."""
    header = " ".join(f"{title:<{width}}" for title, width, _, _ in COLUMNS).rstrip()
    lines = [header, "-" * len(header)]
    for node in report["nodes"]:
        cells = []
        for _, width, key, fmt in COLUMNS:
            value = node.get(key)
            cell = fmt(value) if value is not None or fmt is not str else "-"
            cells.append(f"{cell[:width] if key in ('name', 'op', 'module_path') else cell:<{width}}")
        lines.append(" ".join(cells).rstrip())
    lines.append("")
    lines.append("region: pixels an interior tile computes per axis; act. bytes: that region's output, batch included")
    lines.append("lvl: the highest level of global statistics the node depends on")
    lines.append("")
    return "\n".join(lines + summary(report) + statistics_lines(report))


def statistics_lines(report: dict) -> list[str]:
    """The statistics passes: per level its share of the work and its statistics."""
    section = report.get("statistics")
    if not section or not section["levels"]:
        return []
    levels, passes = section["levels"], section["passes"]
    lines = [
        "",
        f"statistics: {levels} level{'s' if levels > 1 else ''}, {passes} streamed passes ({passes // 2} forward, "
        f"{passes // 2} backward), predicted training step {section['predicted_step_ratio']:.2f}x a plain step "
        f"({report['schedule']})",
        "  level  pass work  statistics",
    ]
    for entry in section["per_level"]:
        named = "; ".join(
            f"{s['category']}: '{s['node']}' ({s['module_path'] or '<top>'}, {s['op']}"
            + (f", {_x(s['shape'])}" if s["shape"] else "")
            + ")"
            for s in entry["statistics"]
        )
        lines.append(f"  {entry['level']:<6} {entry['pass_work']:>8.1%}   {named}")
    lines.append(f"  max_levels={section['max_levels']} (compile(..., max_levels=...), fxstream plan --max-levels)")
    return lines


def _outputs(report: dict) -> list[tuple[str, str]]:
    """The trunk output's shape, or one row per output of a trunk with several."""
    outputs = report["trunk_outputs"]
    if len(outputs) == 1:
        return [("trunk output shape", _x(report["trunk_output_shape"]))]
    rows = [("trunk outputs", f"{len(outputs)}, each assembled whole (the tiles are blocks of the last)")]
    for out in outputs:
        rows.append(
            (f"  {out['name']}", f"{_x(out['shape'])}, stride {_x(out['stride'])} px, {format_bytes(out['bytes'])}")
        )
    return rows


def summary(report: dict) -> list[str]:
    memory = report["memory"]
    streamed, plain = memory["streamed"], memory["plain"]
    rows = [
        ("model", f"{report['model']}  input {_x(report['input_shape'])} {report['dtype']}"),
        ("boundary (trunk output)", report["boundary"]),
        *_outputs(report),
        ("tile size", f"{_x(report['tile_size'])} px (halo included)"),
        (
            "output block per tile",
            f"{_x(report['output_block'])} px of the trunk output (this input's tiles: at most "
            f"{_x(report['largest_block'])})",
        ),
        ("tile grid", f"{_x(report['grid'])} = {report['num_tiles']} tiles"),
        ("receptive field, stride", f"{_x(report['receptive_field'])} px, {_x(report['stride'])} px"),
        ("halo (left,right) per axis", _pairs(report["halo"])),
        (
            "redundant compute",
            f"{report['redundant_compute_percent']:.1f}% of one whole-image pass (FLOPs; "
            f"pixel halo overhead h = {report['halo_overhead']:.2f})",
        ),
        ("schedule", _schedule(report)),
        (
            "predicted peak, training",
            f"streamed {format_bytes(streamed['training']['bytes'])}   "
            f"plain {format_bytes(plain['training']['bytes'])}",
        ),
        *_device_and_host(report),
        (
            "predicted peak, inference",
            f"streamed {format_bytes(streamed['inference']['bytes'])}   "
            f"plain {format_bytes(plain['inference']['bytes'])}",
        ),
    ]
    parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in streamed["training"]["parts"].items())
    rows.append(("streamed training peak", f"{streamed['training']['phase']} phase: {parts}"))
    if report.get("device", "cpu") != "cpu":
        training = streamed["training"]
        for where in ("device", "host"):
            parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in training[f"{where}_parts"].items())
            rows.append((f"  {where} peak", f"{training[f'{where}_phase']} phase: {parts or 'nothing'}"))
    if memory.get("head_counted"):
        rows.append(("not counted", "allocator caching, convolution workspaces"))
    else:
        rows.append(("not counted", "the head's activations (it did not run at the probe sizes), allocator caching"))
    if memory["budget"] is not None:
        verdict = "fits" if memory["fits"] else "does NOT fit"
        where = "on the device" if report.get("device", "cpu") != "cpu" else ""
        rows.append(
            ("memory budget", f"{format_bytes(memory['budget'])}: streamed training {verdict} {where}".rstrip())
        )
    width = max(len(k) for k, _ in rows)
    return [f"{k:<{width}}  {v}" for k, v in rows]


STRIPES = {
    "device": "stripes on the device (grow with the image)",
    "host": "stripes in host memory, prefetched to the device",
    "banded": "banded: {band_rows} tile rows per band, {bands} bands, stripes rebuilt band by band",
}


def _schedule(report: dict) -> str:
    """The schedule, where its stripes live and its predicted cost."""
    kind = report["schedule"]
    where = STRIPES.get(report.get("stripes") or "", "")
    where = where.format(band_rows=report.get("band_rows"), bands=report.get("bands")) if where else ""
    store = f", stripe store {format_bytes(report['stripe_store_bytes'])}" if kind == "carry" else ""
    return (
        f"{kind}{' (' + where + ')' if where else ''}: predicted step time {report['predicted_step_ratio']:.2f}x "
        f"plain (FLOPs){store}"
    )


def _device_and_host(report: dict) -> list[tuple[str, str]]:
    """The streamed training peak on the compute device and in host memory (an accelerator)."""
    device = report.get("device", "cpu")
    if device == "cpu":
        return []
    training = report["memory"]["streamed"]["training"]
    output = report.get("output_device")
    where = f"input{', trunk output and head' if output == 'cpu' else ''} on the host"
    return [
        (
            f"  {device} device / host",
            f"{format_bytes(training['device_bytes'])} / {format_bytes(training['host_bytes'])} ({where})",
        )
    ]


# --- dot ---------------------------------------------------------------------------------


def dot(graph: fx.Graph, trunk: set, image: str, outputs: tuple[str, ...]) -> str:
    """Graphviz source: image green, trunk blue, head grey, trunk outputs red (double border)."""
    boundary = ", ".join(outputs)
    lines = [
        "digraph fxstream {",
        "  rankdir=TB;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
        f'  label="fxstream plan: trunk (blue) streamed up to {_esc(boundary)} (red), head (grey)";',
    ]
    for node in graph.nodes:
        if node.name == image:
            style = 'fillcolor="#b7e4c7"'
        elif node.name in outputs:
            style = 'fillcolor="#f4a3a3", color="#c0392b", peripheries=2, penwidth=2'
        elif node.name in trunk:
            style = 'fillcolor="#a9cce3"'
        else:
            style = 'fillcolor="#e5e5e5"'
        label = f"{node.name}\\n{_esc(_op(node))}"
        lines.append(f'  "{_esc(node.name)}" [label="{label}", {style}];')
    for node in graph.nodes:
        for inp in node.all_input_nodes:
            lines.append(f'  "{_esc(inp.name)}" -> "{_esc(node.name)}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _op(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target}"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    return node.op


def _esc(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace('"', '\\"')


# --- png ---------------------------------------------------------------------------------

PLOT_HINT = "--png needs matplotlib: pip install matplotlib (or, in a clone of fxstream, pip install -e '.[plot]')"


# Above this many tiles the grid is drawn per axis (block boundaries as lines, one tile's
# read region): a picture of 1,000,000 x 1,000,000 pixels has less than 2 pixels per tile.
MAX_DRAWN_TILES = 4096

RED = "#c0392b"


def caption(schedule) -> str:
    """The picture's caption for a :class:`~fxstream.planning.schedule.Schedule`: what the
    tile size bounds, and cells and stripes (carry) or the halo (recompute)."""
    bound = "The tile size bounds the input one tile reads, per axis (halo included)"
    if schedule.banded:
        bound += ", except in the first tile row of a band, which reads the whole halo above its block"
    if not schedule.carries:
        return (
            f"{bound}. Recompute schedule: a tile reads and computes the whole receptive field of its block "
            "(the block and its halo), overlapping its neighbours: the redundant work is the halo overhead h."
        )
    return (
        f"{bound}. Carry schedule: every node's output is cut into cells, one per tile. A tile computes its own "
        "cells once and stores their right and bottom edges (stripes) for the tiles after it, so it reads from the "
        "input only its input cell (plus the first op's halo), skewed right of and below its block by about the "
        "halo. The rest of the block's receptive field reaches it as stripes stored by earlier tiles."
    )


@dataclass(frozen=True)
class Box:
    """A rectangle of image pixels, ``[y0, y1) x [x0, x1)``."""

    y: Pair
    x: Pair

    @property
    def size(self) -> tuple[int, int]:
        return (self.y[1] - self.y[0], self.x[1] - self.x[0])

    def contains(self, other: Box) -> bool:
        return all(a[0] <= b[0] and b[1] <= a[1] for a, b in ((self.y, other.y), (self.x, other.x)))


@dataclass(frozen=True)
class Highlight:
    """What the picture draws for one tile, in image pixels.

    * ``block``: the tile's output block (primary trunk output) at image scale, ``[S*lo, S*hi)``;
    * ``region``: the image pixels the tile reads from the input. Under recompute the whole
      receptive field of its block (block and halo); under carry its input cell and the
      first op's halo into the previous cell, skewed right and down of the block (along the
      rows, a tile in the first row of a band reads the receptive field: ``band_start``);
    * ``field``: the block's receptive field, the block widened by the halo (``None`` when the
      trunk upsamples and has no single halo). Under carry the part outside ``region`` comes
      from stripes that earlier tiles stored.
    """

    index: tuple[int, int]
    block: Box
    region: Box
    field: Box | None
    band_start: bool = False


def highlight(shape: ShapePlan, plan: Plan, index: tuple[int, int] | None = None) -> Highlight:
    """The rectangles of tile ``index``. By default the middle tile (away from the border if
    there is one), under banded carry the row after it if the middle row starts a band."""
    starts = set(shape.schedule.band_starts(shape.grid[0])) - {0} if shape.schedule.carries else set()
    if index is None:
        row, col = (n // 2 for n in shape.grid)
        if row in starts and row + 1 < shape.grid[0] and row + 1 not in starts:
            row += 1
        index = (row, col)
    blocks = _footprints(shape, plan)
    block = Box(*(blocks[axis][k] for axis, k in enumerate(index)))
    region = Box(*(dict(shape.axes[axis][k].computed)[""] for axis, k in enumerate(index)))
    field = None
    if plan.exact and plan.halo is not None:
        field = Box(
            *(
                (max(lo - left, 0), min(hi + right, n))
                for (lo, hi), (left, right), n in zip((block.y, block.x), plan.halo, shape.input_size)
            )
        )
    return Highlight(tuple(index), block, region, field, index[0] in starts)


def _read_label(kind: str, tile: Highlight) -> str:
    """The legend entry of the highlighted tile's input region."""
    if kind != "carry":
        return "highlighted tile: the input it reads (its block + halo)"
    if tile.band_start:
        return "highlighted tile: the input it reads (first row of a band: block + halo along y, input cell along x)"
    return "highlighted tile: the input it reads (its input cell + the first op's halo)"


def png(shape: ShapePlan, plan: Plan, path, title: str = "", report: dict | None = None) -> None:
    """Write :func:`figure` to ``path`` (a file name or a binary file object) as a PNG."""
    fig = figure(shape, plan, title, report)
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=120)
    plt.close(fig)


INFO = 2.7  # inches below the picture: legend (top), predicted peaks, caption


def figure(shape: ShapePlan, plan: Plan, title: str = "", report: dict | None = None):
    """The tile grid over the image: every tile's block (its output pixels mapped to the image,
    outlined) and the input region it reads (shaded); one tile highlighted (:func:`highlight`)
    with its extent labelled against the tile size asked for; a legend, the predicted peaks of
    ``report`` (:func:`fxstream.cli.report.build`, the numbers the text report prints) and a
    caption on cells and stripes (carry) or halos (recompute). Two spatial dims only; beyond
    ``MAX_DRAWN_TILES`` tiles the blocks are grid lines and no region is shaded. Returns the
    matplotlib figure (open: close it)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch, Rectangle
    except ImportError as exc:
        raise ImportError(PLOT_HINT) from exc
    if len(shape.input_size) != 2:
        raise ValueError(f"--png draws 2 spatial dims, the input has {len(shape.input_size)}")
    height, width = shape.input_size
    kind = shape.schedule.kind
    fig, ax = _layout(plt, height / max(width, 1))
    ax.add_patch(Rectangle((0, 0), width, height, fill=False, edgecolor="black", linewidth=1.5))
    blocks, regions = _footprints(shape, plan), [[dict(p.computed)[""] for p in axis] for axis in shape.axes]
    many = shape.num_tiles > MAX_DRAWN_TILES
    if many:
        _grid_lines(ax, blocks, width, height)
    else:
        _tiles(ax, blocks, regions)
    handles = [
        Line2D(
            [],
            [],
            color="#1f77b4",
            linewidth=0.8,
            label="tile blocks (alternating colours): each tile's output pixels at image scale",
        )
    ]
    if not many:
        handles.append(Patch(facecolor="#1f77b4", alpha=0.15, label="input region each tile reads (shaded)"))
    handles += _draw_highlight(ax, highlight(shape, plan), kind, plan.tile_size)
    margin = 0.02 * max(height, width)
    ax.set_xlim(-margin, width + margin)
    ax.set_ylim(height + margin, -margin)
    ax.set_aspect("equal")
    ax.set_xlabel("x (pixels)")
    ax.set_ylabel("y (pixels)")
    ax.set_title(
        (title + "\n" if title else "")
        + f"{height}x{width} image, tile size {_x(plan.tile_size)}: {_x(shape.grid)} = {shape.num_tiles} tiles, "
        f"{kind} schedule",
        fontsize=9,
    )
    inch = 1 / fig.get_figheight()  # the band below the axes, from the top down, in figure fractions
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.04, INFO * inch), fontsize=8, frameon=False)
    lines = peak_lines(report) if report else []
    fig.text(0.05, (INFO - 1.15) * inch, "\n".join(lines), fontsize=8, va="top", family="monospace")
    fig.text(0.05, (INFO - 1.55) * inch, textwrap.fill(caption(shape.schedule), 125), fontsize=7.5, va="top")
    return fig


def _layout(plt, aspect: float):
    """A figure 8 inches wide with the image axes above a band of ``INFO`` inches (no
    tight_layout: the same picture size for every run of the same command)."""
    axes_w = 6.2
    axes_h = min(max(axes_w * aspect, 1.5), 10.0)
    top, below = 0.6, 0.55  # the title; the x axis label
    height = top + axes_h + below + INFO
    fig = plt.figure(figsize=(8, height))
    ax = fig.add_axes([1.1 / 8, (INFO + below) / height, axes_w / 8, axes_h / height])
    return fig, ax


def _draw_highlight(ax, tile: Highlight, kind: str, tile_size: tuple[int, ...]) -> list:
    """The highlighted tile's rectangles and extent label; returns the legend handles."""
    handles = [
        _box(ax, tile.block, facecolor=RED, alpha=0.35, edgecolor=RED, label="highlighted tile: its block"),
        _box(ax, tile.region, fill=False, edgecolor=RED, linewidth=2, linestyle="--", label=_read_label(kind, tile)),
    ]
    if kind == "carry" and tile.field is not None:
        label = "its block's receptive field (block + halo): the rest arrives as stripes"
        handles.append(_box(ax, tile.field, fill=False, edgecolor="black", linewidth=1.2, linestyle=":", label=label))
    _extent(ax, tile.region, tile_size)
    return handles


def peak_lines(report: dict) -> list[str]:
    """The predicted peaks of the report, as the text report prints them."""
    memory, device = report["memory"], report.get("device", "cpu")
    streamed, plain = memory["streamed"], memory["plain"]
    lines = []
    for step in ("training", "inference"):
        line = (
            f"predicted peak, {step + ':':<10} streamed {format_bytes(streamed[step]['bytes'])}, "
            f"plain {format_bytes(plain[step]['bytes'])}"
        )
        if step == "training" and device != "cpu":
            line += (
                f" ({device} device {format_bytes(streamed[step]['device_bytes'])}, "
                f"host {format_bytes(streamed[step]['host_bytes'])})"
            )
        lines.append(line)
    return lines


def _box(ax, box: Box, **style):
    """Add ``box`` to ``ax`` as a rectangle; returns the patch (a legend handle)."""
    from matplotlib.patches import Rectangle

    (y0, y1), (x0, x1) = box.y, box.x
    return ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, **style))


def _extent(ax, region: Box, tile_size: tuple[int, ...]) -> None:
    """A dimension line across the top of the highlighted tile's region, labelled with its
    extent (height x width, as ``--tile-size``) and the tile size asked for (:func:`caption`)."""
    (y0, _), (x0, x1) = region.y, region.x
    ax.annotate("", xy=(x0, y0), xytext=(x1, y0), arrowprops={"arrowstyle": "<->", "color": RED, "linewidth": 1.2})
    ax.annotate(
        f"reads {_x(region.size)} px (tile size {_x(tile_size)})",
        xy=((x0 + x1) / 2, y0),
        xytext=(0, 4),
        textcoords="offset points",
        ha="center",
        va="bottom",
        fontsize=8,
        color=RED,
        bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.8, "edgecolor": "none"},
    )


def _tiles(ax, blocks: list, regions: list) -> None:
    """Every tile's read region (shaded) and block (outlined), in alternating colours."""
    from matplotlib.patches import Rectangle

    colors = ("#1f77b4", "#ff7f0e")
    for i, ((by0, by1), (y0, y1)) in enumerate(zip(blocks[0], regions[0])):
        for j, ((bx0, bx1), (x0, x1)) in enumerate(zip(blocks[1], regions[1])):
            color = colors[(i + j) % 2]
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, facecolor=color, alpha=0.06, edgecolor="none"))
            ax.add_patch(Rectangle((bx0, by0), bx1 - bx0, by1 - by0, fill=False, edgecolor=color, linewidth=0.8))


def _grid_lines(ax, blocks: list, width: int, height: int) -> None:
    """The block boundaries along each axis, as lines across the image."""
    ax.hlines(sorted({b for block in blocks[0] for b in block}), 0, width, colors="#1f77b4", linewidth=0.3)
    ax.vlines(sorted({b for block in blocks[1] for b in block}), 0, height, colors="#1f77b4", linewidth=0.3)


def _footprints(shape: ShapePlan, plan: Plan) -> list[list[tuple[int, int]]]:
    """Per axis, the image pixels each block stands for: ``[S*lo, S*hi)``, clipped."""
    return [
        [(min(int(s * lo), n), min(int(s * hi), n)) for lo, hi in (part.block for part in axis)]
        for axis, s, n in zip(shape.axes, plan.stride, shape.input_size)
    ]
