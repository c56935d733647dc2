"""Hooks on head modules that torch.fx traces through (an nn.Sequential, a user class, timm's
ClassifierHead) fire once, as on the plain model (docs/contract.md, fxstream/hooks.py).

Every model here streams its trunk over several tiles in float64; every check compares the
hooks' tensors, the output, every parameter gradient and the input gradient with the plain
model, which shares the compiled module's members (and so its hooks)."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn
from exactness import check_streamed, rel_err
from timm.layers import ClassifierHead

import fxstream

TILE = 12
SIZE = (29, 23)


class Block(nn.Module):
    """A user module inside the head (traced through)."""

    def __init__(self, features: int):
        super().__init__()
        self.fc = nn.Linear(features, features)

    def forward(self, x):
        return torch.tanh(self.fc(x)) + x


class Head(nn.Module):
    """A user head: pooling, a nested user block, a parameter read directly, a keyword argument."""

    def __init__(self, channels: int, classes: int):
        super().__init__()
        self.block = Block(channels)
        self.fc = nn.Linear(channels, classes)
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, classes))

    def forward(self, x, shift: float = 0.0):
        return self.fc(self.block(x.mean((2, 3)))) * self.gain + shift


class Net(nn.Module):
    """A two-convolution trunk and the given head."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.last = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.head = head

    def forward(self, x):
        return self.head(self.last(self.stem(x)))


HEADS = {
    "sequential": lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), Block(8), nn.Linear(8, 4)),
    "user": lambda: Head(8, 4),
    "timm": lambda: ClassifierHead(8, 4, pool_type="avg"),
}


def net(kind: str) -> Net:
    torch.manual_seed(0)
    return Net(HEADS[kind]()).double().eval()


def image(size=SIZE) -> torch.Tensor:
    return torch.randn(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def compiled(model: nn.Module) -> fxstream.StreamedModule:
    smodel = fxstream.compile(model, tile_size=TILE)
    assert len(smodel.shape_plan(*SIZE).tiles) >= 4
    return smodel


def _recorder(log: list):
    """Forward-pre, forward and full backward hooks that record clones of what they get."""
    clone = lambda ts: [t.detach().clone() for t in ts if isinstance(t, torch.Tensor)]  # noqa: E731
    return {
        "pre": lambda m, args: log.append(("pre", clone(args))),
        "forward": lambda m, args, out: log.append(("forward", clone(args) + clone([out]))),
        "backward": lambda m, grad_in, grad_out: log.append(("backward", clone(grad_in) + clone(grad_out))),
    }


def _register(module: nn.Module, hooks: dict) -> list:
    return [
        module.register_forward_pre_hook(hooks["pre"]),
        module.register_forward_hook(hooks["forward"]),
        module.register_full_backward_hook(hooks["backward"]),
    ]


def _run(model, x: torch.Tensor):
    x = x.clone().requires_grad_()
    out = model(x)
    out.square().sum().backward()
    return out.detach(), x.grad


def _same_logs(streamed: list, plain: list) -> None:
    assert [kind for kind, _ in streamed] == [kind for kind, _ in plain]
    for (_, tensors), (_, expected) in zip(streamed, plain):
        assert len(tensors) == len(expected)
        assert all(rel_err(a, b) < 1e-10 for a, b in zip(tensors, expected))


@pytest.mark.parametrize("kind", list(HEADS))
def test_hooks_fire_once_with_the_real_inputs_and_outputs(kind):
    model = net(kind)
    smodel = compiled(model)
    plain, streamed = [], []
    for log, runner in ((plain, model), (streamed, smodel)):
        handles = _register(model.head, _recorder(log))
        out, gx = _run(runner, image())
        for handle in handles:
            handle.remove()
        log.append(("result", [out, gx]))
    assert [kind for kind, _ in streamed] == ["pre", "forward", "backward", "result"]
    assert streamed[0][1][0].shape == (2, 8, 15, 12)  # the assembled trunk output
    _same_logs(streamed, plain)


def _scale_input(module, args):
    return (args[0] * 0.5 + 0.25,)


def _affine_output(module, args, out):
    return out * 2 - 1


def _scale_grad_input(module, grad_input, grad_output):
    return tuple(g * 3 if g is not None else None for g in grad_input)


@pytest.mark.parametrize("kind", list(HEADS))
@pytest.mark.parametrize(
    "register",
    [
        lambda m: m.register_forward_pre_hook(_scale_input),
        lambda m: m.register_forward_hook(_affine_output),
        lambda m: m.register_full_backward_hook(_scale_grad_input),
    ],
    ids=["pre-hook replaces input", "hook replaces output", "backward hook replaces grad"],
)
def test_hooks_that_change_values_change_them_as_on_the_plain_model(kind, register):
    model = net(kind)
    smodel = compiled(model)
    x = image()
    before = _run(model, x)
    handle = register(model.head)
    after = _run(model, x)
    assert max(rel_err(a, b) for a, b in zip(after, before)) > 1e-3  # the hook changes the output or gradient
    check_streamed(model, x, None, streamed=smodel, min_tiles=4)  # output, every gradient
    handle.remove()
    assert rel_err(smodel(x).detach(), before[0]) < 1e-10


class Pair(Head):
    """A head returning a tuple, both of whose items the model reads."""

    def forward(self, x, shift: float = 0.0):
        pooled = x.mean((2, 3))
        return self.fc(self.block(pooled)) * self.gain + shift, pooled


class KeywordNet(Net):
    """Calls its head with a keyword argument and reads both items of its output."""

    def forward(self, x):
        logits, pooled = self.head(self.last(self.stem(x)), shift=0.5)
        return logits + pooled.sum(1, keepdim=True)


def _triple_shift(module, args, kwargs):
    return args, {**kwargs, "shift": kwargs["shift"] * 3}


def _swap_pair(module, args, kwargs, out):
    assert kwargs == {"shift": 1.5}  # as the pre-hook left it
    return out[0] * 2, out[1] - 1


def test_keyword_arguments_and_tuple_outputs_reach_the_hooks():
    model = KeywordNet(Pair(8, 4)).double().eval()
    smodel = compiled(model)
    x = image()
    before = _run(model, x)
    handles = [
        model.head.register_forward_pre_hook(_triple_shift, with_kwargs=True),
        model.head.register_forward_hook(_swap_pair, with_kwargs=True),
    ]
    assert rel_err(_run(model, x)[0], before[0]) > 1e-3
    check_streamed(model, x, None, streamed=smodel, min_tiles=4)
    for handle in handles:
        handle.remove()
    assert rel_err(_run(smodel, x)[0], before[0]) < 1e-10


def test_a_hook_registered_after_the_first_call_fires_and_is_dropped_on_removal():
    model = net("user")
    smodel = compiled(model)
    x = image()
    expected = model(x).detach()
    assert rel_err(smodel(x).detach(), expected) < 1e-10
    assert "self.head(" not in smodel.code  # traced through: its nodes, no call
    log = []
    handle = model.head.register_forward_hook(lambda m, args, out: log.append(out.shape))
    assert rel_err(smodel(x).detach(), expected) < 1e-10
    assert log == [torch.Size([2, 4])] and "self.head(" in smodel.code
    handle.remove()
    smodel(x)
    assert log == [torch.Size([2, 4])] and "self.head(" not in smodel.code


def test_hooks_on_nested_head_modules_each_fire_once():
    model = net("user")
    smodel = compiled(model)
    plain, streamed = [], []
    for log, runner in ((plain, model), (streamed, smodel)):
        recorders = [_recorder(log), _recorder(log)]
        handles = _register(model.head, recorders[0]) + _register(model.head.block, recorders[1])
        log.append(("result", list(_run(runner, image()))))
        for handle in handles:
            handle.remove()
    assert [kind for kind, _ in streamed] == ["pre", "pre", "forward", "forward", "backward", "backward", "result"]
    _same_logs(streamed, plain)
    # the inner module alone: called for real inside the traced-through outer one
    handle = model.head.block.register_forward_hook(_affine_output)
    check_streamed(model, image(), None, streamed=smodel, min_tiles=4)
    assert "self.head.block(" in smodel.code
    handle.remove()


def test_hooks_on_an_in_place_head_module_fire_once():
    """fxstream rewrites ReLU(inplace=True) out of place; while hooked, the module itself runs."""
    model = Net(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 8), nn.ReLU(True), nn.Linear(8, 4)))
    model = model.double().eval()
    smodel = compiled(model)
    plain, streamed = [], []
    for log, runner in ((plain, model), (streamed, smodel)):
        handles = [model.head[3].register_forward_hook(_recorder(log)["forward"])]
        handles.append(model.head[3].register_forward_hook(_affine_output))
        log.append(("result", list(_run(runner, image()))))
        for handle in handles:
            handle.remove()
    assert [kind for kind, _ in streamed] == ["forward", "result"]
    _same_logs(streamed, plain)


@pytest.mark.parametrize("path", ["0", "1"], ids=["trunk-output module", "head module"])
def test_hooks_registered_before_compiling_are_not_traced_into_the_graph(path):
    """torch.fx runs the hooks of a module it traces through; fxstream traces its forward only,
    so the hook fires once per call (not also from the graph) and not at all once removed."""
    trunk = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2, padding=1))
    model = nn.Sequential(trunk, Head(8, 4)).double().eval()
    log: list = []
    handles = [
        model.get_submodule(path).register_forward_hook(_affine_output),
        model.get_submodule(path).register_forward_hook(lambda m, args, out: log.append(out.shape)),
    ]
    smodel = compiled(model)
    assert log == []  # neither traced nor run on the compile-time probe
    check_streamed(model, image(), None, streamed=smodel, min_tiles=4)
    assert len(log) == 2  # once for the plain model, once for the compiled one
    for handle in handles:
        handle.remove()
    check_streamed(model, image(), None, streamed=smodel, min_tiles=4)
    assert len(log) == 2


class Twice(nn.Module):
    """A head that calls its user block twice."""

    def __init__(self):
        super().__init__()
        self.block = Block(8)

    def forward(self, x):
        return self.block(self.block(x.mean((2, 3))))


class Leaky(Head):
    """A head that also hands an intermediate value out through a dict (a side channel)."""

    def forward(self, x, store: dict):
        store["pooled"] = x.mean((2, 3))
        return self.fc(store["pooled"])


class LeakyNet(Net):
    def forward(self, x):
        store: dict = {}
        return self.head(self.last(self.stem(x)), store).sum(1) + store["pooled"].sum(1)


@pytest.mark.parametrize(
    "model, path, problem",
    [
        (lambda: Net(Twice()), "head.block", "called 2 times"),
        (lambda: LeakyNet(Leaky(8, 4)), "head", "outside it, reads"),
    ],
    ids=["called twice", "value read outside"],
)
def test_hooks_on_an_unclean_call_are_rejected(model, path, problem):
    model = model().double().eval()
    smodel = compiled(model)
    handle = model.get_submodule(path).register_forward_hook(_affine_output)
    with pytest.raises(fxstream.UnsupportedOpError, match=problem) as info:
        smodel(image())  # registered after compile: detected on the next call
    assert info.value.module_path == path and f"module '{path}'" in str(info.value)
    assert "fix:" in str(info.value) and "torch.nn submodule" in str(info.value)
    with pytest.raises(fxstream.UnsupportedOpError, match=problem):
        fxstream.compile(model, tile_size=TILE)  # and at compile time
    handle.remove()
    check_streamed(model, image(), None, streamed=smodel, min_tiles=4)


def test_an_unclean_call_inside_a_hooked_module_fires_as_on_the_plain_model():
    model = Net(Twice()).double().eval()
    smodel = compiled(model)
    plain, streamed = [], []
    for log, runner in ((plain, model), (streamed, smodel)):
        handles = [model.head.block.register_forward_hook(_recorder(log)["forward"])]
        handles.append(model.head.register_forward_hook(_affine_output))  # calls head (and block) for real
        log.append(("result", list(_run(runner, image()))))
        for handle in handles:
            handle.remove()
    assert [kind for kind, _ in streamed] == ["forward", "forward", "result"]
    _same_logs(streamed, plain)


@pytest.mark.parametrize("kind", ["sequential", "user"])
def test_pickle_torch_save_and_deepcopy_keep_the_head_hooks(kind):
    model = net(kind)
    model.head.register_forward_hook(_affine_output)  # a module-level function pickles
    smodel = compiled(model)
    x = image()
    expected = smodel(x).detach()
    assert "self.head(" in smodel.code
    buffer = io.BytesIO()
    torch.save(smodel, buffer)
    buffer.seek(0)
    loaded = [pickle.loads(pickle.dumps(smodel)), torch.load(buffer, weights_only=False), copy.deepcopy(smodel)]
    for other in loaded:
        assert len(other.head._forward_hooks) == 1
        assert torch.equal(other(x).detach(), expected)
        check_streamed(other._source, x, None, streamed=other, min_tiles=4)
