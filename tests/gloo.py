"""Run a test's worker on several local gloo ranks and collect what each rank saved.

A worker is ``worker(rank, port, out_dir)``: it joins the process group on ``port``
(``init_method=f"tcp://127.0.0.1:{port}"``), does its work, and saves its results to
``out_dir/rank{rank}.pt``."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, world: int, out_dir: Path) -> list:
    """Spawn ``world`` ranks of ``worker`` and return each rank's saved results, in rank order."""
    mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=world, join=True)
    return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(world)]
