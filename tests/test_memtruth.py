"""The memory-truth harness (fxstream/memory/truth.py) on known allocation patterns: the exact
tensor peak, phases, the live set at the peak and the resident tensors."""

from __future__ import annotations

import pytest
import torch

from fxstream.memory import truth as memtruth

MIB = 1 << 20


def _floats(mib: int) -> torch.Tensor:
    return torch.empty(mib * MIB // 4)


def test_exact_peak_of_a_known_pattern():
    kept = []

    def step():
        a, b = _floats(3), _floats(5)
        c = _floats(7)  # 15 MiB live
        del b  # 10
        d = _floats(4)  # 14
        kept.append(d)  # d outlives the call; a and c are freed when step returns
        del a, c

    truth = memtruth.measure(step)
    assert truth.peak == 15 * MIB
    assert truth.resident == 0 and truth.total == 15 * MIB
    assert truth.phase == memtruth.START


def test_phases_and_live_set_at_the_peak():
    def step():
        memtruth.mark("one")
        a = _floats(2)
        memtruth.mark("two")
        b = _floats(6)
        del b
        with memtruth.phase("three"):
            c = torch.zeros(3 * MIB // 4)
        del a, c  # back in phase "two"

    truth = memtruth.measure(step)
    assert truth.peak == 8 * MIB and truth.phase == "two"
    assert truth.phases["one"] == memtruth.Phase(2 * MIB, 0)
    assert truth.phases["two"] == memtruth.Phase(8 * MIB, 2 * MIB)
    assert truth.phases["three"] == memtruth.Phase(5 * MIB, 2 * MIB)
    assert [(a.bytes, a.phase) for a in truth.live_at_peak] == [(6 * MIB, "two"), (2 * MIB, "one")]
    assert all(any("aten::empty" in s for s in a.stack) for a in truth.live_at_peak)
    owners = truth.by_owner(lambda a: a.phase)
    assert owners == {"two": 6 * MIB, "one": 2 * MIB}


def test_resident_tensors_count_once():
    x = _floats(4)
    net = torch.nn.Linear(256, 256)  # 256*256 + 256 floats
    params = [*net.parameters(), x, x[:10]]  # a view of x shares its storage

    def step():
        y = _floats(1)
        params.clear()  # nothing else holds x? the test still does: no free event
        del y

    truth = memtruth.measure(step, resident=params)
    assert truth.resident == 4 * MIB + (256 * 256 + 256) * 4
    assert truth.peak == 1 * MIB and truth.total == truth.resident + truth.peak

    holder = [_floats(3)]

    def frees_first():
        holder.clear()  # frees 3 MiB that existed before the call: the CPU profiler does not see it
        _floats(2)

    assert memtruth.measure(frees_first).peak == 2 * MIB


def test_autograd_peak():
    w = torch.randn(512, 512, requires_grad=True)
    x = torch.randn(1024, 512)

    def step():
        (x @ w).relu().sum().backward()

    truth = memtruth.measure(step, resident=[w, x])
    out = 1024 * 512 * 4
    # the product and its relu (saved), then the gradient of the relu's output and of the product
    assert 2 * out <= truth.peak <= 4 * out + 512 * 512 * 4
    assert w.grad is not None


def test_mark_outside_a_measurement_does_nothing():
    memtruth.mark("nothing")
    with memtruth.phase("nothing"):
        pass


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak():
    def step():
        a = torch.empty(3 * MIB // 4, device="cuda")
        memtruth.mark("b")
        b = torch.empty(5 * MIB // 4, device="cuda")
        del a, b

    truth = memtruth.measure(step, device="cuda")
    assert truth.peak == 8 * MIB and truth.phase == "b"
