"""``boundary="auto"`` with global statistics (issue 20, step 7): each cut analysed again,
the passes weighed in the predicted time, the whole model when the plain rest of a prefix
does not fit, a prefix when it fits and is faster, the 5% tie rule, and a whole model with
more levels than ``max_levels`` listed as excluded."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from exactness import check_streamed
from timm.layers.squeeze_excite import SqueezeExcite

import fxstream
from fxstream.memory.auto import Candidate, choose, pick


class Wide(nn.Module):
    """A stride-1 stem, then wide stride-2 maps with a GroupNorm and an SE block: the only
    cuts are the stem and the whole trunk, and a plain rest after the stem is large."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 32, 3, stride=2, padding=1)
        self.conv, self.gn = nn.Conv2d(32, 32, 3, padding=1), nn.GroupNorm(4, 32)
        self.se = SqueezeExcite(32, rd_channels=8)
        self.out = nn.Conv2d(32, 4, 3, padding=1)

    def forward(self, x):
        x = F.relu(self.down(F.relu(self.stem(x))))
        return self.out(self.se(F.relu(self.gn(self.conv(x)))))


def test_whole_model_when_the_plain_rest_does_not_fit():
    choice = choose(Wide(), "auto", "auto", "300MiB", (1, 3, 2048, 2048))
    by_boundary = {c.boundary: c for c in choice.candidates}
    assert set(by_boundary) == {"relu", "out"}
    assert by_boundary["relu"].cost == float("inf")  # its plain stride-2 rest does not fit 300 MiB
    assert choice.boundary == "out" and by_boundary["out"].levels == 2
    assert "2 levels of statistics" in choice.reason


def test_prefix_when_it_fits_and_is_faster():
    """A small image: the plain rest fits, and streaming only the stem avoids the passes."""
    choice = choose(Wide(), "auto", "auto", "1GiB", (1, 3, 128, 128))
    by_boundary = {c.boundary: c for c in choice.candidates}
    assert by_boundary["out"].cost > 1.05 * by_boundary["relu"].cost
    assert choice.boundary == "relu"


def test_the_tie_rule_prefers_streaming_more():
    def candidate(name, cost):
        return Candidate(name, 64, 0, cost, (1, 1))

    assert pick([candidate("a", 1.0), candidate("b", 1.04), candidate("c", 1.2)]).boundary == "b"
    assert pick([candidate("a", 1.0), candidate("b", 1.06)]).boundary == "a"


def test_more_levels_than_max_levels_are_excluded_and_listed():
    choice = choose(Wide(), "auto", "auto", "1GiB", (1, 3, 256, 256), max_levels=1)
    excluded = [c for c in choice.candidates if c.excluded]
    assert [c.boundary for c in excluded] == ["<whole model>"] and excluded[0].levels == 2
    assert "excluded (2 levels > max_levels=1" in choice.reason
    assert choice.boundary != "<whole model>" and all(c.levels <= 1 for c in choice.candidates if not c.excluded)


@pytest.mark.parametrize("budget, shape", [("1GiB", (1, 3, 96, 80))])
def test_the_choice_streams_exactly(budget, shape):
    torch.manual_seed(0)
    model = Wide().double()
    smodel = fxstream.compile(model, "auto", boundary="auto", memory_budget=budget, input_shape=shape)
    check_streamed(model, torch.randn(*shape, dtype=torch.float64), None, streamed=smodel)
    forced = fxstream.compile(model, 40, boundary="out")  # the whole model, with its statistics
    assert forced.plan.levels == 2
    check_streamed(model, torch.randn(*shape, dtype=torch.float64), None, streamed=forced, min_tiles=4)
