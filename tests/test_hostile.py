"""Issue 19, "no silent wrong answer anywhere": a hostile user's cases, each of which
failed before its fix (slides: test_hostile_slides.py; tile groups: test_hostile_group.py).

1. the image changed between the forward and the backward pass (numpy buffer, memmap);
3. the original model's ``training`` flag follows ``smodel.train()``/``.eval()``;
4. timm's ``DropPath`` (``x.new_empty(shape).bernoulli_(keep)``) streams in a train-mode
   trunk, equal to the plain model under the same seed;
5. absurd input shapes are refused in seconds, not planned forever;
8. batched gradients (``is_grads_batched``, ``jacobian(vectorize=True)``) raise ContractError;
10. ``compile`` validates ``input_transform`` and ``output_device``;
11. ``serial_backward`` checks the target count first, and a failed step leaves ``.grad``;
12. a ``uint8`` image without ``Normalize`` is refused before the first tile; a failing
    tile leaves no progress bar behind;
13. torch.fx prints nothing to stderr when a tile fails;
14. the CLI's model-spec errors;
and the safe way to save a compiled module.
"""

from __future__ import annotations

import io
import pickle
import time
import traceback

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from exactness import RTOL64, rel_err

import fxstream
from fxstream.cli import main as cli_main

SIZE = (30, 26)


def net() -> nn.Module:
    """A float64 CNN with a stride: 12-pixel tiles cut a 30 x 26 image into several."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(4, 2, 3, padding=1),
    ).double()


def pixels(seed: int, dtype=np.float64) -> np.ndarray:
    return np.random.default_rng(seed).random((1, 3, *SIZE)).astype(dtype)


def param_grads(smodel, x, seed=3, retain_graph=False):
    """The output and parameter gradients of ``smodel(x)`` for a fixed output gradient."""
    out = smodel(x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return out, torch.autograd.grad(out, list(smodel.parameters()), grad, retain_graph=retain_graph)


# --- 1. the image changed between the forward and the backward pass ------------------------


def test_numpy_buffer_refilled_between_forward_and_backward_raises():
    """A loader refilling the buffer after the forward pass: the backward pass would read the
    new pixels (gradients of neither image). It raises InputChangedError instead."""
    smodel = fxstream.compile(net(), tile_size=12)
    assert smodel.shape_plan(*SIZE).num_tiles > 1
    buffer = pixels(0)
    out = smodel(buffer)
    buffer[...] = pixels(1)
    with pytest.raises(fxstream.InputChangedError, match="changed between the forward and the backward pass") as info:
        out.sum().backward()
    message = str(info.value)
    assert isinstance(info.value, fxstream.ContractError) and "fix:" in message and "ndarray" in message
    assert all(p.grad is None for p in smodel.parameters())


def test_unchanged_numpy_buffer_gives_the_tensor_gradients_twice():
    """The check never fires on an unchanged image, also in a second backward pass
    (retain_graph=True, which reads every tile again)."""
    smodel = fxstream.compile(net(), tile_size=12)
    buffer = pixels(0)
    ref_out, ref_grads = param_grads(smodel, torch.from_numpy(buffer.copy()))
    out = smodel(buffer)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    for _ in range(2):
        grads = torch.autograd.grad(out, list(smodel.parameters()), grad, retain_graph=True)
        assert rel_err(out.detach(), ref_out.detach()) <= RTOL64
        assert max(rel_err(a, b) for a, b in zip(grads, ref_grads)) <= RTOL64


def test_memmap_rewritten_between_forward_and_backward_raises(tmp_path):
    path = tmp_path / "image.npy"
    np.save(path, pixels(0))
    smodel = fxstream.compile(net(), tile_size=12)
    out = smodel(np.load(path, mmap_mode="r"))
    writer = np.load(path, mmap_mode="r+")
    writer[:, :, 20:] = 0.5  # only the last tile rows change
    writer.flush()
    with pytest.raises(fxstream.InputChangedError, match=r"region \[\d+, \d+\) x \[\d+, \d+\)"):
        out.sum().backward()


# --- 3. the original model's training flag ------------------------------------------------------


class Branchy(nn.Module):
    """A model whose own forward branches on ``self.training``."""

    def __init__(self):
        super().__init__()
        self.body = net()

    def forward(self, x):
        y = self.body(x).mean((2, 3))
        return y * 2.0 if self.training else y


def test_original_model_training_flag_follows_the_compiled_module():
    model = Branchy()
    smodel = fxstream.compile(model, tile_size=12)
    x = torch.from_numpy(pixels(0))
    smodel.train()
    smodel(x)
    smodel.eval()
    assert model.training is False and not any(m.training for m in model.modules())
    eval_out = model(x)
    assert torch.equal(eval_out, model.body(x).mean((2, 3)))  # the plain model runs its eval branch
    assert rel_err(smodel(x), eval_out) <= RTOL64
    smodel.train()
    assert model.training is True
    model.eval()  # and the other way: the compiled module follows the original's own flag
    assert smodel.training is False
    assert rel_err(smodel(x), eval_out) <= RTOL64


# --- 4. timm's DropPath in a training-mode trunk ---------------------------------------------


class DropPathNet(nn.Module):
    """Residual blocks with timm's own DropPath (``x.new_empty(shape).bernoulli_(keep)``)."""

    def __init__(self):
        super().__init__()
        from timm.layers import DropPath

        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block1 = nn.Conv2d(4, 4, 3, padding=1)
        self.drop1 = DropPath(0.4)
        self.down = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.block2 = nn.Conv2d(6, 6, 3, padding=1)
        self.drop2 = DropPath(0.5)
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        y = self.stem(x)
        y = y + self.drop1(torch.tanh(self.block1(y)))
        y = self.down(y)
        y = y + self.drop2(torch.tanh(self.block2(y)))
        return self.fc(y.mean((2, 3)))


def _seeded_run(model, x, seed):
    """Output, input and parameter gradients and the next draw, from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    x = x.detach().clone().requires_grad_(True)
    out = model(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *model.parameters()])
    return out.detach(), grads, torch.rand(3)


@pytest.mark.parametrize("schedule", ["carry", "recompute"])
def test_timm_drop_path_streams_and_equals_the_plain_model(schedule):
    pytest.importorskip("timm")
    torch.manual_seed(0)
    model = DropPathNet().double().train()
    smodel = fxstream.compile(model, tile_size=12, schedule=schedule)
    x = torch.randn(6, 3, 29, 23, dtype=torch.float64)
    assert smodel.shape_plan(29, 23).num_tiles > 1
    for seed in range(3):
        out, grads, after = _seeded_run(model, x, seed)
        s_out, s_grads, s_after = _seeded_run(smodel, x, seed)
        assert rel_err(s_out, out) <= RTOL64
        assert max(rel_err(a, b) for a, b in zip(s_grads, grads)) <= RTOL64
        assert torch.equal(s_after, after)  # the generator advanced as in the plain pass
        assert not torch.allclose(out, model.eval()(x))  # some path was dropped
        model.train()
    # other tile sizes (other tilings) compute the same function
    other = fxstream.compile(model, tile_size=20, schedule=schedule)
    assert rel_err(_seeded_run(other, x, 0)[0], _seeded_run(model, x, 0)[0]) <= RTOL64


def test_convnext_atto_with_drop_path_compiles_in_train_mode():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("convnext_atto", pretrained=False, drop_path_rate=0.1, num_classes=3)
    model = model.double().train()
    smodel = fxstream.compile(model, tile_size=160)
    x = torch.randn(2, 3, 96, 64, dtype=torch.float64)
    out, grads, after = _seeded_run(model, x, 5)
    s_out, s_grads, s_after = _seeded_run(smodel, x, 5)
    assert rel_err(s_out, out) <= RTOL64 and torch.equal(s_after, after)
    assert max(rel_err(a, b) for a, b in zip(s_grads, grads)) <= RTOL64


# --- 5. absurd shapes ---------------------------------------------------------------------------


def test_absurd_shapes_are_refused_in_seconds(capsys):
    torchvision = pytest.importorskip("torchvision")
    smodel = fxstream.compile(torchvision.models.resnet18().eval(), tile_size=512)
    start = time.perf_counter()
    with pytest.raises(fxstream.TileSizeError, match=r"(?s)tiles.*fix:") as info:
        smodel.shape_plan(10**9, 10**9)
    assert "1000000000x1000000000" in str(info.value)
    assert time.perf_counter() - start < 5
    start = time.perf_counter()
    code = cli_main(["plan", "resnet18", "--input-shape", "1,3,99999999999999999999,256", "--tile-size", "512"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fxstream plan: error:") and "tiles" in err and err.count("\n") == 1, err
    assert time.perf_counter() - start < 20  # mostly building resnet18
    assert smodel.shape_plan(5000, 3000).num_tiles > 1  # ordinary sizes still plan


# --- 8. batched gradients ------------------------------------------------------------------------


def test_batched_gradients_raise_contract_error():
    smodel = fxstream.compile(net(), tile_size=12)
    x = torch.from_numpy(pixels(0)).requires_grad_(True)
    out = smodel(x)
    batched = torch.randn(3, *out.shape, dtype=out.dtype)
    with pytest.raises(fxstream.ContractError, match=r"(?s)is_grads_batched.*fix:"):
        torch.autograd.grad(out, x, batched, is_grads_batched=True, retain_graph=True)
    pooled = lambda t: smodel(t).mean((2, 3))  # noqa: E731
    with pytest.raises(fxstream.ContractError, match="vectorize"):
        torch.autograd.functional.jacobian(pooled, x, vectorize=True)
    # the fix it names: one backward pass per row
    plain = lambda t: smodel._source(t).mean((2, 3))  # noqa: E731
    jac = torch.autograd.functional.jacobian(pooled, x)
    assert rel_err(jac, torch.autograd.functional.jacobian(plain, x)) <= RTOL64


# --- 10. compile validates its arguments ------------------------------------------------------------


def test_compile_validates_input_transform_and_output_device():
    with pytest.raises(fxstream.ArgumentError, match=r"input_transform.*transform\(tile, dtype\)"):
        fxstream.compile(net(), tile_size=12, input_transform=lambda tile: tile)
    if torch.cuda.device_count() <= 3:
        with pytest.raises(fxstream.ArgumentError, match=r"output_device=3.*cuda:3"):
            fxstream.compile(net(), tile_size=12, output_device=3)
    with pytest.raises(fxstream.ArgumentError, match="output_device='meta'"):
        fxstream.compile(net(), tile_size=12, output_device="meta")
    # what is valid still compiles, and runs
    x = torch.from_numpy(pixels(0))
    for transform in (fxstream.Normalize(), lambda tile, dtype: tile, lambda tile, dtype=None, *rest: tile):
        smodel = fxstream.compile(net(), tile_size=12, input_transform=transform, output_device="cpu")
        assert rel_err(smodel(x), smodel._source(x)) <= RTOL64


# --- 11. serial_backward: targets first, and a failed step leaves .grad ------------------------------


def _with_grads(smodel):
    for i, p in enumerate(smodel.parameters()):
        p.grad = None if i == 0 else torch.full_like(p, float(i))
    return [None if p.grad is None else p.grad.clone() for p in smodel.parameters()]


def _grads_unchanged(smodel, before) -> bool:
    return all(
        (b is None and p.grad is None) or (b is not None and p.grad is not None and torch.equal(p.grad, b))
        for p, b in zip(smodel.parameters(), before)
    )


def test_serial_backward_checks_the_target_count_first():
    smodel = fxstream.compile(net(), tile_size=12)
    before = _with_grads(smodel)
    images = torch.from_numpy(np.concatenate([pixels(i) for i in range(4)]))
    loss = lambda out, y: F.mse_loss(out.mean((2, 3)), y)  # noqa: E731
    with pytest.raises(fxstream.ArgumentError, match="4 images.*3 targets"):
        fxstream.serial_backward(smodel, loss, images, torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(fxstream.ArgumentError, match="2 micro-batches.*3 targets"):
        fxstream.serial_backward(smodel, loss, [images[:2], images[2:]], torch.zeros(3, 2, dtype=torch.float64))
    assert _grads_unchanged(smodel, before)


def test_a_failed_step_leaves_grad_as_it_was():
    smodel = fxstream.compile(net(), tile_size=12)
    before = _with_grads(smodel)
    calls = []

    def loss(out, y):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the loss failed on the third micro-batch")
        return out.sum()

    images = torch.from_numpy(np.concatenate([pixels(i) for i in range(4)]))
    with pytest.raises(RuntimeError, match="third micro-batch"):
        fxstream.serial_backward(smodel, loss, images, None)
    assert len(calls) == 3 and _grads_unchanged(smodel, before)


# --- 12. uint8 without Normalize; the progress bar after a failing tile ------------------------------


class Recording:
    """A numpy-backed array-like that records the regions it is read with."""

    def __init__(self, array: np.ndarray):
        self.array, self.shape, self.dtype = array, array.shape, array.dtype
        self.reads: list = []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.array[key]


def test_uint8_without_normalize_is_refused_before_the_first_tile(capfd):
    pytest.importorskip("tqdm")
    smodel = fxstream.compile(net(), tile_size=12, progress=True)
    raw = (pixels(0) * 255).astype(np.uint8)
    for image in (torch.from_numpy(raw), Recording(raw)):
        with pytest.raises(fxstream.InputShapeError, match=r"(?s)uint8.*fxstream\.Normalize") as info:
            smodel(image)
        assert "fix:" in str(info.value)
    assert image.reads == [] and capfd.readouterr().err == ""  # no pixel read, no bar started
    # the fix it names
    normalized = fxstream.compile(net(), tile_size=12, input_transform=fxstream.Normalize(scale=1 / 255))
    assert rel_err(normalized(raw), smodel._source(torch.from_numpy(raw).double() / 255)) <= RTOL64


class ScalesItself(nn.Module):
    """A model whose forward converts a uint8 image itself: uint8 input is its contract."""

    def __init__(self):
        super().__init__()
        self.body = net()

    def forward(self, x):
        return self.body(x.double() / 255)


def test_uint8_into_a_model_that_converts_it_still_streams():
    model = ScalesItself()
    smodel = fxstream.compile(model, tile_size=12)
    raw = torch.from_numpy((pixels(0) * 255).astype(np.uint8))
    assert rel_err(smodel(raw), model(raw)) <= RTOL64


def test_a_failing_tile_leaves_no_progress_bar_behind(capfd):
    pytest.importorskip("tqdm")
    smodel = fxstream.compile(net(), tile_size=12, progress=True)
    with pytest.raises(RuntimeError, match="should be the same") as info:
        smodel(torch.from_numpy(pixels(0, np.float32)))  # float32 into a float64 model: as the plain model
    err = capfd.readouterr().err  # while the error (and its traceback) is alive, as when it is printed
    assert "fxstream forward" in err and err.split("\r")[-1].strip() == "", repr(err[-200:])
    assert info.value.__traceback__ is not None


# --- 13. torch.fx prints nothing on an error inside a tile -------------------------------------------


def test_fx_prints_nothing_when_a_tile_fails(capfd):
    smodel = fxstream.compile(net(), tile_size=12)
    with pytest.raises(RuntimeError, match="should be the same") as info:
        smodel(torch.from_numpy(pixels(0, np.float32)))
    assert capfd.readouterr().err == ""
    frames = traceback.extract_tb(info.value.__traceback__)
    assert any("eval_with_key" in frame.filename for frame in frames)  # the tile code's line is in the traceback


# --- 14. the CLI's model specs ---------------------------------------------------------------------


def _plan(capsys, spec: str) -> tuple[int, str]:
    code = cli_main(["plan", spec, "--input-shape", "1,3,64,64", "--tile-size", "32"])
    return code, capsys.readouterr().err


def test_cli_model_spec_errors(capsys, tmp_path):
    code, err = _plan(capsys, "resnet18(num_classes=ten)")
    assert code == 2 and "num_classes=ten" in err and "<ast." not in err, err
    code, err = _plan(capsys, ":")
    assert code == 2 and "model spec ':'" in err and "Empty module name" not in err, err
    path = tmp_path / "exits.py"
    path.write_text("import sys\n\ndef build():\n    sys.exit(0)\n")
    code, err = _plan(capsys, f"{path}:build")
    assert code == 2 and "sys.exit(0)" in err, err
    path = tmp_path / "exits_on_import.py"
    path.write_text("import sys\nsys.exit(3)\n")
    code, err = _plan(capsys, f"{path}:build")
    assert code == 2 and "sys.exit(3)" in err, err


# --- saving -----------------------------------------------------------------------------------------


def test_safe_save_path_state_dict_then_compile_again():
    """docs/contract.md: save the weights, compile again on load; torch.load with
    weights_only=True (no code is unpickled) then suffices."""
    smodel = fxstream.compile(net(), tile_size=12)
    with torch.no_grad():
        for p in smodel.parameters():
            p.add_(0.25)
    buffer = io.BytesIO()
    torch.save(smodel.state_dict(), buffer)
    buffer.seek(0)
    loaded = fxstream.compile(net(), tile_size=12)
    loaded.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.from_numpy(pixels(0))
    assert torch.equal(loaded(x), smodel(x))


def test_whole_module_weights_only_load_names_what_to_register(tmp_path):
    """A whole compiled module loads with weights_only=True once the model's own classes
    are allowed; fxstream registers its own."""
    transform = fxstream.Normalize((0.5, 0.4, 0.3), (0.2, 0.3, 0.25), scale=1 / 255)
    smodel = fxstream.compile(net(), tile_size=12, input_transform=transform, output_device="cpu", schedule="recompute")
    path = tmp_path / "smodel.pt"
    torch.save(smodel, path)
    with pytest.raises(pickle.UnpicklingError, match="Conv2d"):  # the model's classes are the caller's to allow
        torch.load(path, weights_only=True)
    model_classes = [nn.Sequential, nn.Conv2d, nn.ReLU, nn.Tanh]
    with torch.serialization.safe_globals(model_classes):
        loaded = torch.load(path, weights_only=True)
    x = torch.from_numpy((pixels(0) * 255).astype(np.uint8))
    assert isinstance(loaded, fxstream.StreamedModule) and torch.equal(loaded(x), smodel(x))
    assert loaded.schedule.kind == "recompute" and loaded.streamed_trunk.output_device == torch.device("cpu")
