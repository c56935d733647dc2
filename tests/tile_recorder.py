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
        outputs = run_tile(x, tile, run, random)  # the tile's block of every trunk output
        phase = "forward" if len(calls) < n_tiles else "backward"
        calls.append(tile)
        blocks[phase][tile.block] = outputs[-1].detach().clone()
        return outputs

    trunk.run_tile = recording
    return blocks
