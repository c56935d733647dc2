"""Randomness in a streamed trunk: the same draws in every tile, in the forward pass and
in the backward recomputation.

Two kinds of random ops occur in a trunk, and each gets its own treatment:

* **Spatial draws** (element-wise ``Dropout``, channel-wise ``Dropout1d/2d/3d``,
  torchvision ``StochasticDepth`` in ``"row"`` and ``"batch"`` mode, and their
  functional forms) are replaced in the tile code by *position-keyed* draws: the keep
  decision of an element is a hash of (call seed, node name, batch index, channel,
  **global** pixel coordinates). A pixel computed by two overlapping tiles, or by a
  tile and its recomputation, gets the same decision, so tiling changes no draw: the
  streamed model computes exactly the whole-image function with these masks. Each
  streamed forward call draws a fresh 31-bit seed from torch's default generator, so
  ``torch.manual_seed`` makes runs reproducible and successive calls draw new masks.
  The masks are valid dropout masks (independent Bernoulli(1 - p) keeps, scaled by
  1 / (1 - p)), but they are not the masks ``torch.nn.Dropout`` would draw.
* **Constant-shaped draws** made by user code from torch's generator, such as a
  timm-style ``DropPath`` that calls ``torch.rand((N, 1, 1, 1))``: every tile and every
  recomputation runs with the generator state of the start of the forward pass
  (:class:`GeneratorStates`), so every tile of an image draws the same per-sample
  values. The first tile's draws advance the generator as a whole-image pass would.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import PlannerError
from ..ops.table import is_torchvision_stochastic_depth

MASK32 = 0xFFFFFFFF

# Modules and functions replaced by keyed draws: target -> mode.
# 'element': one draw per element; 'feature': one per (sample, channel);
# 'row': one per sample; 'batch': one per call.
KEYED_MODULES = {nn.Dropout: "element", nn.Dropout1d: "feature", nn.Dropout2d: "feature", nn.Dropout3d: "feature"}
KEYED_FUNCTIONS = {F.dropout: "element", F.dropout1d: "feature", F.dropout2d: "feature", F.dropout3d: "feature"}

# Draws from torch's default generator whose amount does not depend on the tile.
GENERATOR_FUNCTIONS = {
    torch.rand,
    torch.randn,
    torch.randint,
    torch.rand_like,
    torch.randn_like,
    torch.randint_like,
    torch.bernoulli,
    torch.normal,
    torch.multinomial,
    torch.randperm,
    torch.poisson,
}
GENERATOR_METHODS = {
    "bernoulli",
    "bernoulli_",
    "uniform_",
    "normal_",
    "random_",
    "exponential_",
    "geometric_",
    "cauchy_",
    "log_normal_",
    "multinomial",
}


# --- position-keyed draws ---------------------------------------------------------------


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for 32-bit values held in int64, without int64 overflow."""
    hi, lo = c >> 16, c & 0xFFFF
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (C. Wellons' "lowbias32"), elementwise on int64 tensors."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _key(seed: int, name: str) -> int:
    return (seed ^ zlib.crc32(name.encode())) & MASK32


def keyed_bits(
    shape: Sequence[int],
    key: int,
    hashed_dims: Sequence[int],
    origin: dict[int, int],
    device: torch.device,
) -> torch.Tensor:
    """32-bit random values, a hash of ``key`` and the coordinates along ``hashed_dims``
    (``origin[dim] + index``; the other dims broadcast). Returns a tensor of ``shape``
    with size 1 along the dims that are not hashed."""
    out_shape = [n if d in hashed_dims else 1 for d, n in enumerate(shape)]
    h = torch.full([1] * len(shape), hash32(torch.tensor(key)).item(), dtype=torch.int64, device=device)
    for d in hashed_dims:  # one small 1-D hash per dim, combined by broadcasting
        view = [1] * len(shape)
        view[d] = shape[d]
        coords = torch.arange(shape[d], dtype=torch.int64, device=device) + origin.get(d, 0)
        salted = hash32((coords + 0x9E3779B9 * (d + 1)) & MASK32)
        h = hash32(h ^ salted.view(view))
    return h.expand(out_shape) if list(h.shape) != out_shape else h


def keep_mask(
    shape: Sequence[int],
    p: float,
    seed: int,
    name: str,
    mode: str,
    spatial_dims: Sequence[int],
    origin: Sequence[int],
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The dropout multiplier (0 or 1 / (1 - p)) of node ``name`` for a tensor of
    ``shape`` whose spatial axes (tensor dims ``spatial_dims``) start at the global
    coordinates ``origin``. The whole-image mask is ``keep_mask(..., origin=(0, ...))``;
    a tile's mask is its crop."""
    hashed = {
        "element": range(len(shape)),
        "feature": (0, 1),
        "row": (0,),
        "batch": (),
    }[mode]
    offsets = dict(zip(spatial_dims, origin))
    bits = keyed_bits(shape, _key(seed, name), tuple(hashed), offsets, device)
    threshold = min(round(p * 2**32), 2**32)
    keep = (bits >= threshold).to(dtype)
    return keep / (1 - p) if p < 1 else keep


def keyed_dropout(
    x: torch.Tensor, random: TileRandom, name: str, p: float, mode: str, spatial_dims: tuple[int, ...]
) -> torch.Tensor:
    """Dropout of node ``name`` with position-keyed masks (the replacement in tile code)."""
    mask = keep_mask(x.shape, p, random.seed, name, mode, spatial_dims, random.origins[name], x.device, x.dtype)
    return x * mask


# --- rewriting the tile code --------------------------------------------------------------


@dataclass(frozen=True)
class RandomOps:
    """What a tile module draws: keyed nodes (name -> origin needed) and whether it
    also draws from torch's generator."""

    keyed: tuple[str, ...]
    generator: bool

    def __bool__(self) -> bool:
        return bool(self.keyed) or self.generator


def rewrite_random(tile: fx.GraphModule, geometry) -> RandomOps:
    """Replace the random ops of ``tile`` (training-mode dropout, stochastic depth) by
    :func:`keyed_dropout` calls that take the tile's random context from a new input,
    ``forward(x, geometry, fxstream_random)``. Returns what the tile draws."""
    graph = tile.graph
    keyed = []
    generator = False
    for node in list(graph.nodes):
        if _keyed_op(tile, node) is None:
            generator |= _draws_from_generator(node)
            continue
        if node.name not in geometry.steps_by_name:
            raise PlannerError(f"cannot key the random op '{node.name}': no trunk step of that name")
        keyed.append(node)
    if not keyed:
        return RandomOps((), generator)
    names = tuple(node.name for node in keyed)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        context = graph.placeholder("fxstream_random")
    for node in keyed:
        x, p, mode = _keyed_op(tile, node)
        args = (x, context, node.name, p, mode, geometry.axis_dims(node.name))
        with graph.inserting_before(node):
            replacement = graph.call_function(keyed_dropout, args)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
    graph.lint()
    tile.recompile()
    return RandomOps(names, generator)


def _keyed_op(tile: fx.GraphModule, node: fx.Node):
    """``(input, p, mode)`` when ``node`` is a random op drawn by position, else None."""
    if node.op == "call_module":
        module = tile.get_submodule(node.target)
        mode = KEYED_MODULES.get(type(module))
        if mode is None or not module.training or module.p == 0:
            return None
        return node.args[0], float(module.p), mode
    if node.op != "call_function":
        return None
    mode = KEYED_FUNCTIONS.get(node.target)
    if mode is None and is_torchvision_stochastic_depth(node.target):
        mode = "stochastic_depth"
    if mode is None:
        return None
    arg = lambda i, name, default: node.args[i] if i < len(node.args) else node.kwargs.get(name, default)  # noqa: E731
    if mode == "stochastic_depth":
        p, mode, training = arg(1, "p", None), arg(2, "mode", None), arg(3, "training", True)
    else:
        p, training = arg(1, "p", 0.5), arg(2, "training", True)
    if not training or p == 0:
        return None
    return node.args[0], float(p), mode


def _draws_from_generator(node: fx.Node) -> bool:
    if node.op == "call_function":
        return node.target in GENERATOR_FUNCTIONS
    return node.op == "call_method" and node.target in GENERATOR_METHODS


# --- per-call draws -----------------------------------------------------------------------


@dataclass(frozen=True)
class TileRandom:
    """The random context of one tile: the call's seed, and the global origin of every
    keyed node's region in this tile (per spatial axis)."""

    seed: int
    origins: dict


class GeneratorStates:
    """The default generators' states (CPU, and the compute device's CUDA generator),
    captured once and set again for every tile."""

    def __init__(self, device: torch.device):
        self.cuda = device if device.type == "cuda" else None
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(self.cuda) if self.cuda else None

    def start(self) -> None:
        """Set the generators to the captured states (and leave them there)."""
        torch.set_rng_state(self.cpu_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state, self.cuda)

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        saved = torch.get_rng_state(), torch.cuda.get_rng_state(self.cuda) if self.cuda else None
        torch.set_rng_state(self.cpu_state)
        if self.cuda:
            torch.cuda.set_rng_state(self.cuda_state, self.cuda)
        try:
            yield
        finally:
            torch.set_rng_state(saved[0])
            if self.cuda:
                torch.cuda.set_rng_state(saved[1], self.cuda)


def draw_seed() -> int:
    """The seed of one streamed forward call, from torch's default generator."""
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))


class Draws:
    """The random draws of one streamed forward call, replayed by every tile."""

    def __init__(self, ops: RandomOps, origins, device: torch.device):
        self.seed = draw_seed() if ops.keyed else 0
        self.states = GeneratorStates(device) if ops.generator else None
        self.origins = origins  # (ShapePlan, tile position) -> {node: origin}

    @contextlib.contextmanager
    def tile(self, shape_plan, index: int, advance: bool) -> Iterator[TileRandom]:
        """Run one tile: with ``advance`` the generators start from the call's state and advance
        as in a whole-image pass (the first forward tile of the output pass: a trunk with global
        statistics runs its statistics passes and heads before it); otherwise their state is
        restored afterwards."""
        random = TileRandom(self.seed, self.origins(shape_plan, index))
        if self.states is None:
            yield random
            return
        if advance:
            self.states.start()
            yield random
            return
        with self.states.replayed():
            yield random
