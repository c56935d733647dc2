import os
import sys

import pytest
import torch

import fxstream

sys.path.insert(0, os.path.dirname(__file__))  # for `from exactness import ...`
# One thread: most tests run many tiny tiles, where OpenMP fan-out costs more than it
# gains (measured about 10x slower with 2 threads on a loaded 2-core machine).
torch.set_num_threads(1)


@pytest.fixture
def uniform_tiles(monkeypatch):
    """Tile with the plan's uniform blocks (``plan.plan_splits``) instead of the per-input
    split, which puts an axis that fits in one tile into one block. Suites that force many
    small tiles on small images, to exercise tile borders, use it."""
    monkeypatch.setattr(
        fxstream.planning.plan,
        "_splits",
        lambda geo, plan, sizes: fxstream.planning.plan.plan_splits(plan, sizes[geo.output]),
    )


@pytest.fixture
def float64_default():
    """Build models and inputs in float64; restore the default afterwards, so that other test
    modules (and their worker processes) keep torch's float32 default. Modules that need it
    everywhere say ``pytestmark = pytest.mark.usefixtures("float64_default")``."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(saved)


def balanced_carry_tiles(monkeypatch) -> None:
    """Under carry, tile with the plan's uniform blocks (at most ``plan.block`` output pixels)
    instead of the fewest tiles that fit: many small tiles and cells, several bands."""
    monkeypatch.setattr(
        fxstream.planning.tiling,
        "carry_split",
        lambda width, n, limit, block: fxstream.planning.plan.balanced_split(n, block),
    )


@pytest.fixture
def small_carry_tiles(monkeypatch):
    """Carry blocks of the plan's block size (many small tiles, several bands)."""
    balanced_carry_tiles(monkeypatch)


@pytest.fixture(params=["carry", "recompute"])
def schedule(request, monkeypatch):
    """Run a test under both schedules (the default schedule of ``fxstream.compile``).

    Under carry, tiles get the plan's uniform blocks (at most ``plan.block`` output pixels,
    the recompute block for the same tile_size), so the suites that force many small tiles
    get at least as many carry tiles, with cells much smaller than their halos."""
    monkeypatch.setattr(fxstream.planning.schedule, "DEFAULT", request.param)
    if request.param == "carry":
        balanced_carry_tiles(monkeypatch)
    return request.param


@pytest.hookimpl(tryfirst=True)  # before -k/-m deselect, so the stale-entry check sees every test
def pytest_collection_modifyitems(config, items):
    """The fast tier (``make test``: ``-m "not slow"``) and the full suite: tests/tiers.py."""
    import tiers

    stale = tiers.mark(items, pytest.mark.slow)
    config.stash[tiers.COLLECTED] = list(items)
    if stale and config.args_source == pytest.Config.ArgsSource.TESTPATHS:  # every test collected
        raise pytest.UsageError(f"tests/tiers.py: SLOW entries that match no test (renamed or removed?): {stale}")


def pytest_collection_finish(session):
    """Test modules are imported during collection; none may change torch's default dtype
    for the others (tests that need float64 set it in a fixture and restore it)."""
    torch.set_default_dtype(torch.float32)


@pytest.fixture(autouse=True)
def _default_dtype_restored():
    saved = torch.get_default_dtype()
    yield
    torch.set_default_dtype(saved)
