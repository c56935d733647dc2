"""Renderings of a plan report (:mod:`fxstream.cli.report`): text table, Graphviz dot, PNG.

* :func:`text` - one row per trunk node and a summary;
* :func:`dot`  - the traced graph with the trunk and the head coloured and the boundary marked;
* :func:`png`  - the tile grid over the image extent, each tile's block and halo (matplotlib).
"""

from __future__ import annotations

import torch.fx as fx

from ..memory.units import format_bytes
from ..planning.plan import Plan
from ..planning.tiling import ShapePlan


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
            cell = fmt(node[key]) if node[key] is not None or fmt is not str else "-"
            cells.append(f"{cell[:width] if key in ('name', 'op', 'module_path') else cell:<{width}}")
        lines.append(" ".join(cells).rstrip())
    lines.append("")
    lines.append("region: pixels an interior tile computes per axis; act. bytes: that region's output, batch included")
    lines.append("")
    return "\n".join(lines + summary(report))


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

PLOT_HINT = "--png needs matplotlib: pip install 'fxstream[plot]' (or pip install matplotlib)"


# Above this many tiles the grid is drawn per axis (block boundaries as lines, one tile's
# read region): a picture of 1,000,000 x 1,000,000 pixels has less than 2 pixels per tile.
MAX_DRAWN_TILES = 4096


def png(shape: ShapePlan, plan: Plan, path: str, title: str = "") -> None:
    """Draw the tile grid over the image: every tile's block (its output pixels mapped to
    the image, solid) and the region it reads (halo included, shaded); one interior
    tile is highlighted. Two spatial dims only. Built from the per-axis blocks and
    regions (``shape.axes``); beyond ``MAX_DRAWN_TILES`` tiles the blocks are grid lines
    and no region is shaded but the highlighted tile's."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ImportError as exc:
        raise ImportError(PLOT_HINT) from exc
    if len(shape.input_size) != 2:
        raise ValueError(f"--png draws 2 spatial dims, the input has {len(shape.input_size)}")
    height, width = shape.input_size
    fig, ax = plt.subplots(figsize=(8, 8 * height / max(width, 1) + 0.6))
    ax.add_patch(Rectangle((0, 0), width, height, fill=False, edgecolor="black", linewidth=1.5))
    blocks, regions = _footprints(shape, plan), [[dict(p.computed)[""] for p in axis] for axis in shape.axes]
    many = shape.num_tiles > MAX_DRAWN_TILES
    if many:
        _grid_lines(ax, blocks, width, height)
    else:
        _tiles(ax, blocks, regions)
    (i, j) = (n // 2 for n in shape.grid)  # a tile away from the border if there is one
    (y0, y1), (x0, x1) = regions[0][i], regions[1][j]
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="#c0392b", linewidth=2, linestyle="--"))
    (by0, by1), (bx0, bx1) = blocks[0][i], blocks[1][j]
    ax.add_patch(Rectangle((bx0, by0), bx1 - bx0, by1 - by0, facecolor="#c0392b", alpha=0.35, edgecolor="#c0392b"))
    margin = 0.02 * max(height, width)
    ax.set_xlim(-margin, width + margin)
    ax.set_ylim(height + margin, -margin)
    ax.set_aspect("equal")
    ax.set_xlabel("x (pixels)")
    ax.set_ylabel("y (pixels)")
    drawn = "block boundaries (lines)" if many else "blocks (solid), read regions (shaded)"
    ax.set_title(
        (title + "\n" if title else "") + f"{width}x{height} image, tile {_x(plan.tile_size)}: {_x(shape.grid)} tiles; "
        f"{drawn},\none tile's block (red) and its region with halo (dashed red)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
