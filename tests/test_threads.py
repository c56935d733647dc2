"""The CPU-threads warning (fxstream.runtime.threads): a streamed step on a CPU with more
torch threads than free cores warns once per process, with the fix; otherwise nothing.

The detection inputs (torch's thread count, the CPU affinity, the cgroup quota, the load
average and this process's own share of it) are monkeypatched; the suite itself runs with
one thread (conftest.py), where nothing is ever checked."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxstream
from fxstream.runtime import threads


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(F.relu(self.b(F.relu(self.a(x)))).mean((2, 3)))


@pytest.fixture
def machine(monkeypatch):
    """Set the detection inputs: ``machine(threads=, cpus=, load=, own=, quota=)``."""
    monkeypatch.setattr(threads, "_warned", False)

    def set_up(threads_=2, cpus=2, load=0.0, own=1.0, quota=None):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads_)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
        monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
        monkeypatch.setattr(threads, "own_load", lambda: own)
        monkeypatch.setattr(threads, "cgroup_quota", lambda: quota)

    return set_up


def steps(n: int = 2) -> list:
    """``n`` streamed training steps; the PerformanceWarnings they raised."""
    torch.manual_seed(0)
    smodel = fxstream.compile(Net(), tile_size=16)
    x = torch.randn(1, 3, 40, 40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(n):
            F.cross_entropy(smodel(x), torch.tensor([1])).backward()
    return [w for w in caught if issubclass(w.category, fxstream.PerformanceWarning)]


@pytest.mark.parametrize(
    "case, inputs, fit",
    [
        ("affinity", dict(threads_=2, cpus=1), 1),
        ("quota", dict(threads_=4, cpus=4, quota=2), 2),
        ("busy", dict(threads_=2, cpus=2, load=2.6, own=1.0), 1),  # one other busy process and a half
        ("busy, 4 cores", dict(threads_=4, cpus=4, load=3.0, own=0.5), 2),
    ],
)
def test_warns_once_with_the_fix(machine, case, inputs, fit):
    machine(**inputs)
    caught = steps(3)
    assert len(caught) == 1, [str(w.message) for w in caught]
    message = str(caught[0].message)
    assert f"torch.set_num_threads({fit})" in message, message
    assert f"torch runs {inputs['threads_']} CPU threads" in message, message
    assert caught[0].filename == __file__, caught[0].filename  # points at the user's call
    assert issubclass(fxstream.PerformanceWarning, UserWarning)
    assert steps(1) == []  # once per process


@pytest.mark.parametrize(
    "inputs",
    [
        dict(threads_=1, cpus=1, load=8.0),  # one thread: no barrier to wait at
        dict(threads_=2, cpus=2, load=1.2, own=1.0),  # our own load, the machine otherwise idle
        dict(threads_=2, cpus=2, load=2.0, own=1.8),  # a busy process of our own (two threads)
        dict(threads_=4, cpus=8, load=4.0, own=0.0),  # four busy, four free
        dict(threads_=2, cpus=4, quota=None, load=0.0),
    ],
)
def test_silent_where_threads_fit(machine, inputs):
    machine(**inputs)
    assert steps(2) == []


def test_not_on_another_device(machine):
    machine(threads_=2, cpus=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        threads.check(torch.device("meta"))  # only a CPU compute device is checked
    assert threads._warned is False


def test_diagnose_without_a_load_average(machine, monkeypatch):
    machine(threads_=2, cpus=2)

    def no_load():
        raise OSError

    monkeypatch.setattr(os, "getloadavg", no_load)
    assert threads.diagnose(2) is None
    assert threads.diagnose(3) == ("this process may use 2 CPUs (CPU affinity)", 2)


def test_cgroup_quota(tmp_path):
    path = tmp_path / "cpu.max"
    for text, cores in (("max 100000\n", None), ("150000 100000\n", 2), ("50000 100000\n", 1), ("200000 100000", 2)):
        path.write_text(text)
        assert threads.cgroup_quota(str(path)) == cores, text
    assert threads.cgroup_quota(str(tmp_path / "missing")) is None
