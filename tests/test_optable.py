"""The op table's in-place maps are derived from one declaration per op, and a module with
inplace=True that has no out-of-place form is rejected instead of silently miscomputed."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn as nn
from exactness import check_streamed

import fxstream
from fxstream.ops import table as ops

pytestmark = pytest.mark.usefixtures("uniform_tiles")


def test_every_local_module_with_inplace_has_an_out_of_place_form():
    for module in ops.MODULES:
        if "inplace" in inspect.signature(module.__init__).parameters:
            assert module in ops.INPLACE_MODULES, module.__name__


def test_declared_activations_fill_every_table():
    for op in ops.ACTIVATIONS:
        assert ops.MODULES[op.module] is ops.pointwise
        assert ops.FUNCTIONS[op.function] is ops.pointwise
        assert all(ops.FUNCTIONS[f] is ops.pointwise for f in op.inplace_functions())
        assert ops.INPLACE_MODULES[op.module] == (op.function, op.attributes)
        names = inspect.signature(op.module.__init__).parameters  # declared attributes are constructor args
        assert all(a in names for a in op.attributes)
    assert torch.relu_ in ops.FUNCTIONS and nn.functional.hardtanh_ in ops.FUNCTIONS


def inplace_net(activation: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), activation, nn.Conv2d(4, 2, 3, padding=1)).double().eval()


@pytest.mark.parametrize(
    "activation",
    [nn.SiLU(inplace=True), nn.Hardtanh(-0.5, 0.3, inplace=True), nn.ELU(0.7, inplace=True), nn.Dropout(0.3, True)],
)
def test_inplace_modules_are_exact(activation):
    model = inplace_net(activation)
    check_streamed(model, torch.randn(1, 3, 29, 23, dtype=torch.float64), 12, min_tiles=4)


def test_inplace_module_without_mapping_is_rejected(monkeypatch):
    monkeypatch.delitem(ops.INPLACE_MODULES, nn.SiLU)
    with pytest.raises(fxstream.UnsupportedOpError, match=r"SiLU\(inplace=True\).*\n.*\n.*\n.*inplace=False"):
        fxstream.compile(inplace_net(nn.SiLU(inplace=True)), tile_size=12)
