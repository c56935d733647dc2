"""Mixed precision: the backward recomputation runs under the forward pass's autocast
state, so it reproduces the forward activations bit for bit; the streamed result is
close to the unstreamed autocast result; GradScaler works through train_step."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from exactness import RTOL64, rel_err
from tile_recorder import record_tiles

import fxstream

pytestmark = pytest.mark.usefixtures("schedule")

# bf16 keeps 8 significant bits (relative spacing 2**-8 = 3.9e-3). Streamed and
# whole-image convolutions sum in different orders, so an activation may round to the
# neighbouring bf16 value; after two layers and a mean, outputs and gradients differ by
# at most a few such steps relative to the largest entry. Measured: <= 4.2e-3 (5 seeds).
BF16_BOUND = 2e-2


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(F.relu(self.conv2(F.relu(self.conv1(x)))).mean((2, 3)))


def make():
    torch.manual_seed(0)
    return Net().eval()


def test_bf16_recomputation_equals_forward_bitwise():
    model = make()
    smodel = fxstream.compile(model, tile_size=10)
    n_tiles = len(smodel.shape_plan(30, 23).tiles)
    blocks = record_tiles(smodel, n_tiles)
    x = torch.randn(2, 3, 30, 23)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = smodel(x)
    out.float().sum().backward()  # outside the autocast block, as training loops do
    assert len(blocks["forward"]) == n_tiles >= 4 and len(blocks["backward"]) == n_tiles - 1
    for key, bwd in blocks["backward"].items():
        assert blocks["forward"][key].dtype == bwd.dtype == torch.bfloat16
        assert torch.equal(blocks["forward"][key], bwd)


def test_bf16_streamed_close_to_unstreamed_autocast():
    model = make()
    smodel = fxstream.compile(model, tile_size=10)
    x = torch.randn(2, 3, 30, 23)
    y = torch.tensor([1, 3])
    results = []
    for net in (model, smodel):
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
            loss = F.cross_entropy(out.float(), y)
        loss.backward()
        results.append((out.detach().float(), [p.grad.clone() for p in model.parameters()]))
    (ref_out, ref_grads), (out, grads) = results
    assert rel_err(out, ref_out) <= BF16_BOUND
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        assert rel_err(g, r) <= BF16_BOUND, name


def test_autocast_state_inside_backward_is_the_forward_state():
    """A forward outside autocast recomputes in full precision even when backward()
    is called inside an autocast block."""
    smodel = fxstream.compile(make(), tile_size=10)
    n_tiles = len(smodel.shape_plan(20, 20).tiles)
    blocks = record_tiles(smodel, n_tiles)
    out = smodel(torch.randn(1, 3, 20, 20))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out.sum().backward()
    assert len(blocks["backward"]) == n_tiles - 1 >= 1
    assert all(b.dtype == torch.float32 for b in blocks["backward"].values())
    assert all(torch.equal(blocks["forward"][k], b) for k, b in blocks["backward"].items())


def test_grad_scaler_train_step_float64_exact():
    """GradScaler on CPU: scaling by a power of two is exact, so the step equals the
    plain step in float64."""
    plain, model = make().double(), make().double()
    x = torch.randn(3, 3, 20, 17, dtype=torch.float64)
    y = torch.tensor([0, 1, 3])
    opt_plain = torch.optim.SGD(plain.parameters(), lr=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    smodel = fxstream.compile(model, tile_size=10)
    F.cross_entropy(plain(x), y).backward()
    opt_plain.step()
    fxstream.train_step(smodel, opt, F.cross_entropy, x, y, micro_batch_size=2, scaler=scaler)
    assert scaler.get_scale() == 2.0**12  # no inf/nan: the scale stays
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert rel_err(p.detach(), q.detach()) <= RTOL64, name


def test_grad_scaler_with_bf16_autocast_trains():
    model = make()
    smodel = fxstream.compile(model, tile_size=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x = torch.randn(4, 3, 20, 17)
    y = torch.tensor([0, 1, 2, 3])
    losses = []
    for _ in range(5):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fxstream.train_step(
                smodel, opt, lambda o, t: F.cross_entropy(o.float(), t), x, y, micro_batch_size=2, scaler=scaler
            )
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
