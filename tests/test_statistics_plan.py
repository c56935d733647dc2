"""Cost and plan of global statistics (issue 20, step 6): the passes each node runs in, the
predicted step ratio, and what ``fxstream plan`` shows (text and JSON)."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxstream
from fxstream.cli import main
from fxstream.cli.report import build
from fxstream.memory.auto import pass_uses

MODEL = textwrap.dedent(
    """
    import torch.nn as nn
    import torch.nn.functional as F


    class Chain(nn.Module):
        '''conv -> GroupNorm -> conv -> GroupNorm -> conv: two levels.'''

        def __init__(self):
            super().__init__()
            self.c1, self.n1 = nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4)
            self.c2, self.n2 = nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4)
            self.c3 = nn.Conv2d(4, 2, 3, padding=1)

        def forward(self, x):
            return self.c3(F.relu(self.n2(self.c2(F.relu(self.n1(self.c1(x)))))))
    """
)


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 4, 3, padding=1), nn.GroupNorm(2, 4)
        self.c2, self.n2 = nn.Conv2d(4, 4, 3, padding=1), nn.GroupNorm(2, 4)
        self.c3 = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        return self.c3(F.relu(self.n2(self.c2(F.relu(self.n1(self.c1(x)))))))


def test_passes_per_node_and_ratio_by_hand():
    """Pass 1 computes c1, pass 2 c1 to c2; the output pass all. Counting only the
    convolutions (3x3, 3->4, 4->4, 4->2: 108, 144 and 72 MACs per pixel), u is 2, 1 and 0, and
    under carry a statistics pass costs 5/4 of the output pass (it rebuilds its stripes): the
    ratio is 4/3 (1 + 5/4 (108 * 2 + 144) / (108 + 144 + 72)) = 3.185; pointwise ops move it ~1%."""
    smodel = fxstream.compile(Chain(), tile_size=32)
    geo = smodel.program().geometry
    assert pass_uses(geo) == {"c1": 2, "normalize": 1, "relu": 1, "c2": 1}
    report = build(smodel, (1, 3, 96, 96))
    section = report["statistics"]
    assert section["levels"] == 2 and section["passes"] == 6 and section["max_levels"] == 4
    assert report["predicted_step_ratio"] == section["predicted_step_ratio"]
    assert section["predicted_step_ratio"] == pytest.approx(4 / 3 * (1 + 1.25 * 360 / 324), rel=0.03)
    work = [level["pass_work"] for level in section["per_level"]]
    assert work[0] == pytest.approx(108 / 324, rel=0.05) and work[1] == pytest.approx(252 / 324, rel=0.05)
    assert [n["level"] for n in report["nodes"]] == [0, 1, 1, 1, 2, 2, 2]


def test_plan_without_statistics_is_unchanged():
    smodel = fxstream.compile(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), tile_size=32)
    report = build(smodel, (1, 3, 64, 64))
    assert report["statistics"]["levels"] == 0 and report["statistics"]["per_level"] == []
    assert report["predicted_step_ratio"] == pytest.approx(4 / 3)
    assert all(n["level"] == 0 for n in report["nodes"])


def test_fxstream_plan_text_and_json(tmp_path, capsys):
    path = tmp_path / "chain.py"
    path.write_text(MODEL)
    args = ["plan", f"{path}:Chain", "--input-shape", "1,3,96,96", "--tile-size", "32"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "lvl" in text.splitlines()[0]
    assert "statistics: 2 levels, 6 streamed passes (3 forward, 3 backward), predicted training step" in text
    assert "global norm: 'moments' (n1, GroupNorm, 1x2)" in text and "max_levels=4" in text
    assert main(args + ["--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    section = data["statistics"]
    assert set(section) == {"levels", "passes", "predicted_step_ratio", "max_levels", "per_level"}
    (first, second) = section["per_level"]
    assert set(first) == {"level", "pass_work", "statistics"}
    assert first["statistics"] == [
        {"node": "moments", "op": "GroupNorm", "module_path": "n1", "category": "global norm", "shape": [1, 2]}
    ]
    assert second["statistics"][0]["module_path"] == "n2"
    assert all("level" in node for node in data["nodes"])
    assert main(args + ["--max-levels", "1"]) == 2
    assert "with max_levels=1: its trunk holds 2 dependent levels" in capsys.readouterr().err


class _SEThenUpsample(nn.Module):
    """A stride-4 encoder with six SE blocks (six levels), upsampled back to the input size,
    then a full-resolution decoder: most of the work is after the upsampling."""

    def __init__(self, by_size: bool):
        super().__init__()
        self.by_size = by_size
        self.down = nn.Conv2d(3, 16, 3, stride=4, padding=1)
        self.enc = nn.ModuleList(nn.Conv2d(16, 16, 3, padding=1) for _ in range(6))
        self.gates = nn.ModuleList(nn.Conv2d(16, 16, 1) for _ in range(6))
        self.dec = nn.Sequential(*[nn.Conv2d(16, 16, 3, padding=1) for _ in range(4)])

    def forward(self, x):
        y = self.down(x)
        for conv, gate in zip(self.enc, self.gates):
            y = conv(y)
            y = y * torch.sigmoid(gate(y.mean((2, 3), keepdim=True)))
        y = F.interpolate(y, size=x.shape[2:]) if self.by_size else F.interpolate(y, scale_factor=4.0)
        return self.dec(y)


def test_refusal_cost_counts_an_upsampling_to_a_size_like_a_scale_factor():
    """The StatisticsError's predicted ratio (from static weights, before planning) gives the
    nodes after interpolate(size=x.shape[2:]) the stride of x, as after scale_factor=4: it
    counted the decoder at the encoder's stride (4.23x against 1.75x, smp's Unet decoders)."""
    ratios = []
    for by_size in (False, True):
        with pytest.raises(fxstream.StatisticsError) as info:
            fxstream.compile(_SEThenUpsample(by_size).eval(), tile_size=256)
        ratios.append(info.value.predicted_step_ratio)
    assert ratios[0] == pytest.approx(ratios[1], rel=1e-9)
    assert ratios[0] < 2.5
