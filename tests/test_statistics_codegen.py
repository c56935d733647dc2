"""Code generation of global statistics (issue 20, step 4): one tile graph per statistics
pass holding only the nodes of its pass, a driver graph with the passes and the statistic
heads, the outer graph unchanged; hooks on a decomposed norm are refused."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn as nn
from test_levels import PSP, SE, GNChain, Siblings, UNetSkip

import fxstream
from fxstream.module import build_program
from fxstream.ops import statistics
from fxstream.runtime import passes


class Toy(nn.Module):
    """Two GroupNorm levels, an SE block and a pooling branch: four levels."""

    def __init__(self):
        super().__init__()
        self.body = GNChain()
        self.body.c3 = nn.Conv2d(4, 4, 3, padding=1)
        self.se = SE(4)
        self.pool = nn.Conv2d(4, 4, 1)
        self.out = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        y = self.se(self.body(x))
        p = torch.nn.functional.adaptive_avg_pool2d(y, 2)
        return self.out(y + torch.nn.functional.interpolate(self.pool(p), size=y.shape[2:], mode="bilinear"))


MODELS = {
    "toy": Toy,
    "gn chain": GNChain,
    "psp": lambda: PSP().eval(),
    "unet skip": UNetSkip,
    "siblings": Siblings,
}


@pytest.fixture
def statistics_on(monkeypatch):
    monkeypatch.setattr(fxstream.planning.lower, "STATISTICS", True)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_generated_graphs(name, statistics_on):
    torch.manual_seed(0)
    program = build_program(MODELS[name](), 16, None)
    analysis, geo = program.analysis, program.geometry
    assert len(program.pass_graphs) == geo.levels >= 1
    depth = {n.name: d for n, d in analysis.depth.items()}
    steps = {s.name for s in geo.steps}
    for level, graph in enumerate(program.pass_graphs, 1):
        graph.lint()
        placeholders = [n.name for n in graph.nodes if n.op == "placeholder"]
        assert placeholders == ["x", "geometry", "carry", "values"]
        computed = {n.name for n in graph.nodes if n.name in steps}
        assert computed == set(geo.passes[level - 1]), level
        assert all(depth[n] < level for n in computed), {n: depth[n] for n in computed}
        partials = [n for n in graph.nodes if n.op == "call_function" and n.target is statistics.partial]
        assert sorted(n.name for n in partials) == sorted(s.name for s in geo.statistics if s.level == level)
        (out,) = [n for n in graph.nodes if n.op == "output"]
        assert list(out.args[0]) == partials
    program.tile_graph.lint()
    assert {n.name for n in program.tile_graph.nodes} >= steps
    driver = program.driver_graph
    driver.lint()
    calls = [n for n in driver.nodes if n.op == "call_function" and n.target in (passes.statistics, passes.stream)]
    assert [n.args[1] for n in calls[:-1]] == list(range(1, geo.levels + 1)) and calls[-1].target is passes.stream
    names = {n.name for n in driver.nodes}
    assert {h.name for h in analysis.heads} <= names
    assert not names & steps, "the driver computes no trunk node"
    outer = program.outer_graph
    trunks = [n for n in outer.nodes if n.op == "call_module" and n.target == "fxstream_trunk"]
    assert len(trunks) == 1
    assert not {n.name for n in outer.nodes} & ({h.name for h in analysis.heads} | {s.name for s in geo.statistics})


def test_values_feed_each_pass_in_order(statistics_on):
    """Pass j reads the values of levels below j only; the output pass reads all it needs."""
    program = build_program(Toy(), 16, None)
    driver = program.driver_graph
    calls = [n for n in driver.nodes if n.op == "call_function" and n.target in (passes.statistics, passes.stream)]
    levels = {v: lvl for v, lvl in program.geometry.values}
    for call in calls[:-1]:
        level = call.args[1]
        read = [a.name for a in call.args[2:]]
        assert all(levels[v] < level for v in read), (level, read)
    assert len(calls[-1].args) - 1 == len(program.geometry.values)
    getitems = [n for n in driver.nodes if n.op == "call_function" and n.target is operator.getitem]
    assert {s.name for s in program.geometry.statistics} <= {n.name for n in getitems}


def test_hooks_on_a_decomposed_norm_are_refused(statistics_on):
    model = GNChain()
    model.n2.register_forward_hook(lambda m, i, o: None)
    with pytest.raises(fxstream.UnsupportedOpError, match="never called") as info:
        fxstream.compile(model, tile_size=16)
    assert "'n2'" in str(info.value) and "fix:" in str(info.value) and info.value.module_path == "n2"


def test_hooks_on_a_statistic_head_module_are_allowed(statistics_on):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), SE(4), nn.Conv2d(4, 2, 1))
    model[1].fc1.register_forward_hook(lambda m, i, o: None)
    smodel = fxstream.compile(model, tile_size=16)
    driver = smodel.streamed_trunk.driver
    assert [n.target for n in driver.graph.nodes if n.op == "call_module"] == ["1.fc1", "1.fc2"]
    assert driver.get_submodule("1.fc1") is model[1].fc1  # called for real: its hooks fire
