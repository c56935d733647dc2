"""The compiled module stays the model (docs/contract.md): it computes with the model's
current members, fires hooks by one rule, pickles, and raises FxStreamErrors."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn
from exactness import check_streamed, rel_err
from zoo import _randomise

import fxstream


class Net(nn.Module):
    """Trunk: stem (conv-BN-ReLU), a ReLU module used twice, conv c, conv last.
    Head: global pool, Linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.relu = nn.ReLU()
        self.c = nn.Conv2d(6, 6, 3, padding=1)
        self.last = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.relu(self.stem(x))
        y = self.relu(self.c(y)) + y
        return self.fc(torch.flatten(self.pool(self.last(y)), 1))


class Features(nn.Module):
    """VGG-like: the whole trunk is one Sequential that starts at the image."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 5, 3, stride=2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))

    def forward(self, x):
        return self.head(self.features(x))


def net() -> Net:
    return _randomise(Net()).double().eval()


def image(seed: int = 0, size=(29, 23)) -> torch.Tensor:
    return torch.randn(2, 3, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def new_like(t: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(t.shape, dtype=t.dtype, generator=torch.Generator().manual_seed(seed))


# --- 1. live state ----------------------------------------------------------------------


def test_parameter_reassigned_on_the_model_after_a_call():
    model = net()
    smodel = fxstream.compile(model, tile_size=12)
    check_streamed(model, image(), None, streamed=smodel, min_tiles=4)
    old = model.c.weight
    model.c.weight = nn.Parameter(new_like(old, 1))
    check_streamed(model, image(1), None, streamed=smodel, min_tiles=4)
    smodel.zero_grad(set_to_none=True)
    smodel(image()).sum().backward()
    assert old.grad is None and model.c.weight.grad is not None  # the gradient lands in the live parameter
    streamed = model.c.weight.grad.clone()
    model.zero_grad()
    model(image()).sum().backward()
    assert rel_err(streamed, model.c.weight.grad) < 1e-10


def test_parameter_reassigned_on_the_compiled_module():
    model = net()
    smodel = fxstream.compile(model, tile_size=12)
    smodel(image())
    smodel.last.bias = nn.Parameter(new_like(model.last.bias, 2))
    smodel.fc.weight = nn.Parameter(new_like(model.fc.weight, 3))  # head member
    assert model.last.bias is smodel.last.bias
    check_streamed(model, image(), None, streamed=smodel, min_tiles=4)


def test_load_state_dict_with_assign():
    model = net()
    smodel = fxstream.compile(model, tile_size=12)
    smodel(image())
    other = _randomise(Net(), seed=5).double().eval()
    sd = {k: v.clone() for k, v in other.state_dict().items()}
    model.load_state_dict(sd, assign=True)
    assert model.stem[1].running_mean is sd["stem.1.running_mean"]
    check_streamed(model, image(), None, streamed=smodel, min_tiles=4)
    assert rel_err(smodel(image()).detach(), other(image()).detach()) < 1e-10


def test_functional_call_as_the_first_call_and_after():
    model = net()
    smodel = fxstream.compile(model, tile_size=12)
    x = image()
    for step in range(2):  # the first call builds the generated modules under functional_call
        params = {k: new_like(v, 10 + i + step).requires_grad_() for i, (k, v) in enumerate(model.named_parameters())}
        out = torch.func.functional_call(smodel, params, (x,))
        ref = torch.func.functional_call(model, params, (x,))
        assert rel_err(out.detach(), ref.detach()) < 1e-10
        g_out = torch.autograd.grad(out.square().sum(), list(params.values()))
        g_ref = torch.autograd.grad(ref.square().sum(), list(params.values()))
        for name, a, b in zip(params, g_out, g_ref):
            assert rel_err(a, b) < 1e-10, name
    check_streamed(model, x, None, streamed=smodel, min_tiles=4)  # back on the model's own parameters


def test_submodule_replaced_on_either_object_recompiles():
    model = net()
    smodel = fxstream.compile(model, tile_size=12)
    smodel(image())
    model.c = nn.Sequential(nn.Conv2d(6, 6, 5, padding=2), nn.Tanh()).double()
    check_streamed(model, image(), None, streamed=smodel, min_tiles=4)
    smodel.c = nn.Identity()
    assert isinstance(model.c, nn.Identity)
    check_streamed(model, image(1), None, streamed=smodel, min_tiles=4)


def test_parameter_of_another_shape_recompiles():
    model = net()
    smodel = fxstream.compile(model, tile_size=14)
    smodel(image())
    before = smodel.plan.receptive_field
    model.last.weight = nn.Parameter(new_like(torch.empty(8, 6, 5, 5, dtype=torch.float64), 4))  # 3x3 -> 5x5
    check_streamed(model, image(), None, streamed=smodel, min_tiles=4)
    assert smodel.plan.receptive_field == tuple(r + 2 for r in before)


def test_buffers_moved_by_dtype_conversion_are_followed():
    model = net().float()
    smodel = fxstream.compile(model, tile_size=12)
    smodel(image().float())
    smodel.double()  # BatchNorm buffers are replaced by new tensors
    check_streamed(model, image(), None, streamed=smodel, min_tiles=4)


# --- 2. hooks ---------------------------------------------------------------------------


def _record(log: list):
    def forward_hook(module, args, output):
        log.append(("forward", [a.detach().clone() for a in args], output.detach().clone()))

    def backward_hook(module, grad_input, grad_output):
        log.append(("backward", [g.clone() for g in grad_input if g is not None], grad_output[0].clone()))

    return forward_hook, backward_hook


def _hooked_run(model, module, x):
    log: list = []
    forward_hook, backward_hook = _record(log)
    handles = [module.register_forward_hook(forward_hook), module.register_full_backward_hook(backward_hook)]
    x = x.clone().requires_grad_()
    out = model(x)
    out.square().sum().backward()
    for h in handles:
        h.remove()
    return log, out.detach(), x.grad


def test_trunk_output_hooks_fire_once_with_the_assembled_tensors():
    """Grad-CAM on the last convolution: its activation and the gradient at it."""
    model = net()
    smodel = fxstream.compile(model, tile_size=12)
    assert len(smodel.shape_plan(29, 23).tiles) >= 4
    x = image()
    plain, out_ref, _ = _hooked_run(model, model.last, x)
    streamed, out, _ = _hooked_run(smodel, smodel.last, x)  # registered after compile
    assert [e[0] for e in streamed] == ["forward", "backward"]
    assert streamed[0][1] == []  # the input of `last` is inside the trunk: never whole
    assert rel_err(streamed[0][2], plain[0][2]) < 1e-10  # activation
    assert streamed[1][1] == []  # grad_input=()
    assert rel_err(streamed[1][2], plain[1][2]) < 1e-10  # gradient at the activation
    assert rel_err(out, out_ref) < 1e-10


def test_trunk_output_hook_may_replace_the_output():
    model = net()
    smodel = fxstream.compile(model, tile_size=12)
    handle = model.last.register_forward_hook(lambda m, args, out: out * 2 - 1)
    fxstream.compile(model, tile_size=12)  # allowed at compile time too
    x = image()
    assert rel_err(smodel(x).detach(), model(x).detach()) < 1e-10
    check_streamed(model, x, None, streamed=smodel, min_tiles=4)
    handle.remove()


def test_trunk_module_starting_at_the_image_gets_its_input():
    model = Features().double().eval()
    smodel = fxstream.compile(model, tile_size=11)
    x = image(size=(27, 22))
    scale = model.features.register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))
    plain, out_ref, gx_ref = _hooked_run(model, model.features, x)
    streamed, out, gx = _hooked_run(smodel, model.features, x)
    assert [e[0] for e in streamed] == ["forward", "backward"]
    assert rel_err(out, out_ref) < 1e-10 and rel_err(gx, gx_ref) < 1e-10
    for (_, args, value), (_, args_ref, value_ref) in zip(streamed, plain):
        assert len(args) == len(args_ref) == 1
        assert rel_err(args[0], args_ref[0]) < 1e-10 and rel_err(value, value_ref) < 1e-10
    scale.remove()


def test_head_hooks_fire_once_as_usual():
    model = net()
    smodel = fxstream.compile(model, tile_size=12)
    x = image()
    plain, _, _ = _hooked_run(model, model.fc, x)
    streamed, _, _ = _hooked_run(smodel, smodel.fc, x)
    assert [e[0] for e in streamed] == ["forward", "backward"]
    for a, b in zip(streamed, plain):
        assert rel_err(a[1][0], b[1][0]) < 1e-10 and rel_err(a[2], b[2]) < 1e-10


@pytest.mark.parametrize("path", ["c", "stem", "stem.2", "relu"])
def test_hooks_inside_the_trunk_are_rejected(path):
    model = net()
    smodel = fxstream.compile(model, tile_size=12)
    handle = model.get_submodule(path).register_forward_hook(lambda *args: None)
    with pytest.raises(fxstream.UnsupportedOpError, match=f"module '{path}'") as info:
        smodel(image())  # registered after compile: detected on the next call
    assert "boundary=" in str(info.value) and info.value.module_path == path
    with pytest.raises(fxstream.UnsupportedOpError, match=f"module '{path}'"):
        fxstream.compile(model, tile_size=12)  # and at compile time
    handle.remove()
    check_streamed(model, image(), None, streamed=smodel, min_tiles=4)


def test_forward_pre_hook_on_an_output_module_without_its_input_is_rejected():
    model = net()
    model.last.register_forward_pre_hook(lambda m, args: None)
    with pytest.raises(fxstream.UnsupportedOpError, match="forward-pre hook"):
        fxstream.compile(model, tile_size=12)


def test_global_hooks_and_hooks_on_the_original_object_are_rejected():
    model = net()
    smodel = fxstream.compile(model, tile_size=12)
    handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        with pytest.raises(fxstream.UnsupportedOpError, match="global module hook"):
            smodel(image())
    finally:
        handle.remove()
    handle = model.register_forward_hook(lambda *args: None)
    with pytest.raises(fxstream.UnsupportedOpError, match="compiled module"):
        smodel(image())
    handle.remove()
    log = []
    smodel.register_forward_hook(lambda m, args, out: log.append(out.shape))  # the compiled module's own hooks
    smodel(image())
    assert log == [torch.Size([2, 4])]


def test_hooks_on_a_traced_through_head_module_fire_once():
    """The nn.Sequential head is called for real while it has hooks (tests/test_head_hooks.py)."""
    model = Features().double().eval()
    smodel = fxstream.compile(model, tile_size=11)
    x = image(size=(27, 22))
    plain, out_ref, gx_ref = _hooked_run(model, model.head, x)
    streamed, out, gx = _hooked_run(smodel, model.head, x)
    assert [e[0] for e in streamed] == ["forward", "backward"]
    assert rel_err(out, out_ref) < 1e-10 and rel_err(gx, gx_ref) < 1e-10
    for (_, args, value), (_, args_ref, value_ref) in zip(streamed, plain):
        assert len(args) == len(args_ref) == 1
        assert rel_err(args[0], args_ref[0]) < 1e-10 and rel_err(value, value_ref) < 1e-10


# --- 3. saving --------------------------------------------------------------------------


def test_pickle_torch_save_and_deepcopy_round_trip():
    model = net()
    smodel = fxstream.compile(model, tile_size=12)
    x = image()
    expected = smodel(x).detach()
    buffer = io.BytesIO()
    torch.save(smodel, buffer)
    buffer.seek(0)
    loaded = [pickle.loads(pickle.dumps(smodel)), torch.load(buffer, weights_only=False), copy.deepcopy(smodel)]
    for other in loaded:
        assert isinstance(other, fxstream.StreamedModule)
        assert torch.equal(other(x).detach(), expected)
        assert all(a is not b for a, b in zip(other.parameters(), model.parameters()))
        source = other._source
        assert other.c is source.c  # still one set of members
        check_streamed(source, x, None, streamed=other, min_tiles=4)
    copied = loaded[-1]
    copied.c.weight.data.zero_()
    assert torch.equal(smodel(x).detach(), expected)  # the original is untouched


# --- 4. one error policy ----------------------------------------------------------------


def test_compile_argument_errors():
    with pytest.raises(fxstream.BoundaryError, match="string"):
        fxstream.compile(net(), tile_size=12, boundary=3)
    with pytest.raises(fxstream.ArgumentError, match="memory_budget"):
        fxstream.compile(net(), tile_size=12, memory_budget="1GiB")
    with pytest.raises(fxstream.ArgumentError, match="input_shape"):
        fxstream.compile(net(), tile_size=12, input_shape=(1, 3, 64, 64))
    with pytest.raises(fxstream.ArgumentError, match="output_device"):
        fxstream.compile(net(), tile_size=12, output_device="nowhere")
    with pytest.raises(fxstream.ArgumentError, match="already compiled"):
        fxstream.compile(fxstream.compile(net(), tile_size=12), tile_size=12)


def test_training_argument_errors():
    smodel = fxstream.compile(net(), tile_size=12)
    loss = lambda out, y: out.sum()  # noqa: E731
    with pytest.raises(fxstream.ArgumentError, match="micro_batch_size"):
        fxstream.serial_backward(smodel, loss, image(), None, micro_batch_size=0)
    with pytest.raises(fxstream.ArgumentError, match="one fxstream trunk"):
        pair = nn.ModuleList([smodel, fxstream.compile(net(), tile_size=12)])
        fxstream.serial_backward(pair, loss, image(), None, whole_batch_head=True)


def test_user_error_layout():
    model = net()
    node = next(n for n in fxstream.trace(model).graph.nodes if n.name == "c")
    error = fxstream.errors.user_error(
        fxstream.UnsupportedOpError, "cannot stream it: a reason", node=node, fix="do this", op="Conv2d"
    )
    lines = str(error).splitlines()
    assert lines[0] == "cannot stream it: a reason"
    assert lines[1].startswith("  node 'c'") and lines[2] == "  in module 'c'"
    assert lines[3].startswith("  at ") and lines[3].endswith("y = self.relu(self.c(y)) + y")  # the model's line
    assert lines[-1] == "  fix: do this"
    assert (error.node, error.module_path, error.op) == ("c", "c", "Conv2d")


# --- 5. autograd contracts --------------------------------------------------------------


def test_double_backward_raises():
    model = net()
    smodel = fxstream.compile(model, tile_size=12)
    out = smodel(image().requires_grad_())
    # ContractError here; the executor restructure raises its own DoubleBackwardError: both say create_graph
    with pytest.raises(fxstream.FxStreamError, match="create_graph"):
        torch.autograd.grad(out.square().sum(), list(model.parameters()), create_graph=True, allow_unused=True)


def test_torch_func_transforms_raise():
    model = net()
    smodel = fxstream.compile(model, tile_size=12)
    params = dict(model.named_parameters())
    with pytest.raises(fxstream.ContractError, match="torch.func"):
        torch.func.grad(lambda p: torch.func.functional_call(smodel, p, (image(),)).sum())(params)


# --- 6. torch.compile -------------------------------------------------------------------


def test_torch_compile_runs_the_trunk_eagerly_and_is_exact():
    torch._dynamo.reset()
    model = _randomise(Net()).eval()
    smodel = fxstream.compile(model, tile_size=12)
    compiled = torch.compile(smodel, backend="aot_eager")
    x = torch.randn(2, 3, 29, 23)
    for _ in range(2):
        out = compiled(x)
        out.square().sum().backward()
        streamed = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        ref = model(x)
        ref.square().sum().backward()
        assert rel_err(out.detach(), ref.detach()) < 1e-5
        for (name, p), g in zip(model.named_parameters(), streamed):
            assert rel_err(g, p.grad) < 1e-4, name
        model.zero_grad()


def test_mode_switches_reuse_the_compiled_programs():
    model = Features().double().eval()
    smodel = fxstream.compile(model, tile_size=11)
    first = smodel.program()
    smodel.train()
    assert smodel.program() is not first
    smodel.eval()
    assert smodel.program() is first
