"""The two tiers of the test suite, in one place.

``make test`` (``pytest -m "not slow"``) runs the fast tier: every op family, both
schedules, the contract, the CLI, slides, training and the README, in a few minutes on two
cores. ``make test-all`` (``pytest``) and CI run everything.

conftest.py marks ``slow``, at collection:

* every test in ``SLOW`` below (a test id, with ``*`` matching any characters; an id
  without ``[params]`` marks every parametrisation, a file name alone the whole file);
* the ``recompute`` variant of tests that run under both schedules through the
  ``schedule`` fixture, except in ``BOTH_SCHEDULES`` (the fast tier runs those files under
  both schedules, and carry everywhere else);
* tests marked ``@pytest.mark.slow`` in their own file (the larger torchvision cases).

Entries are ``file.py::test_name[params]``. An entry that matches no test of a file the
run collected in full is an error, so the list cannot go stale silently.
"""

from __future__ import annotations

import re

import pytest

# Every test the session collected, before -k/-m deselection (tests/test_tiers.py reads it).
COLLECTED = pytest.StashKey[list]()

# Files whose schedule-parametrised tests keep both schedules in the fast tier: training,
# mixed precision, host input, slides, several outputs and the carry/recompute comparisons.
BOTH_SCHEDULES = {
    "test_training.py",
    "test_amp.py",
    "test_host_input.py",
    "test_slides.py",
    "test_multi_output.py",
    "test_carry.py",
    "test_auto.py",
    "test_cli.py",
    "test_errors.py",
    "test_memory.py",
    "test_bands.py",
    "test_plan_speed.py",
}

SLOW = [
    # Hypothesis over random graphs (25 examples, minutes when it shrinks a failure); the
    # regressions it found run in the fast tier.
    "test_fuzz.py::test_random_local_network_streams_exactly",
    # Processes: gloo ranks (tile groups, DDP); a subprocess that trains on a 20000 x 20000
    # memmap; the examples' --quick runs (the demo is `make demo`); building and installing
    # the wheel.
    "test_tile_parallel.py",
    "test_ddp.py",
    "test_slides.py::test_training_step_on_a_memmap_does_not_hold_the_image",
    "test_demo.py",
    "test_library_examples.py",
    "test_segment_example.py::test_segment_example_quick_learns",
    "test_train_example.py::test_short_run_learns_streamed_only",
    "test_packaging.py",
    # The op zoo and the dense U-Nets: the fast tier keeps the many-tile case of each model
    # (batch 3, ragged tiles, interior tiles); one and two/few tiles and the long strips run
    # in the full suite.
    "test_ops.py::test_zoo_exact_float64[*-one-*]",
    "test_ops.py::test_zoo_exact_float64[*-two-*]",
    "test_ops.py::test_zoo_float32[*-branchy_dag]",
    "test_dense.py::test_dense_exact_float64[*-one]",
    "test_dense.py::test_dense_exact_float64[*-few]",
    "test_dense.py::test_dense_exact_interior_tiles",
    # torchvision: ResNet-18 (plan and exactness), MobileNetV2, RegNet (groups), VGG11
    # features (dense trunk) and the FCN stay; the others and the larger cases (marked slow
    # in the file) run in the full suite.
    "test_torchvision.py::test_plan_structure[*-resnet50]",
    "test_torchvision.py::test_plan_structure[*-densenet121]",
    "test_torchvision.py::test_plan_structure[*-convnext_tiny]",
    "test_torchvision.py::test_plan_structure[*-regnet_x_400mf]",
    "test_torchvision.py::test_plan_structure[*-vgg11]",
    "test_torchvision.py::test_plan_structure[*-mobilenet_v2]",
    "test_torchvision.py::test_streamed_matches_float64[*-convnext_tiny-*]",
    "test_torchvision.py::test_streamed_matches_float64[*-densenet121-*]",
    "test_torchvision.py::test_streamed_matches_float64[*-resnet50-*]",
    "test_torchvision.py::test_streamed_matches_float64[*-resnet18-b1-235x171-1tile]",
    "test_torchvision.py::test_streamed_matches_float64[*-mobilenet_v2-b3-*]",
    # Library families: one or two per library and kind stay (timm features_only and
    # ConvNeXt; smp U-Net; MONAI UNet and DynUNet; torchvision FPN; a squeeze-excitation and
    # a global-norm rejection; the size guards); the others run in the full suite.
    "test_libraries.py::test_hrnet_features_only_streams_its_parallel_branches",
    "test_libraries.py::test_family_streams_exactly[monai.BasicUNet]",
    "test_libraries.py::test_family_streams_exactly[monai.FlexibleUNet]",
    "test_libraries.py::test_family_streams_exactly[timm.xception41]",
    "test_libraries.py::test_family_streams_exactly[timm.cspresnet50]",
    "test_libraries.py::test_family_streams_exactly[timm.resnet50]",
    "test_libraries.py::test_family_streams_exactly[timm.resnet50d]",
    "test_libraries.py::test_family_streams_exactly[timm.resnext50_32x4d]",
    "test_libraries.py::test_family_streams_exactly[timm.res2net50_14w_8s]",
    "test_libraries.py::test_family_streams_exactly[timm.inception_v3]",
    "test_libraries.py::test_family_streams_exactly[timm.vgg11]",
    "test_libraries.py::test_family_streams_exactly[timm.hrnet_w18_small]",
    "test_libraries.py::test_family_streams_exactly[smp.UnetPlusPlus]",
    "test_libraries.py::test_family_streams_exactly[smp.DeepLabV3Plus.encoder]",
    "test_libraries.py::test_family_rejected_with_category_and_boundary[smp.MAnet]",
    "test_libraries.py::test_family_streams_exactly[timm.dla34]",
    "test_libraries.py::test_family_streams_exactly[smp.Linknet]",
    "test_libraries.py::test_family_streams_exactly[torchvision.shufflenet_v2]",
    "test_libraries.py::test_flexible_unet_traces_and_streams_whole",
    "test_libraries.py::test_family_rejected_with_category_and_boundary[timm.efficientnet_b0]",
    "test_libraries.py::test_family_rejected_with_category_and_boundary[timm.regnety_002]",
    # Library models that once were false rejections (dpn68, VNet, vgg16 at 224 px, skresnet,
    # tresnet, Segformer, ...): their ops run in the fast tier through test_false_rejections.py.
    "test_libraries_more.py",
    # Global statistics in library models (DeepLabV3, smp FPN/PSPNet/UPerNet, MONAI BasicUNet,
    # EfficientNet, ConvNeXt-V2); test_statistics.py's zoo covers every kind in the fast tier.
    "test_statistics_libraries.py",
    # Processes: a 2-rank gloo tile group with statistics, ranks with different images, and
    # `python -m fxstream` in a subprocess; the slides example's --quick run.
    "test_statistics_parallel.py",
    "test_hostile_group.py",
    "test_cli.py::test_python_dash_m_subprocess",
    "test_slides_example.py",
    # Memory truth: the fast tier keeps the ResNet and 3-D U-Net cases under both schedules
    # and the carry-against-recompute check; the stripe placements' profiler runs are slow.
    "test_memory_truth.py::test_banded_stripes_hold_one_band",
    "test_memory_truth.py::test_measured_peak_is_predicted_for_each_placement[stripes-*]",
    "test_memory_truth.py::test_measured_peak_is_predicted[stripes-*]",
    # The automatic-choice examples of docs/planning.md (the fixed ones stay).
    "test_docs_planning.py::test_example_output_is_current[auto*]",
    # The closed-form split widths on the larger input size, and fxstream plan at 10^6 x 10^6
    # under carry.
    "test_plan_speed.py::test_fast_widths_and_splits_equal_the_walk[size0-*]",
    "test_plan_speed.py::test_plan_of_a_million_by_a_million_resnet18[recompute]",
]


def _pattern(entry: str) -> re.Pattern:
    return re.compile(".*".join(map(re.escape, entry.split("*"))))


def _key(item) -> str:
    """``file.py::test_name[params]`` of a collected test."""
    return f"{item.path.name}::{item.name}"


def mark(items, slow_marker) -> list[str]:
    """Mark the slow tier among ``items`` (see the module docstring). Returns the stale
    entries: those naming a collected file but none of its tests."""
    patterns = {entry: _pattern(entry) for entry in SLOW}
    used = set()
    files = {item.path.name for item in items}
    for item in items:
        key = _key(item)
        base = key.split("[")[0]  # an entry without [params] names every parametrisation
        hits = [e for e, p in patterns.items() if "::" in e and (p.fullmatch(key) or p.fullmatch(base))]
        hits += [e for e in SLOW if e == item.path.name]  # a whole file
        used.update(hits)
        params = getattr(getattr(item, "callspec", None), "params", {})
        second_schedule = params.get("schedule") == "recompute" and item.path.name not in BOTH_SCHEDULES
        if hits or second_schedule:
            item.add_marker(slow_marker)
    return [e for e in SLOW if e not in used and e.split("::")[0] in files]
