"""Trunks with several outputs: feature pyramids, encoders whose decoder reads several
strides, and heads that read more than one trunk tensor.

Every trunk tensor the rest of the model reads is a trunk output. Each tile computes its
block of every output (the tiles are blocks of the last output; the others' blocks are
aligned with them), each output is assembled whole, and the head runs plain on them. Every
case is checked in float64 against the plain model: all outputs, every parameter gradient
and the input gradient, under both schedules where the case is about the tiling.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import re
import warnings
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from exactness import check_streamed, rel_err
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

import fxstream
from fxstream.cli import main as cli_main

warnings.filterwarnings("ignore", category=UserWarning)


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


class Pyramid(nn.Module):
    """Three stages at strides 2, 4 and 8, returned as a list (like timm ``features_only``)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1))
        self.stage1 = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(nn.Conv2d(6, 5, 3, stride=2, padding=1), nn.BatchNorm2d(5), nn.ReLU())

    def forward(self, x):
        f1 = self.stem(x)
        f2 = self.stage1(f1)
        f3 = self.stage2(f2)
        return [f1, f2, f3]


class PooledHead(nn.Module):
    """A classifier that pools every pyramid level (each a global op on its own output)."""

    def __init__(self):
        super().__init__()
        self.encoder = Pyramid()
        self.fc = nn.Linear(15, 3)

    def forward(self, x):
        f1, f2, f3 = self.encoder(x)
        pooled = torch.cat([f1.mean((2, 3)), f2.amax((2, 3)), f3.std((2, 3))], 1)
        return self.fc(pooled)


class SkipDecoder(nn.Module):
    """DeepLabV3+-like: a global pooling branch on the deepest features, upsampled to the
    stride-2 skip by the size of the skip, so the decoder is not local and runs plain."""

    def __init__(self):
        super().__init__()
        self.encoder = Pyramid()
        self.project = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        f1, _, f3 = self.encoder(x)
        context = f3 * f3.mean((2, 3), keepdim=True)  # image pooling: not local
        up = F.interpolate(context, size=f1.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([up, self.project(f1)], 1)


class TopDown(nn.Module):
    """FPN-like: terminal outputs (nothing in the trunk reads them) at strides 2 and 4, built
    top-down with nearest upsampling to the lateral's size, and a dict output."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.lat1 = nn.Conv2d(4, 5, 1)
        self.lat2 = nn.Conv2d(6, 5, 1)
        self.out1 = nn.Conv2d(5, 5, 3, padding=1)
        self.out2 = nn.Conv2d(5, 5, 3, padding=1)

    def forward(self, x):
        c1 = torch.relu(self.c1(x))
        c2 = torch.relu(self.c2(c1))
        p2 = self.lat2(c2)
        lateral = self.lat1(c1)
        p1 = lateral + F.interpolate(p2, size=lateral.shape[-2:], mode="nearest")
        return {"p1": self.out1(p1), "p2": self.out2(p2)}


def _eval(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model = model.eval()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("size", [(61, 47), (40, 83)])
def test_feature_pyramid_streams_exactly(schedule, size):
    model = _eval(Pyramid())
    smodel = fxstream.compile(model, tile_size=20)
    assert len(smodel.program().geometry.outputs) == 3
    assert isinstance(smodel(torch.randn(1, 3, *size)), list)
    check_streamed(model, torch.randn(2, 3, *size), 20, streamed=smodel, min_tiles=4)


def test_head_reading_several_outputs_streams_exactly(schedule):
    model = _eval(PooledHead())
    smodel = fxstream.compile(model, tile_size=20)
    assert len(smodel.program().geometry.outputs) == 3
    check_streamed(model, torch.randn(2, 3, 57, 66), 20, streamed=smodel, min_tiles=4)


def test_decoder_with_global_branch_streams_its_encoder(schedule):
    """The global branch streams as a statistic (issue 20); refused (max_levels=0), the largest
    prefix is the encoder, with both outputs the decoder reads."""
    model = _eval(SkipDecoder())
    check_streamed(model, torch.randn(1, 3, 53, 70), 60, min_tiles=2)
    with pytest.raises(fxstream.StatisticsError) as info:
        fxstream.compile(model, tile_size=20, max_levels=0)
    assert info.value.boundary == "encoder"  # the largest prefix: both outputs the decoder reads
    assert "largest streamable prefix: boundary='encoder'" in str(info.value)
    for boundary in ("encoder", ["encoder.stem", "encoder.stage2"]):
        smodel = fxstream.compile(model, tile_size=20, boundary=boundary)
        assert len(smodel.program().geometry.outputs) == 2
        check_streamed(model, torch.randn(1, 3, 53, 70), 20, streamed=smodel, min_tiles=4)


def test_terminal_outputs_and_dict_streams_exactly(schedule):
    """Outputs that no trunk op reads get blocks aligned with the last output's."""
    model = _eval(TopDown())
    smodel = fxstream.compile(model, tile_size=16)
    assert set(smodel.program().geometry.outputs) == {"out1", "out2"}
    check_streamed(model, torch.randn(1, 3, 45, 38), 16, streamed=smodel, min_tiles=4)


def test_every_tile_writes_its_block_of_every_output():
    """The blocks of each output partition it, and are aligned with the primary's blocks."""
    smodel = fxstream.compile(_eval(TopDown()), tile_size=16)
    geometry = smodel.program().geometry
    for kind in ("carry", "recompute"):
        shape_plan = fxstream.planning.tiling.plan_shape(geometry, smodel.plan, (45, 38), fxstream.Schedule(kind))
        assert shape_plan.num_tiles >= 4
        for index, size in enumerate(shape_plan.output_sizes):
            covered = torch.zeros(size, dtype=torch.int64)
            for tile in shape_plan.tiles:
                (r0, r1), (c0, c1) = tile.blocks[index]
                covered[r0:r1, c0:c1] += 1
            assert bool((covered == 1).all()), (kind, geometry.outputs[index])


def test_torchvision_fpn_on_intermediate_layers():
    """torchvision's FeaturePyramidNetwork with LastLevelMaxPool on IntermediateLayerGetter
    (the structure of its detection backbones), on a small body: an OrderedDict of four maps."""
    body = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 4, 3, stride=2, padding=1),
            layer1=nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
            layer2=nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU()),
            layer3=nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.ReLU()),
        )
    )

    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = IntermediateLayerGetter(body, {"layer1": "0", "layer2": "1", "layer3": "2"})
            self.fpn = FeaturePyramidNetwork([4, 6, 8], 5, extra_blocks=LastLevelMaxPool())

        def forward(self, x):
            return self.fpn(self.body(x))

    model = _eval(Backbone())
    for schedule in ("carry", "recompute"):
        smodel = fxstream.compile(model, tile_size=48, schedule=schedule)
        assert len(smodel.program().geometry.outputs) == 4
        errors = check_streamed(model, torch.randn(1, 3, 101, 90), 48, streamed=smodel, min_tiles=4)
        assert len([k for k in errors if k.startswith("output")]) == 4


def test_hooks_on_output_modules_fire_once_with_the_assembled_output():
    model = _eval(PooledHead())
    smodel = fxstream.compile(model, tile_size=20)  # hooks registered after compiling count from the next call
    seen = {}
    model.encoder.stem.register_forward_hook(lambda m, i, o: seen.setdefault("stem", []).append(o.detach()))
    model.encoder.stage2.register_forward_hook(lambda m, i, o: seen.setdefault("stage2", []).append(o.detach()))
    model.encoder.stage2.register_full_backward_hook(lambda m, gi, go: seen.setdefault("grad", []).append(go[0]))
    x = torch.randn(1, 3, 57, 66, requires_grad=True)
    model(x).sum().backward()
    plain = dict(seen)
    seen.clear()
    assert smodel.shape_plan(57, 66).num_tiles >= 4
    smodel(x).sum().backward()
    for key in ("stem", "stage2", "grad"):  # once each, with the whole tensor
        assert len(seen[key]) == 1 and rel_err(seen[key][0], plain[key][0]) < 1e-10, key


def test_hooks_that_would_differ_on_consumed_outputs_are_rejected():
    """stem's output is also read by stage1 inside the trunk: its gradient never exists
    whole, and replacing it would not reach stage1."""
    model = _eval(PooledHead())
    handle = model.encoder.stem.register_full_backward_hook(lambda m, gi, go: None)
    with pytest.raises(fxstream.UnsupportedOpError, match="encoder.stem.*backward hook"):
        fxstream.compile(model, tile_size=20)
    handle.remove()
    smodel = fxstream.compile(model, tile_size=20)
    model.encoder.stem.register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(fxstream.ContractError, match="encoder.stem"):
        smodel(torch.randn(1, 3, 40, 40))


def test_whole_batch_head_pickle_and_deepcopy():
    model = _eval(PooledHead())
    smodel = fxstream.compile(model, tile_size=20)
    x, y = torch.randn(4, 3, 41, 37), torch.randint(0, 3, (4,))
    loss_fn = nn.CrossEntropyLoss()
    fxstream.serial_backward(smodel, loss_fn, x, y, micro_batch_size=2, whole_batch_head=True)
    streamed = [p.grad.clone() for p in smodel.parameters()]
    model.zero_grad()
    loss_fn(model(x), y).backward()
    assert max(rel_err(a, p.grad) for a, p in zip(streamed, model.parameters())) < 1e-10
    for clone in (pickle.loads(pickle.dumps(smodel)), copy.deepcopy(smodel)):
        assert rel_err(clone(x), model(x)) < 1e-10


def test_plan_shows_every_output(tmp_path, capsys):
    path = tmp_path / "pyramid.py"
    here = os.path.dirname(__file__)
    path.write_text(f"import sys\nsys.path.insert(0, {here!r})\nfrom test_multi_output import PooledHead\n")
    assert (
        cli_main(
            ["plan", f"{path}:PooledHead", "--input-shape", "1,3,300,200", "--tile-size", "64", "--format", "json"]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    outputs = data["trunk_outputs"]
    assert [o["stride"] for o in outputs] == [[2, 2], [4, 4], [8, 8]]
    assert [o["shape"] for o in outputs] == [[1, 4, 150, 100], [1, 6, 75, 50], [1, 5, 38, 25]]
    parts = data["memory"]["streamed"]["training"]["parts"]  # the peak is in the backward phase here
    assert parts["trunk output grad"] == sum(o["bytes"] for o in outputs)  # every output's gradient, whole
    assert cli_main(["plan", f"{path}:PooledHead", "--input-shape", "1,3,300,200", "--tile-size", "64"]) == 0
    text = capsys.readouterr().out
    assert re.search(r"trunk outputs\s+3, each assembled whole", text), text
    assert (
        cli_main(
            [
                "plan",
                f"{path}:PooledHead",
                "--input-shape",
                "1,3,300,200",
                "--tile-size",
                "64",
                "--boundary",
                "encoder.stem,encoder.stage1",
                "--format",
                "json",
            ]
        )
        == 0
    )
    assert len(json.loads(capsys.readouterr().out)["trunk_outputs"]) == 2


def test_auto_boundary_streams_the_prefix_with_its_outputs():
    """boundary='auto' with a global pooling branch in the trunk: the branch streams as a
    statistic (issue 20), so the candidates reach the whole trunk; a cut at the encoder output
    streams with the outputs the rest reads."""
    model = _eval(SkipDecoder())
    choice = fxstream.memory.auto.choose(model, "auto", "auto", "1GiB", (1, 3, 64, 64))
    assert [c.boundary for c in choice.candidates][-1] == "cat"
    smodel = fxstream.compile(model, tile_size=20, boundary="encoder")
    assert smodel.program().geometry.outputs == ("encoder_stem_2", "encoder_stage2_2")
    smodel = fxstream.compile(
        model, tile_size="auto", boundary="auto", memory_budget="1GiB", input_shape=(1, 3, 64, 64)
    )
    check_streamed(model, torch.randn(1, 3, 64, 64), None, streamed=smodel)


@pytest.mark.parametrize("bad", [[], ["encoder", 3], ["auto"]])
def test_boundary_list_must_name_nodes(bad):
    with pytest.raises(fxstream.BoundaryError, match="boundary must be"):
        fxstream.compile(_eval(PooledHead()), tile_size=20, boundary=bad)
