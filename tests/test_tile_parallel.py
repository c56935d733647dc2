"""Tile-parallel streaming (``compile(..., tile_group=...)``) on gloo: four CPU processes,
spawned once, run every case; the parent compares with the plain model in float64.

* a 2-rank and a 3-rank tile group, both schedules, a residual CNN with a head, a U-Net,
  a 3D net and a trunk with two outputs: the output, the input gradient and every parameter gradient equal the
  single-process ones to 1e-12 relative on every rank;
* a 2 x 2 (data x tile) DeviceMesh, DDP over the data dimension, one ``train_step``: the
  gradients and the updated parameters equal single-process training on the whole batch;
* a mismatched input shape on one rank raises InputShapeError on both ranks;
* a rank that stops calling the model: the other rank's collective times out with
  TileGroupError, and serial_backward leaves its ``.grad`` untouched.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from dense_zoo import UNet, randomise
from exactness import rel_err
from gloo import run_ranks

import fxstream

WORLD = 4
RTOL = 1e-12
GROUPS = {"pair": [0, 1], "triple": [0, 1, 2]}
SCHEDULES = ("carry", "recompute")


class Residual(nn.Module):
    """A residual CNN with a pooled linear head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.block = nn.Sequential(
            nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1)
        )
        self.down = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        y = F.relu(self.stem(x))
        y = F.relu(y + self.block(y))
        return self.fc(F.relu(self.down(y)).mean((2, 3)))


class Net3D(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(1, 4, 3, padding=1)
        self.b = nn.Conv3d(4, 4, 3, stride=2, padding=1)
        self.pool = nn.MaxPool3d(2, ceil_mode=True)
        self.c = nn.Conv3d(4, 2, 1)

    def forward(self, x):
        return self.c(self.pool(F.relu(self.b(F.relu(self.a(x))))))


class TwoMaps(nn.Module):
    """A trunk with two outputs (stride 2 and 4, the first also read inside the trunk),
    flattened together by the head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))

    def forward(self, x):
        f1 = self.stem(x)
        f2 = self.down(f1)
        return torch.cat([f1.flatten(1), f2.flatten(1)], 1)


# name -> (builder, input shape, tile size per schedule)
CASES = {
    "residual": (Residual, (2, 3, 53, 41), {"carry": 16, "recompute": 16}),
    "unet": (lambda: UNet(3, 2, 3, 2, 2, "transpose", "pad"), (1, 3, 110, 60), {"carry": 40, "recompute": 48}),
    "net3d": (Net3D, (1, 1, 45, 14, 11), {"carry": 12, "recompute": 12}),
    "two_outputs": (TwoMaps, (1, 3, 61, 50), {"carry": 12, "recompute": 16}),
}


def build(name: str) -> nn.Module:
    """The same float64 model in every process, whatever the default dtype there (the
    initialisers draw other values under another default dtype)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        torch.manual_seed(0)
        return randomise(CASES[name][0]().eval()).double()
    finally:
        torch.set_default_dtype(previous)


def inputs(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(CASES[name][1], generator=gen, dtype=torch.float64), gen


def gradients(model: nn.Module, out_fn) -> dict:
    """Output and gradients (input, every parameter) of ``out_fn(x)`` for a fixed output gradient."""
    params = list(model.parameters())
    x, gen = inputs(out_fn.name)
    x.requires_grad_(True)
    out = out_fn(x)
    grad = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    grads = torch.autograd.grad(out, [x] + params, grad)
    return {
        "output": out.detach(),
        "input": grads[0],
        **{n: g for (n, _), g in zip(model.named_parameters(), grads[1:])},
    }


class Call:
    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def __call__(self, x):
        return self.fn(x)


# --- the workers ----------------------------------------------------------------------------


def _exactness_cases(rank: int, groups: dict) -> dict:
    results = {}
    for group_name, ranks in GROUPS.items():
        if rank not in ranks:
            continue
        for name, (_, shape, tiles) in CASES.items():
            for schedule in SCHEDULES:
                model = build(name)
                smodel = fxstream.compile(
                    model, tile_size=tiles[schedule], schedule=schedule, tile_group=groups[group_name]
                )
                plan = smodel.shape_plan(*shape[2:])
                positions = smodel.streamed_trunk.positions(plan)
                results[(group_name, name, schedule)] = {
                    "grads": gradients(model, Call(name, smodel)),
                    "bands": plan.schedule.bands,
                    "tiles": len(positions),
                    "all_tiles": plan.num_tiles,
                }
    return results


def _mesh_case(rank: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("data", "tile"))
    model = build("residual")
    smodel = fxstream.compile(model, tile_size=16, tile_group=mesh["tile"])
    ddp = nn.parallel.DistributedDataParallel(smodel, process_group=mesh["data"].get_group())
    x, y = mesh_batch()
    half = mesh.get_local_rank("data")
    mine = slice(2 * half, 2 * half + 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = fxstream.train_step(ddp, optimizer, F.cross_entropy, x[mine], y[mine], micro_batch_size=1)
    return {
        "loss": loss,
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
    }


def mesh_batch():
    gen = torch.Generator().manual_seed(2)
    return torch.randn(4, 3, 37, 30, generator=gen, dtype=torch.float64), torch.randint(0, 3, (4,), generator=gen)


def _mismatch_case(rank: int, group) -> str:
    model = build("residual")
    smodel = fxstream.compile(model, tile_size=16, tile_group=group)
    x = torch.randn(1, 3, 40, 33 + rank, dtype=torch.float64)
    try:
        smodel(x)
    except fxstream.InputShapeError as exc:
        return str(exc)
    return "no error"


def _dead_rank_case(rank: int, group) -> dict:
    """Rank 1 runs the forward pass, then stops: rank 0's gradient all_reduce times out."""
    model = build("residual")
    smodel = fxstream.compile(model, tile_size=16, tile_group=group)
    x, _ = inputs("residual")
    if rank == 1:
        smodel(x)
        return {}
    try:
        fxstream.serial_backward(smodel, lambda out, _: out.sum(), x, None, micro_batch_size=len(x))
    except fxstream.TileGroupError as exc:
        return {"error": str(exc), "grads": [p.grad for p in model.parameters()]}
    return {"error": "no error"}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        groups = {name: dist.new_group(ranks) for name, ranks in GROUPS.items()}
        results = {"exact": _exactness_cases(rank, groups), "mesh": _mesh_case(rank)}
        if rank in (0, 1):
            results["mismatch"] = _mismatch_case(rank, groups["pair"])
        short = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=3))
        if rank in (0, 1):
            results["dead"] = _dead_rank_case(rank, short)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# --- the test -----------------------------------------------------------------------------


def test_tile_parallel_gloo(tmp_path):
    ranks = run_ranks(_worker, WORLD, tmp_path)
    _check_exactness(ranks)
    _check_mesh(ranks)
    for rank in (0, 1):
        message = ranks[rank]["mismatch"]
        assert "different shapes" in message and "(1, 3, 40, 33)" in message and "(1, 3, 40, 34)" in message, message
    dead = ranks[0]["dead"]
    assert "summing the trunk gradients" in dead["error"] and "fix:" in dead["error"], dead["error"]
    assert all(g is None for g in dead["grads"]), "a failed step wrote .grad"


def _check_exactness(ranks: list) -> None:
    for name in CASES:
        model = build(name)
        ref = gradients(model, Call(name, model))
        for group_name, members in GROUPS.items():
            for schedule in SCHEDULES:
                tiles = 0
                for rank in members:
                    got = ranks[rank]["exact"][(group_name, name, schedule)]
                    assert len(got["bands"]) == len(members)
                    tiles += got["tiles"]
                    for key, value in ref.items():
                        err = rel_err(got["grads"][key], value)
                        assert err <= RTOL, f"{group_name} {name} {schedule} rank {rank} {key}: {err:.2e}"
                assert tiles == got["all_tiles"], "the bands do not partition the tiles"


def _check_mesh(ranks: list) -> None:
    model = build("residual")
    x, y = mesh_batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    for rank, results in enumerate(ranks):
        got = results["mesh"]
        for n, p in model.named_parameters():
            assert rel_err(got["grads"][n], grads[n]) <= RTOL, f"mesh rank {rank} grad:{n}"
            assert rel_err(got["params"][n], p.detach()) <= RTOL, f"mesh rank {rank} param:{n}"
    mean_loss = sum(ranks[r]["mesh"]["loss"] for r in (0, 2)) / 2  # one rank per data index
    assert rel_err(mean_loss, loss.detach()) <= RTOL
