"""Tracing what torch.fx alone cannot (size-dependent control flow, torch.jit.isinstance,
unregistered modules), the trace check, side effects in forward, and size queries in all forms."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from exactness import check_streamed

import fxstream
from fxstream.frontend.tracecheck import check_trace

pytestmark = pytest.mark.usefixtures("uniform_tiles")


def conv(cin: int, cout: int, k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2)


def build(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return model.double().eval()


class JitIsinstance(nn.Module):
    """MONAI BasicUNet's pattern: the skip is used under ``torch.jit.isinstance``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = conv(3, 4), conv(4, 4)

    def forward(self, x):
        y = self.a(x)
        if torch.jit.isinstance(y, torch.Tensor):
            y = y + x.mean(1, keepdim=True)
        return self.b(y)


def test_jit_isinstance_is_traced_like_isinstance():
    model = build(JitIsinstance())
    assert "mean" in fxstream.trace(model).code
    check_streamed(model, torch.randn(1, 3, 33, 26, dtype=torch.float64), 12, min_tiles=4)


class PlainIsinstance(nn.Module):
    """``isinstance(proxy, torch.Tensor)`` is False while tracing: the graph drops the branch."""

    def __init__(self):
        super().__init__()
        self.a = conv(3, 4)

    def forward(self, x):
        y = self.a(x)
        if isinstance(y, torch.Tensor):
            y = y * 2
        return y


def test_trace_check_names_the_diverging_output():
    with pytest.raises(fxstream.TraceError) as info:
        fxstream.compile(build(PlainIsinstance()), tile_size=16)
    message = str(info.value)
    assert "output (the only output) differs" in message and "jit.isinstance" in message


class TwoOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = conv(3, 4)
        self.flag = True

    def forward(self, x):
        y = self.a(x)
        return {"same": y, "scaled": y * 2 if self.flag else y}


def test_trace_check_compares_every_output():
    model = build(TwoOutputs())
    gm = fxstream.trace(model)
    model.flag = False  # the model changed after tracing: its graph is stale
    with pytest.raises(fxstream.TraceError, match=r"output \['scaled'\] differs"):
        check_trace(model, gm)


class SizeControlFlow(nn.Module):
    """smp's check_input_shape, a branch on a channel count (Linknet), a branch and max()
    on sizes (timm's vgg head), and iteration over a shape."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = conv(3, 4), conv(4, 4), conv(4, 2)

    def forward(self, x):
        h, w = x.shape[-2:]
        if h < 8 or w < 8:
            raise RuntimeError(f"wrong size {h}x{w}")
        y = self.a(x)
        if y.shape[1] != 0:
            y = self.b(y) + y
        for size in y.shape[2:]:
            if size < 4:
                raise RuntimeError("too small")
        k = max(3, y.shape[1] - 1)
        return self.c(F.max_pool2d(y, k, stride=1, padding=k // 2))


def test_size_control_flow_is_traced_and_exact():
    model = build(SizeControlFlow())
    check_streamed(model, torch.randn(2, 3, 37, 29, dtype=torch.float64), 16, min_tiles=4)


class ValueControlFlow(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = conv(3, 4)

    def forward(self, x):
        y = self.a(x)
        return y * 2 if y.sum() > 0 else y


def test_control_flow_on_tensor_values_is_refused():
    with pytest.raises(fxstream.TraceError, match=r"depends on tensor values.*\n.*y.sum\(\) > 0"):
        fxstream.compile(build(ValueControlFlow()), tile_size=16)


class Unregistered(nn.Module):
    """Modules called from forward but kept out of the module tree (a plain list), as in
    MONAI's FlexibleUNet: torch.fx refuses them ("not installed as a submodule")."""

    def __init__(self):
        super().__init__()
        self.a = conv(3, 4)
        self.hidden = [nn.ReLU(), nn.MaxPool2d(3, 1, 1)]
        self.b = conv(4, 2)

    def forward(self, x):
        y = self.a(x)
        for m in self.hidden:
            y = m(y)
        return self.b(y)


def test_unregistered_module_is_traced_through():
    model = build(Unregistered())
    assert "max_pool2d" in fxstream.trace(model).code
    check_streamed(model, torch.randn(1, 3, 31, 27, dtype=torch.float64), 14, min_tiles=4)


class CountsInt(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = conv(3, 4)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.a(x)


class CountsBuffer(nn.Module):
    def __init__(self, inplace: bool):
        super().__init__()
        self.inplace = inplace
        self.a = conv(3, 4)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        if self.inplace:
            self.calls.add_(1)
        else:
            self.calls = self.calls + 1
        return self.a(x)


@pytest.mark.parametrize("model", [CountsInt(), CountsBuffer(inplace=True), CountsBuffer(inplace=False)])
def test_state_mutation_in_forward_is_rejected(model):
    with pytest.raises(fxstream.UnsupportedOpError) as info:
        fxstream.compile(model, tile_size=16)
    message = str(info.value)
    assert "'calls'" in message and "test_tracing.py" in message and "self.calls" in message
    if isinstance(model, CountsBuffer) and model.inplace:
        assert info.value.node == "add_"


class Up(nn.Module):
    """milesial's U-Net up block: pad the upsampled map to the skip, reading sizes in ``form``."""

    def __init__(self, cin: int, cout: int, form: str):
        super().__init__()
        self.form = form
        self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
        self.conv = nn.Sequential(conv(cin, cout), nn.ReLU())

    def forward(self, x1, x2):
        x1 = self.up(x1)
        if self.form == "size(i)":
            dy, dx = x2.size(2) - x1.size(2), x2.size(3) - x1.size(3)
        elif self.form == "size()[i]":
            dy, dx = x2.size()[2] - x1.size()[2], x2.size()[3] - x1.size()[3]
        else:
            dy, dx = x2.shape[2] - x1.shape[2], x2.shape[3] - x1.shape[3]
        x1 = F.pad(x1, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([x2, x1], dim=1))


class UNet(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.inc = nn.Sequential(conv(3, 4), nn.ReLU())
        self.down1 = nn.Sequential(nn.MaxPool2d(2), conv(4, 8), nn.ReLU())
        self.down2 = nn.Sequential(nn.MaxPool2d(2), conv(8, 16), nn.ReLU())
        self.up1, self.up2 = Up(16, 8, form), Up(8, 4, form)
        self.outc = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        return self.outc(self.up2(self.up1(x3, x2), x1))


@pytest.mark.parametrize("form", ["size(i)", "size()[i]", "shape[i]"])
def test_unet_size_fixup_in_every_form(form):
    model = build(UNet(form))
    check_streamed(model, torch.randn(1, 3, 39, 45, dtype=torch.float64), 32, min_tiles=4)


class OddPad(nn.Module):
    """Pads odd widths before pooling: the traced branch holds for even widths only."""

    def __init__(self):
        super().__init__()
        self.a, self.b = conv(3, 4), conv(4, 2)

    def forward(self, x):
        y = self.a(x)
        if y.shape[-1] % 2 == 1:
            y = F.pad(y, [0, 1, 0, 0], mode="replicate")
        return self.b(F.max_pool2d(y, 2))


def test_a_size_that_branches_otherwise_is_traced_again_at_that_size():
    """Traced at an even width, the compiled module meets an odd one: the size guard stops
    the first attempt, the model is traced again at that size, and both sizes stream exactly
    (each with its own program, without tracing a third time)."""
    model = build(OddPad())
    smodel = fxstream.compile(model, tile_size=16)
    check_streamed(model, torch.randn(1, 3, 33, 40, dtype=torch.float64), 16, streamed=smodel, min_tiles=4)
    check_streamed(model, torch.randn(1, 3, 33, 41, dtype=torch.float64), 16, streamed=smodel, min_tiles=4)
    programs = len(smodel._programs)
    check_streamed(model, torch.randn(1, 3, 33, 40, dtype=torch.float64), 16, streamed=smodel, min_tiles=4)
    check_streamed(model, torch.randn(1, 3, 33, 41, dtype=torch.float64), 16, streamed=smodel, min_tiles=4)
    assert len(smodel._programs) == programs == 2


class DropoutThenBranch(nn.Module):
    """Dropout in the trunk, then a branch on the size in the head."""

    def __init__(self):
        super().__init__()
        self.a, self.drop = conv(3, 4), nn.Dropout(0.5)

    def forward(self, x):
        y = self.drop(self.a(x))
        if y.shape[-1] % 2 == 1:
            y = y * 2
        return y.mean((2, 3))


def test_the_retry_at_a_new_branch_draws_what_the_first_attempt_drew():
    """The first attempt drew dropout masks before it stopped at the branch; the retry starts
    from the same generator state: the call gives what a call without a retry gives."""
    model = build(DropoutThenBranch()).train()
    smodel = fxstream.compile(model, tile_size=16)
    x = torch.randn(1, 3, 20, 21, dtype=torch.float64)
    outputs, states = [], []
    for _ in range(2):  # the first call at this size retries, the second does not
        torch.manual_seed(3)
        outputs.append(smodel(x))
        states.append(torch.random.get_rng_state())
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(states[0], states[1])


class HeadNormThenBranch(nn.Module):
    """A training-mode BatchNorm in the head runs before a branch on the batch size (which
    the planner does not know: the head checks it on every call)."""

    def __init__(self):
        super().__init__()
        self.a, self.norm = conv(3, 4), nn.BatchNorm1d(4)

    def forward(self, x):
        y = self.a(x)
        v = self.norm(y.mean((2, 3)))
        return v * 2 if y.shape[0] > 2 else v


def test_a_new_branch_after_a_buffer_update_is_refused_not_run_twice():
    model = build(HeadNormThenBranch())
    smodel = fxstream.compile(model, tile_size=16)  # traced with the head in eval mode
    model.norm.train()
    before = model.norm.running_mean.clone()
    x = torch.randn(3, 3, 20, 20, dtype=torch.float64)  # traced at batch 1: the other branch
    with pytest.raises(fxstream.ContractError, match="update them twice"):
        smodel(x)
    assert not torch.equal(before, model.norm.running_mean)  # updated once, by the attempt
    model.norm.eval()
    smodel(x)  # the fix the message gives: once in eval mode
    check_streamed(model, x, 16, streamed=smodel)
    model.norm.train()
    with torch.no_grad():  # (gradients of conv biases before a training-mode norm are zero up to rounding)
        torch.testing.assert_close(smodel(x), model(x), rtol=1e-12, atol=1e-14)


class BatchBranchInTrunk(nn.Module):
    """A branch on the batch size of a map inside the trunk."""

    def __init__(self):
        super().__init__()
        self.a, self.b = conv(3, 4), conv(4, 2)

    def forward(self, x):
        y = self.a(x)
        if y.shape[0] > 2:
            y = y * 2
        return self.b(y)


def test_a_branch_on_the_batch_size_inside_the_trunk_is_rejected():
    """The planner plans spatial sizes only, and the head does not have the map: a guard that
    nothing checks would let a batch of 3 run the traced batch-1 branch silently."""
    with pytest.raises(fxstream.UnsupportedOpError, match="Python branch on .*y.shape\\[0\\] > 2"):
        fxstream.compile(build(BatchBranchInTrunk()), tile_size=16)


class _BranchyTrainNet(nn.Module):
    """Needs the concrete tracer (a Python branch on a size) and has training-mode state:
    BatchNorm running statistics and dropout."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        if x.shape[-1] % 2 == 0:  # plain torch.fx cannot trace this
            x = x * 1.0
        y = self.drop(torch.relu(self.bn(self.conv(x))))
        return self.head(y.mean((2, 3)))


def test_compile_leaves_no_trace_on_a_training_model():
    """Compiling (the concrete tracer and the trace check run the model on a probe) changes
    neither the model's buffers (BatchNorm statistics, num_batches_tracked) nor the global
    random state: found on smp PSPNet in training mode, whose statistics compile updated."""
    model = _BranchyTrainNet().train()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    fxstream.compile(model, tile_size=16, max_levels=None).program()
    assert torch.equal(torch.rand(3), expected)  # no draw from the global generator
    for key, value in model.state_dict().items():
        assert torch.equal(value, buffers[key]), key
