"""The fast tier (``make test``: the tests not marked slow, tests/tiers.py) stays
representative: every op-zoo model and dense model in an exactness test, both schedules,
and the contract, the CLI, slides, training, errors and the README.

Checked on what the session collected before -k/-m deselection, so only when that is the
whole suite (``pytest``, ``make test`` or ``make test-all``: no paths given).
"""

from __future__ import annotations

import pytest
import tiers
from dense_zoo import DENSE
from zoo import ZOO


@pytest.fixture
def fast(request):
    if request.config.args_source != pytest.Config.ArgsSource.TESTPATHS:
        pytest.skip("needs the whole suite collected (run pytest without paths)")
    items = [item for item in request.config.stash[tiers.COLLECTED] if item.get_closest_marker("slow") is None]
    assert items, "the fast tier is empty"
    return items


def params(item) -> dict:
    return getattr(getattr(item, "callspec", None), "params", {})


def test_every_zoo_model_is_exact_in_the_fast_tier(fast):
    covered = {params(i).get("name") for i in fast if i.originalname == "test_zoo_exact_float64"}
    assert set(ZOO) <= covered, f"zoo models only in the slow tier: {sorted(set(ZOO) - covered)}"


def test_every_dense_model_is_exact_in_the_fast_tier(fast):
    covered = {params(i).get("name") for i in fast if i.originalname == "test_dense_exact_float64"}
    assert set(DENSE) <= covered, f"dense models only in the slow tier: {sorted(set(DENSE) - covered)}"


def test_both_schedules_run_exactness_tests_in_the_fast_tier(fast):
    for kind in ("carry", "recompute"):
        files = {i.path.name for i in fast if params(i).get("schedule") == kind}
        assert {"test_training.py", "test_slides.py"} <= files, (kind, sorted(files))
    assert any(params(i).get("schedule") == "carry" for i in fast if i.path.name == "test_ops.py")


CORE = """test_contract test_cli test_slides test_training test_errors test_readme test_module test_tracing
test_carry test_memory test_torchvision test_libraries test_multi_output test_auto""".split()


@pytest.mark.parametrize("name", [f"{name}.py" for name in CORE])
def test_the_fast_tier_keeps_this_file(fast, name):
    assert any(i.path.name == name for i in fast), f"{name} has no test in the fast tier"
