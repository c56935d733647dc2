"""Record the blocks a streamed trunk computes, per phase, keyed by the tile's block."""

from __future__ import annotations


def record_tiles(smodel, n_tiles: int) -> dict:
    """``{"forward": {block: tensor}, "backward": {block: tensor}}``, filled as the model runs.

    The first ``n_tiles`` calls are the forward pass, the rest the backward recomputations;
    the forward pass's last tile keeps its autograd graph and is not recomputed."""
    trunk = smodel.streamed_trunk
    blocks: dict = {"forward": {}, "backward": {}}
    run_tile = trunk.run_tile
    calls = []

    def recording(x, tile, run, random=None):
        block = run_tile(x, tile, run, random)
        phase = "forward" if len(calls) < n_tiles else "backward"
        calls.append(tile)
        blocks[phase][tile.block] = block.detach().clone()
        return block

    trunk.run_tile = recording
    return blocks
