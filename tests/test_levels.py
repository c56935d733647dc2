"""Levels of global statistics (issue 20, step 2): which reductions are statistics, their
levels, the depth of every trunk node, the statistic head, and what is still rejected."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxstream
from fxstream.analysis import diagnose
from fxstream.analysis.analyze import analyze
from fxstream.frontend.trace import trace


def analysed(model: nn.Module, boundary=None, max_levels=None):
    return analyze(trace(model), boundary, None, max_levels)


def levels_of(analysis) -> dict:
    return {s.node.name: s.level for s in analysis.statistics}


def depth_of(analysis) -> dict:
    return {n.name: d for n, d in analysis.depth.items()}


class SE(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, 2, 1), nn.Conv2d(2, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class GNChain(nn.Module):
    """conv -> GN -> conv -> GN -> conv: two dependent levels."""

    def __init__(self, norm=lambda c: nn.GroupNorm(2, c)):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 4, 3, padding=1), norm(4)
        self.c2, self.n2 = nn.Conv2d(4, 4, 3, padding=1), norm(4)
        self.c3 = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        return self.c3(F.relu(self.n2(self.c2(F.relu(self.n1(self.c1(x)))))))


class PSP(nn.Module):
    """A pyramid pooling module: 1, 2, 3, 6 bins, each conv -> BN -> ReLU, upsampled back."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bins = (1, 2, 3, 6)
        self.convs = nn.ModuleList(nn.Sequential(nn.Conv2d(c, 2, 1), nn.BatchNorm2d(2), nn.ReLU()) for _ in self.bins)
        self.out = nn.Conv2d(c + 2 * len(self.bins), 2, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        h, w = x.size(2), x.size(3)
        ups = [
            F.interpolate(conv(F.adaptive_avg_pool2d(x, b)), size=(h, w), mode="bilinear", align_corners=True)
            for b, conv in zip(self.bins, self.convs)
        ]
        return self.out(torch.cat([x] + ups, 1))


class UNetSkip(nn.Module):
    """An InstanceNorm in the encoder, read by the decoder through a skip."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.InstanceNorm2d(4, affine=True)
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.norm2 = nn.InstanceNorm2d(4)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.dec = nn.Conv2d(8, 2, 3, padding=1)

    def forward(self, x):
        skip = F.relu(self.norm(self.enc(x)))
        low = F.relu(self.norm2(self.down(skip)))
        return self.dec(torch.cat([self.up(low), skip], 1))


class Siblings(nn.Module):
    """Two SE blocks on parallel branches: one level."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.a, self.b = SE(4), SE(4)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.out(self.a(x) + self.b(F.relu(x)))


class MeanBroadcast(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        y = self.c1(x)
        return self.c2(y - y.mean((2, 3), keepdim=True))


class Classifier(nn.Module):
    """An SE block, then a classifier head that pools the trunk output (a head reduction)."""

    def __init__(self):
        super().__init__()
        self.stem, self.se, self.fc = nn.Conv2d(3, 4, 3, padding=1), SE(4), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.se(self.stem(x)).mean((2, 3)))


def test_group_norm_chain_has_two_levels():
    a = analysed(GNChain())
    assert sorted(levels_of(a).values()) == [1, 2] and a.levels == 2
    depth = depth_of(a)
    assert depth["x"] == depth["c1"] == 0 and depth["c2"] == 1 and depth["c3"] == 2
    assert all(s.category == diagnose.GLOBAL_NORM and s.op == "GroupNorm" for s in a.statistics)
    assert [n.name for n in a.outputs] == ["c3"]
    assert not any(n.op == "call_module" and "n1" in str(n.target) for n in a.gm.graph.nodes), "n1 not decomposed"
    assert {d[0] for d in a.decomposed} == {"n1", "n2"}


def test_squeeze_excitation_and_its_head():
    a = analysed(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), SE(4), nn.Conv2d(4, 2, 1)))
    (stat,) = a.statistics
    assert stat.level == 1 and stat.category == diagnose.SQUEEZE_EXCITATION and stat.op == "mean"
    heads = [n.name for n in a.heads]
    assert any("fc1" in h for h in heads) and any("fc2" in h for h in heads) and "sigmoid" in heads
    assert [v.name for v, _ in a.values] == ["sigmoid"]


def test_pyramid_pooling_bins_share_one_level():
    a = analysed(PSP().eval())
    assert sorted(levels_of(a).values()) == [1, 1, 1, 1]
    assert all(s.category == diagnose.POOLING_BRANCH for s in a.statistics)
    assert [s.spec.bins for s in a.statistics] == [(1, 1), (2, 2), (3, 3), (6, 6)]
    broadcasts = [n for n in a.trunk if getattr(a.verdicts[n], "kind", None) == "broadcast"]
    assert len(broadcasts) == 4 and all(a.verdicts[n].input.name == "stem" for n in broadcasts)
    assert depth_of(a)["out"] == 1


def test_head_batch_norm_on_a_pooled_grid_runs_in_the_head():
    """Train mode: the BatchNorm of each bin normalises a small grid (the statistic head), not the image."""
    a = analysed(PSP().train())
    assert sorted(levels_of(a).values()) == [1, 1, 1, 1]
    norms = [n for n in a.heads if n.op == "call_module" and isinstance(a.gm.get_submodule(n.target), nn.BatchNorm2d)]
    assert len(norms) == 4


def test_unet_skip_levels():
    a = analysed(UNetSkip())
    assert sorted(levels_of(a).values()) == [1, 2]
    depth = depth_of(a)
    assert depth["enc"] == 0 and depth["down"] == 1 and depth["up"] == 2 and depth["dec"] == 2
    assert all(s.op == "InstanceNorm2d" for s in a.statistics)


def test_siblings_share_a_level_and_mean_broadcast():
    assert sorted(levels_of(analysed(Siblings())).values()) == [1, 1]
    a = analysed(MeanBroadcast())
    (stat,) = a.statistics
    assert stat.level == 1 and stat.category == diagnose.GLOBAL_REDUCTION


def test_batch_norm_train_is_a_statistic_eval_is_local():
    model = GNChain(lambda c: nn.BatchNorm2d(c))
    assert analysed(model.eval()).statistics == ()
    a = analysed(model.train())
    assert sorted(levels_of(a).values()) == [1, 2] and all(s.op == "BatchNorm2d" for s in a.statistics)
    assert [s.spec.dims for s in a.statistics] == [(0, 2, 3), (0, 2, 3)]


def test_head_reduction_makes_an_output_statistic_does_not():
    a = analysed(Classifier())
    assert levels_of(a) == {"mean": 1}
    assert [n.name for n in a.outputs] == ["mul"]  # the classifier's mean is a head reduction


def test_boundary_with_statistics():
    model = GNChain()
    a = analysed(model, boundary="n1")  # the decomposed module: its application
    assert levels_of(a) == {"moments": 1} and [n.name for n in a.outputs] == ["normalize"]
    a = analysed(model, boundary="c2")
    assert levels_of(a) == {"moments": 1} and [n.name for n in a.outputs] == ["c2"]


def test_max_levels_message():
    class Deep(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else 4, 4, 3, padding=1) for i in range(6))
            self.norms = nn.ModuleList(nn.InstanceNorm2d(4) for _ in range(6))

        def forward(self, x):
            for conv, norm in zip(self.convs, self.norms):
                x = F.relu(norm(conv(x)))
            return x

    with pytest.raises(fxstream.StatisticsError) as info:
        analysed(Deep(), max_levels=4)
    err = info.value
    message = str(err)
    assert isinstance(err, fxstream.UnsupportedOpError) and err.levels == 6 and err.max_levels == 4
    assert "6 dependent levels" in message and "InstanceNorm2d x6" in message
    assert "'norms.0' at level 1" in message and "'norms.5' at level 6" in message
    assert "14 passes" in message and "fix: pass max_levels=6" in message
    ratio = float(re.search(r"predicted training step of ([\d.]+)x", message).group(1))
    assert ratio == pytest.approx(err.predicted_step_ratio, abs=0.05) and ratio > 4
    # the largest prefix within 4 levels: up to the 5th convolution (its input has depth 4)
    assert err.boundary == "convs.4" and "boundary='convs.4'" in message
    assert analysed(Deep(), boundary=err.boundary, max_levels=4).levels == 4
    assert analysed(Deep(), max_levels=6).levels == 6


# --- what is still rejected ---------------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        q, k = self.q(x).flatten(2), self.k(x).flatten(2)
        attn = torch.softmax(q.transpose(1, 2) @ k, dim=-1)
        return x + (k @ attn.transpose(1, 2)).view(n, c, h, w)


class StripPool(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x.mean(2, keepdim=True))  # over one spatial axis only


class MaxGate(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x.amax((2, 3), keepdim=True))  # CBAM-style max: not a sum


class DynamicConv(nn.Module):
    def forward(self, x):
        weight = x.mean((0, 2, 3)).view(1, -1, 1, 1).expand(4, -1, 1, 1).contiguous()
        return F.conv2d(x, weight)  # a statistic as a convolution weight


class HeadReadsGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        gate = torch.sigmoid(self.fc(x.mean((2, 3), keepdim=True)))
        return x * gate, gate


class SizedHead(nn.Module):
    """An old-style SE: b, c = x.size()[:2]; the head reads the trunk tensor's sizes."""

    def __init__(self):
        super().__init__()
        self.stem, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 4)

    def forward(self, x):
        x = self.stem(x)
        b, c = x.size(0), x.size(1)
        return x * torch.sigmoid(self.fc(x.mean((2, 3)))).view(b, c, 1, 1)


REJECTED = {
    "attention": (Attention, diagnose.ATTENTION),
    "strip pooling": (StripPool, "some spatial axes but not all"),
    "max gate": (MaxGate, "a max"),
    "dynamic convolution": (DynamicConv, "other than pointwise"),
    "head reads the statistic": (HeadReadsGate, "the model's head reads it too"),
    "head reads sizes": (SizedHead, "the size of a streamed tensor"),
}


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_rejections(name):
    factory, words = REJECTED[name]
    model = factory() if name.startswith("head") else nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), factory())
    with pytest.raises(fxstream.UnsupportedOpError) as info:
        analysed(model)
    assert words in str(info.value) and "fix:" in str(info.value), str(info.value)


def test_sync_batch_norm_in_training_is_rejected():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.SyncBatchNorm(4), nn.Conv2d(4, 2, 1)).train()
    with pytest.raises(fxstream.UnsupportedOpError, match="SyncBatchNorm in training mode") as info:
        analysed(model)
    assert "global norm" in str(info.value) and "model.eval()" in str(info.value)
