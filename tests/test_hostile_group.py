"""Issue 19, item 2: the ranks of a tile group fed different images of one shape (a
DistributedSampler per rank, the usual DDP habit) trained on a stitched image, silently.
Two gloo CPU processes, spawned once: different tensors and different numpy arrays raise
TileGroupError on both ranks, naming them; the same image (a tensor, or a numpy array on
one rank and a tensor on the other) still gives the single-process output and gradients
(float64)."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn
from exactness import rel_err
from gloo import run_ranks

import fxstream

WORLD = 2
SHAPE = (1, 3, 40, 33)


def build() -> nn.Module:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 3, stride=2, padding=1))
        return model.double()
    finally:
        torch.set_default_dtype(previous)


def image(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def grads(model, out) -> list:
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype)
    return [out.detach(), *torch.autograd.grad(out, list(model.parameters()), grad)]


def _different(rank: int, group, as_numpy: bool) -> str:
    smodel = fxstream.compile(build(), tile_size=12, tile_group=group)
    x = image(rank)  # one image per rank: what a DistributedSampler over the tile ranks gives
    try:
        smodel(x.numpy() if as_numpy else x)
    except fxstream.TileGroupError as exc:
        return str(exc)
    return "no error"


def _same(rank: int, group) -> list:
    model = build()
    smodel = fxstream.compile(model, tile_size=12, tile_group=group)
    x = image(5)
    return grads(model, smodel(x.numpy() if rank == 1 else x))


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        group = dist.new_group([0, 1])
        results = {
            "tensors": _different(rank, group, False),
            "arrays": _different(rank, group, True),
            "same": _same(rank, group),
        }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_tile_group_ranks_with_different_images(tmp_path):
    ranks = run_ranks(_worker, WORLD, tmp_path)
    for results in ranks:
        for case in ("tensors", "arrays"):
            message = results[case]
            assert "different images of the same shape (1, 3, 40, 33)" in message, message
            assert "rank 0 / rank 1" in message and "fix:" in message, message
    model = build()
    reference = grads(model, model(image(5)))
    for results in ranks:
        assert max(rel_err(a, b) for a, b in zip(results["same"], reference)) <= 1e-12
