"""Serial mini-batch training: the accumulated gradients equal whole-batch autograd on
the plain model (float64), per micro-batch size, reduction, whole-batch head mode,
train_step, and the progress/statistics hooks."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from exactness import RTOL64, rel_err

import fxstream

pytestmark = pytest.mark.usefixtures("schedule")


class Net(nn.Module):
    """Conv trunk (eval BatchNorm) + pooled head; ``head_bn`` adds a BatchNorm1d."""

    def __init__(self, head_bn: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm1d(8) if head_bn else nn.Identity()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.bn(self.conv1(x)))))
        return self.fc(self.norm(x.mean((2, 3))))


def make(head_bn=False, seed=0):
    torch.manual_seed(seed)
    model = Net(head_bn).double().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 1.5)
    if head_bn:
        model.norm.train()
    return model


def batch(n=4, size=(21, 17), seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, *size, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_grads(model, ref_grads, rtol=RTOL64):
    for name, p in model.named_parameters():
        err = rel_err(p.grad, ref_grads[name])
        assert err <= rtol, f"grad:{name}: relative error {err:.3e}"


@pytest.mark.parametrize("micro_batch_size", [1, 2, 3])
def test_serial_backward_equals_full_batch(micro_batch_size):
    model = make()
    x, y = batch()
    ref_loss = F.cross_entropy(model(x), y)
    ref_loss.backward()
    ref = grads(model)
    model.zero_grad()

    smodel = fxstream.compile(model, tile_size=9)
    assert len(smodel.shape_plan(21, 17).tiles) >= 4
    loss = fxstream.serial_backward(smodel, F.cross_entropy, x, y, micro_batch_size=micro_batch_size)
    assert not loss.requires_grad
    assert rel_err(loss, ref_loss.detach()) <= RTOL64
    assert_same_grads(model, ref)


def test_reduction_sum_and_wrapped_model():
    """A module that contains the streamed model; a summed loss."""
    model = make()
    x, y = batch(3)
    F.cross_entropy(model(x), y, reduction="sum").backward()
    ref = grads(model)
    model.zero_grad()

    wrapper = nn.Sequential(fxstream.compile(model, tile_size=9), nn.Identity())
    loss_fn = lambda out, t: F.cross_entropy(out, t, reduction="sum")  # noqa: E731
    fxstream.serial_backward(wrapper, loss_fn, x, y, micro_batch_size=2, reduction="sum")
    assert_same_grads(model, ref)


def test_explicit_micro_batches_of_different_sizes():
    """A sequence of images of different sizes: the mean loss over all images."""
    model = make()
    images = [batch(1, size, seed=s)[0] for s, size in enumerate([(21, 17), (15, 30), (9, 9)])]
    targets = [torch.tensor([t]) for t in (0, 2, 1)]
    sum(F.cross_entropy(model(x), t) for x, t in zip(images, targets)).div(3).backward()
    ref = grads(model)
    model.zero_grad()

    smodel = fxstream.compile(model, tile_size=9)
    fxstream.serial_backward(smodel, F.cross_entropy, images, targets)
    assert_same_grads(model, ref)


def test_whole_batch_head_with_training_batchnorm1d():
    """The head's training-mode BatchNorm1d normalises over the whole batch, and its
    running statistics are updated once, as in the plain model."""
    model = make(head_bn=True)
    plain = make(head_bn=True)
    x, y = batch(4)
    ref_loss = F.cross_entropy(plain(x), y)
    ref_loss.backward()

    smodel = fxstream.compile(model, tile_size=9)
    loss = fxstream.serial_backward(smodel, F.cross_entropy, x, y, micro_batch_size=1, whole_batch_head=True)
    assert rel_err(loss, ref_loss.detach()) <= RTOL64
    assert_same_grads(model, grads(plain))
    assert rel_err(model.norm.running_mean, plain.norm.running_mean) <= RTOL64
    assert model.norm.num_batches_tracked.item() == 1
    assert smodel.last_stats.passes == 4  # one streamed forward per image


def test_whole_batch_head_contrastive_loss_and_wrapper():
    """A loss over pairs of samples (not a mean of per-sample terms), through a wrapper."""
    model = make()
    x, _ = batch(4)

    def contrastive(out, _):
        z = F.normalize(out, dim=1)
        return torch.logsumexp(z @ z.T / 0.5, dim=1).mean()

    contrastive(model(x), None).backward()
    ref = grads(model)
    model.zero_grad()

    wrapper = nn.Sequential(fxstream.compile(model, tile_size=9))
    fxstream.serial_backward(wrapper, contrastive, x, None, micro_batch_size=2, whole_batch_head=True)
    assert_same_grads(model, ref)


def test_train_step_sgd_matches_plain_step():
    plain, model = make(), make()
    x, y = batch(4)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    smodel = fxstream.compile(model, tile_size=9)
    for _ in range(2):
        opt_plain.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt_plain.step()
        fxstream.train_step(smodel, opt, F.cross_entropy, x, y, micro_batch_size=2)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert rel_err(p.detach(), q.detach()) <= RTOL64, name


def test_stats_count_tiles_per_step():
    model = make()
    x, y = batch(4)
    smodel = fxstream.compile(model, tile_size=9)
    tiles = len(smodel.shape_plan(21, 17).tiles)
    fxstream.serial_backward(smodel, F.cross_entropy, x, y, micro_batch_size=2)
    fxstream.serial_backward(smodel, F.cross_entropy, x, y, micro_batch_size=2)  # reset per step
    stats = smodel.last_stats
    assert (stats.passes, stats.forward_tiles, stats.backward_tiles) == (2, 2 * tiles, 2 * tiles)
    assert stats.forward_s > 0 and stats.backward_s > 0
    assert stats.peak_memory is None  # CPU: no device allocator figure
    assert stats.host_peak_rss > 0
    assert f"{2 * tiles} forward tiles" in str(stats)


def test_verbose_prints_summary(capsys):
    smodel = fxstream.compile(make(), tile_size=9)
    x, y = batch(2)
    fxstream.serial_backward(smodel, F.cross_entropy, x, y, verbose=True)
    assert "fxstream step: loss" in capsys.readouterr().out


def test_progress_bar_over_tiles(monkeypatch):
    """progress=True wraps the tiles of every pass in a tqdm bar (tqdm replaced by a
    recorder here: it is an optional dependency)."""
    updates = []

    class FakeTqdm:
        def __init__(self, total, desc, **kwargs):
            self.desc = desc
            updates.append([desc, total, 0])

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            updates[-1][2] += n

    fake = types.ModuleType("tqdm.auto")
    fake.tqdm = FakeTqdm
    monkeypatch.setitem(sys.modules, "tqdm", types.ModuleType("tqdm"))
    monkeypatch.setitem(sys.modules, "tqdm.auto", fake)
    smodel = fxstream.compile(make(), tile_size=9, progress=True)
    tiles = len(smodel.shape_plan(21, 17).tiles)
    x, y = batch(1)
    F.cross_entropy(smodel(x), y).backward()
    assert updates == [["fxstream forward", tiles, tiles], ["fxstream backward", tiles, tiles]]
    smodel.progress = False
    smodel(x)
    assert len(updates) == 2


def test_progress_without_tqdm_prints_a_text_line(monkeypatch, capsys):
    """Without tqdm, progress=True still shows progress: a counter line on stderr per pass,
    rewritten in place and cleared at the end; the result is unchanged."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    model = make()
    smodel = fxstream.compile(model, tile_size=9, progress=True)
    tiles = len(smodel.shape_plan(21, 17).tiles)
    x, y = batch(1)
    F.cross_entropy(smodel(x), y).backward()
    err = capsys.readouterr().err
    assert f"fxstream forward: {tiles}/{tiles} tiles" in err, err
    assert f"fxstream backward: {tiles}/{tiles} tiles" in err, err
    assert err.endswith("\r") and "\n" not in err, repr(err)  # cleared, leaves no line behind
    streamed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(streamed[n], p.grad)


def test_train_step_accepts_a_plain_model():
    """A baseline trains through the same function: train_step on the uncompiled model, two
    images per micro-batch, equals whole-batch SGD on a copy, and agrees with the streamed step."""
    reference, plain, streamed = make(), make(), make()
    x, y = batch(4)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (reference, plain, streamed)]
    smodel = fxstream.compile(streamed, tile_size=9)
    for _ in range(2):
        opts[0].zero_grad()
        expected = F.cross_entropy(reference(x), y)
        expected.backward()
        opts[0].step()
        loss = fxstream.train_step(plain, opts[1], F.cross_entropy, x, y, micro_batch_size=2)
        assert rel_err(loss, expected.detach()) <= RTOL64
        fxstream.train_step(smodel, opts[2], F.cross_entropy, x, y, micro_batch_size=2)
    for (name, p), q, r in zip(plain.named_parameters(), reference.parameters(), streamed.parameters()):
        assert rel_err(p.detach(), q.detach()) <= RTOL64, name
        assert rel_err(r.detach(), q.detach()) <= RTOL64, name


def test_serial_backward_on_a_plain_model_prints_its_loss(capsys):
    x, y = batch(2)
    loss = fxstream.serial_backward(make(), F.cross_entropy, x, y, verbose=True)
    assert f"loss {loss.item():.4g}; plain model" in capsys.readouterr().out


def test_serial_backward_rejects_bad_reduction_and_a_whole_batch_head_without_trunk():
    x, y = batch(2)
    with pytest.raises(fxstream.ArgumentError, match="reduction"):
        fxstream.serial_backward(fxstream.compile(make(), tile_size=9), F.cross_entropy, x, y, reduction="none")
    with pytest.raises(fxstream.ArgumentError, match="one fxstream trunk, found 0"):
        fxstream.serial_backward(make(), F.cross_entropy, x, y, whole_batch_head=True)
