"""Log-log plot of a sweep: time per step and peak memory against image size, one line per
method, one row of two panels per configuration (model, streamed part, precision).

    python benchmarks/plot.py benchmarks/results/<run>.json [out.png]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STYLE = {"plain": "o-", "checkpoint": "s-", "lightstream": "^-", "fxstream": "D-", "fxstream-host": "D--"}


def plot(result: dict, path: Path) -> bool:
    """Write the PNG; False (with a message) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')")
        return False
    rows = [r for r in result["rows"] if r["status"] == "ok"]
    configs = list(dict.fromkeys((r["arch"], r["upto"], r["precision"]) for r in result["rows"]))
    memory_label = "peak GPU memory (GiB)" if result["meta"]["device"] == "cuda" else "peak RSS increase (GiB)"
    fig, axes = plt.subplots(len(configs), 2, figsize=(11, 3.6 * len(configs)), squeeze=False)
    for (arch, upto, precision), (ax_t, ax_m) in zip(configs, axes):
        title = f"{arch}, {'full trunk' if upto == 'layer4' else 'prefix to ' + upto}, {precision}"
        for method, style in STYLE.items():
            pts = sorted(
                (r["size"], r["time_s"], r.get("peak_bytes"))
                for r in rows
                if (r["method"], r["arch"], r["upto"], r["precision"]) == (method, arch, upto, precision)
            )
            if not pts:
                continue
            sizes = [p[0] for p in pts]
            ax_t.plot(sizes, [p[1] for p in pts], style, label=method)
            mem = [(s, p[2] / 2**30) for s, p in zip(sizes, pts) if p[2]]
            if mem:
                ax_m.plot([m[0] for m in mem], [m[1] for m in mem], style, label=method)
        for ax, label in ((ax_t, "time per step (s)"), (ax_m, memory_label)):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("image edge (px)")
            ax.set_ylabel(label)
            ax.set_title(title, fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    meta = result["meta"]
    fig.suptitle(f"{meta['device_name']}, torch {meta['torch']}, tile {meta['tile']} ({meta['date']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


if __name__ == "__main__":
    src = Path(sys.argv[1])
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else src.with_suffix(".png")
    if plot(json.loads(src.read_text()), dst):
        print(f"wrote {dst}")
