"""Serial mini-batch training: a batch processed a few images at a time, with the
gradients of the whole batch.

``serial_backward`` runs forward and backward per micro-batch and accumulates into
``.grad``; streaming bounds the memory of one image, and the serial loop keeps the batch
size from multiplying it. Under ``DistributedDataParallel`` the micro-batches before the
last run under ``no_sync()``, so gradients are all-reduced once per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn as nn

from .errors import ArgumentError, user_error
from .io import arrays
from .module import StreamedModule

Batch = torch.Tensor | Any | Sequence[torch.Tensor | Any]  # a tensor or an array-like, or a sequence of them


def serial_backward(
    model: nn.Module,
    loss_fn: Callable,
    inputs: Batch,
    targets,
    micro_batch_size: int = 1,
    *,
    reduction: str = "mean",
    whole_batch_head: bool = False,
    scaler=None,
    verbose: bool = False,
) -> torch.Tensor:
    """Accumulate into ``.grad`` the gradients of ``loss_fn(model(inputs), targets)``,
    computed ``micro_batch_size`` images at a time. Returns the batch loss (detached).

    Args:
        model: any module, or one wrapped in ``DistributedDataParallel``: a module returned
            by :func:`fxstream.compile`, a module containing one, or a plain module (no
            streaming; a baseline runs through the same loop).
        loss_fn: ``loss_fn(output, targets) -> scalar``, reduced over the samples it
            gets as ``reduction`` says.
        inputs: a tensor with the batch in dim 0, or a sequence of tensors that are the
            micro-batches themselves (e.g. images of different sizes, one per entry).
            Array-likes (numpy arrays and memmaps, zarr and dask arrays,
            ``fxstream.open_image``) may replace tensors anywhere: a batch is split into
            micro-batches without reading pixels, and each tile's region is read when
            it is computed.
        targets: a tensor (or anything sliceable) with the batch in dim 0, or a sequence
            with one entry per micro-batch when ``inputs`` is a sequence; may be None.
            With a sequence of micro-batches, a tensor whose length is the total number
            of samples is split by the micro-batch sizes (e.g. the labels of
            ``fxstream.slides.collate``).
        reduction: how ``loss_fn`` reduces over samples. ``"mean"`` (default): each
            micro-batch loss is weighted by its share of the batch, so the gradients are
            those of the mean over the whole batch. ``"sum"``: micro-batch losses are
            added unweighted. Any other per-batch normalisation (a mean over pixels, a
            weighted mean whose weights depend on the batch) does not split over
            micro-batches: write ``loss_fn`` as a sum and divide by the batch's
            normaliser yourself, with ``reduction="sum"``.
        whole_batch_head: for heads that need the whole batch at once (training-mode
            BatchNorm in the head, contrastive losses): stream every micro-batch's trunk
            forward, run the head and the loss once on the stacked trunk outputs, then
            stream every trunk backward with its slice of the gradient. ``reduction``
            does not apply: the loss is computed once on the whole batch.
        scaler: a ``torch.amp.GradScaler``; the backward passes use its scaled loss.
        verbose: print the step's streaming summary (tiles, time, peak memory).

    The returned loss and the gradients equal those of one whole-batch
    ``loss_fn(model(inputs), targets).backward()`` (up to summation order). A step that
    fails (an error in the loss, a tile, or a tile group's collective) leaves ``.grad`` as
    it was before the step: the gradients present then are copied first (none after
    ``zero_grad(set_to_none=True)``, as in :func:`train_step`).
    """
    if reduction not in ("mean", "sum"):
        raise user_error(ArgumentError, f"reduction must be 'mean' or 'sum', got {reduction!r}")
    streamed = _streamed_modules(model)
    _check_targets(inputs, targets)
    for smodel in streamed:
        smodel.last_stats.reset(_device_of(smodel))
    with _grads_restored_on_error(model):
        if whole_batch_head:
            loss = _whole_batch_head(model, streamed, loss_fn, inputs, targets, micro_batch_size, scaler)
        else:
            loss = _per_micro_batch(model, loss_fn, inputs, targets, micro_batch_size, reduction, scaler)
    if verbose:
        for smodel in streamed:
            print(f"fxstream step: loss {loss.item():.4g}; {smodel.last_stats}")
        if not streamed:
            print(f"fxstream step: loss {loss.item():.4g}; plain model (nothing streamed)")
    return loss


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable,
    inputs: Batch,
    targets,
    micro_batch_size: int = 1,
    *,
    scaler=None,
    **options,
) -> torch.Tensor:
    """One optimiser step: zero the gradients, :func:`serial_backward` (``options`` are
    passed on), then ``optimizer.step()`` (through ``scaler`` if given, followed by
    ``scaler.update()``). Returns the batch loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = serial_backward(model, loss_fn, inputs, targets, micro_batch_size, scaler=scaler, **options)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss


def _per_micro_batch(model, loss_fn, inputs, targets, micro_batch_size, reduction, scaler) -> torch.Tensor:
    chunks = list(_micro_batches(inputs, targets, micro_batch_size))
    total_size = sum(x.shape[0] for x, _ in chunks)
    total = None
    for i, (x, y) in enumerate(chunks):
        sync = i == len(chunks) - 1
        with contextlib.nullcontext() if sync else _no_sync(model):
            loss = loss_fn(model(x), y)
            if reduction == "mean":
                loss = loss * (x.shape[0] / total_size)
            _backward(loss, scaler)
        total = loss.detach() if total is None else total + loss.detach()
    return total


class _TrunkCaptured(Exception):
    """Raised by the trunk interception to stop a forward pass at the trunk output."""

    def __init__(self, output: torch.Tensor):
        super().__init__()
        self.output = output


def _whole_batch_head(model, streamed, loss_fn, inputs, targets, micro_batch_size, scaler) -> torch.Tensor:
    if len(streamed) != 1:
        raise user_error(
            ArgumentError,
            f"whole_batch_head=True needs a model with one fxstream trunk, found {len(streamed)}",
            fix="use whole_batch_head=False, or one compiled module per model",
        )
    settings = streamed[0].settings
    inner = model.module if _is_ddp(model) else model

    def capture(trunk, x):
        raise _TrunkCaptured(trunk.stream(x))

    features = []
    for x, _ in _micro_batches(inputs, None, micro_batch_size):
        with _intercepted(settings, capture):
            try:
                inner(x)
            except _TrunkCaptured as captured:
                features.append(captured.output)  # streamed forward; backward streams later
            else:
                raise user_error(
                    ArgumentError,
                    "whole_batch_head=True: the model's forward never called its fxstream trunk",
                    fix="pass a model whose forward calls the compiled module",
                )
    several = isinstance(features[0], tuple)  # a trunk with several outputs
    stacked = tuple(map(torch.cat, zip(*features))) if several else torch.cat(features)
    batch = (stacked[0] if several else stacked).shape[0]
    calls = []

    def provide(trunk, x):
        if calls or x.shape[0] != batch:
            raise user_error(
                ArgumentError,
                "whole_batch_head=True needs a model that calls its fxstream trunk once on the batch",
                fix="use whole_batch_head=False",
            )
        calls.append(x)
        return stacked

    if not arrays.is_image(inputs):  # explicit micro-batches: a batch-sized view, no copy
        if targets is not None and not _by_sample(targets, [x.shape[0] for x in inputs]):
            targets = torch.cat(list(targets))
        first = inputs[0][:1] if isinstance(inputs[0], torch.Tensor) else torch.zeros(())  # the head reads no pixels
        inputs = first.expand(batch, *inputs[0].shape[1:])
    with _intercepted(settings, provide):
        loss = loss_fn(model(inputs), targets)
    _backward(loss, scaler)
    return loss.detach()


def _micro_batches(inputs: Batch, targets, micro_batch_size: int) -> Iterator[tuple]:
    if not arrays.is_image(inputs):  # explicit micro-batches
        sizes = [x.shape[0] for x in inputs]
        by_sample = targets is not None and _by_sample(targets, sizes)
        offset = 0
        for i, (x, n) in enumerate(zip(inputs, sizes)):
            if targets is None:
                yield x, None
            else:
                yield x, (targets[offset : offset + n] if by_sample else targets[i])
            offset += n
        return
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise user_error(ArgumentError, f"micro_batch_size must be >= 1, got {micro_batch_size}")
    for start in range(0, inputs.shape[0], micro_batch_size):
        stop = start + micro_batch_size
        yield arrays.batch_slice(inputs, start, stop), (targets[start:stop] if targets is not None else None)


def _check_targets(inputs: Batch, targets) -> None:
    """Before any micro-batch runs: one target per image (or, for explicit micro-batches,
    one per micro-batch). Targets without a length are passed on as they are."""
    if targets is None:
        return
    try:
        count = len(targets)
    except TypeError:
        return
    if arrays.is_image(inputs):
        if count != inputs.shape[0]:
            raise user_error(
                ArgumentError,
                f"serial_backward got {inputs.shape[0]} images and {count} targets",
                fix="pass one target per image (dim 0 of targets is the batch)",
            )
        return
    sizes = [x.shape[0] for x in inputs]
    if count != len(sizes) and not _by_sample(targets, sizes):
        raise user_error(
            ArgumentError,
            f"serial_backward got {len(sizes)} micro-batches ({sum(sizes)} images) and {count} targets",
            fix="pass one target per micro-batch, or one tensor with one target per image",
        )


def _by_sample(targets, sizes: Sequence[int]) -> bool:
    """Whether ``targets`` of explicit micro-batches is one tensor over all their samples."""
    return isinstance(targets, torch.Tensor) and targets.dim() > 0 and len(targets) == sum(sizes)


def _backward(loss: torch.Tensor, scaler) -> None:
    (scaler.scale(loss) if scaler is not None else loss).backward()


def _streamed_modules(model: nn.Module) -> list[StreamedModule]:
    """The compiled modules in ``model``; none for a plain model, which trains unstreamed."""
    return [m for m in model.modules() if isinstance(m, StreamedModule)]


def _device_of(smodel: StreamedModule) -> torch.device | None:
    for t in smodel.parameters():
        return t.device
    return None


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel)


def _no_sync(model: nn.Module):
    return model.no_sync() if hasattr(model, "no_sync") else contextlib.nullcontext()


@contextlib.contextmanager
def _intercepted(settings, hook) -> Iterator[None]:
    previous, settings.intercept = settings.intercept, hook
    try:
        yield
    finally:
        settings.intercept = previous


@contextlib.contextmanager
def _grads_restored_on_error(model: nn.Module) -> Iterator[None]:
    """A failed step leaves every ``.grad`` as it was: earlier micro-batches (or, with a tile
    group whose collective timed out, the head) may already have accumulated into it."""
    saved = [(p, None if p.grad is None else p.grad.clone()) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for p, grad in saved:
            p.grad = grad
        raise
