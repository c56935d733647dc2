"""DistributedDataParallel: two CPU processes (gloo, loopback) run serial_backward on
their halves of a batch; the synchronised gradients equal single-process gradients on
the whole batch (float64), and gradients are all-reduced once per step."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from exactness import RTOL64, rel_err
from gloo import run_ranks

import fxstream

WORLD = 2
BATCH = 4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(F.relu(self.conv2(F.relu(self.conv1(x)))).mean((2, 3)))


def make():
    torch.manual_seed(0)
    return Net().double().eval()


def data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, 19, 16, generator=gen, dtype=torch.float64)
    return x, torch.randint(0, 3, (BATCH,), generator=gen)


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = make()
        ddp = nn.parallel.DistributedDataParallel(fxstream.compile(model, tile_size=8))
        calls = []

        def counting_allreduce(state, bucket):
            calls.append(1)
            fut = dist.all_reduce(bucket.buffer().div_(WORLD), async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])

        ddp.register_comm_hook(None, counting_allreduce)
        x, y = data()
        share = BATCH // WORLD
        mine = slice(rank * share, (rank + 1) * share)
        results = {}
        for mode in ("per_micro_batch", "whole_batch_head"):
            model.zero_grad()
            calls.clear()
            loss = fxstream.serial_backward(
                ddp, F.cross_entropy, x[mine], y[mine], micro_batch_size=1, whole_batch_head=mode == "whole_batch_head"
            )
            results[mode] = {
                "loss": loss,
                "calls": len(calls),
                "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            }
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_serial_backward_equals_single_process_full_batch(tmp_path):
    ranks = run_ranks(_worker, WORLD, tmp_path)
    model = make()
    x, y = data()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    ref = {n: p.grad for n, p in model.named_parameters()}
    for mode in ("per_micro_batch", "whole_batch_head"):
        for rank, results in enumerate(ranks):
            got = results[mode]
            assert got["calls"] == 1, f"{mode}: {got['calls']} all-reduce calls on rank {rank}, expected one per step"
            for name, g in ref.items():
                err = rel_err(got["grads"][name], g)
                assert err <= RTOL64, f"{mode}, rank {rank}, grad:{name}: relative error {err:.3e}"
        mean_loss = sum(r[mode]["loss"] for r in ranks) / WORLD  # each rank: the mean over its half
        assert rel_err(mean_loss, loss.detach()) <= RTOL64
