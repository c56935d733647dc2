"""Global statistics in a 2-rank gloo tile group (issue 20): every statistics pass's sums are
all-reduced, so both ranks run the heads on the same values; each pass's backward reduces its
value gradients with the parameter and input gradients. The parent compares each rank with the
plain model in float64 (both schedules): the output, the input gradient, every parameter
gradient and, for train-mode BatchNorm over two steps, the running statistics."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from exactness import rel_err
from gloo import run_ranks
from test_statistics import RTOL, BNNet, Toy, grad_err, randomise, step

import fxstream

WORLD = 2
SCHEDULES = ("carry", "recompute")


def build(name: str):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # the same initial values in every process
    try:
        torch.manual_seed(0)
        return randomise(Toy()) if name == "toy" else randomise(BNNet()).train()
    finally:
        torch.set_default_dtype(previous)


def inputs(k: int) -> torch.Tensor:
    return torch.randn(2, 3, 31, 19, generator=torch.Generator().manual_seed(10 + k), dtype=torch.float64)


def run(model, x, k):
    out, grads = step(model, x, k)
    return {"output": out, "grads": grads, "buffers": [b.clone() for b in model.buffers()]}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        group = dist.new_group([0, 1])
        results = {}
        for name in ("toy", "bn"):
            for schedule in SCHEDULES:
                model = build(name)
                smodel = fxstream.compile(model, tile_size=12, schedule=schedule, tile_group=group)
                plan = smodel.shape_plan(31, 19)
                results[(name, schedule)] = {
                    "steps": [run(smodel, inputs(k), k) for k in range(2)],
                    "tiles": len(smodel.streamed_trunk.positions(plan)),
                    "all_tiles": plan.num_tiles,
                }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_statistics_in_a_tile_group(tmp_path):
    ranks = run_ranks(_worker, WORLD, tmp_path)
    for name in ("toy", "bn"):
        plain = build(name)
        reference = [run(plain, inputs(k), k) for k in range(2)]
        scale = max(float(g.abs().max()) for g in reference[0]["grads"])
        for schedule in SCHEDULES:
            tiles = [ranks[r][(name, schedule)]["tiles"] for r in range(WORLD)]
            assert all(t > 0 for t in tiles) and sum(tiles) == ranks[0][(name, schedule)]["all_tiles"]
            for rank in range(WORLD):
                for k, (got, ref) in enumerate(zip(ranks[rank][(name, schedule)]["steps"], reference)):
                    where = f"{name} {schedule} rank {rank} step {k}"
                    assert rel_err(got["output"], ref["output"]) <= RTOL, where
                    for i, (a, b) in enumerate(zip(got["grads"], ref["grads"])):
                        assert grad_err(a, b, scale) <= RTOL, f"{where}: gradient {i}"
                    for a, b in zip(got["buffers"], ref["buffers"]):
                        assert rel_err(a.double(), b.double()) <= 1e-13, f"{where}: buffers"
