"""Packaging keeps working: ``python -m build`` makes an sdist and, from it, a wheel; the
wheel holds every module of the source tree and ``py.typed``, and once installed into a
fresh virtual environment its ``fxstream`` command plans a model.

The packages are discovered from the source tree (every folder under ``fxstream/`` with
Python files), not listed here, so a new subpackage that the build leaves out fails.
The build runs without isolation (``--no-isolation``: the installed setuptools, no
download); the fresh environment sees the running interpreter's site-packages for torch
and the other dependencies, but not the source tree.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

import fxstream

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fxstream"
IGNORED = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache"}

pytestmark = pytest.mark.slow  # about 20 s: in `make test-all` and CI, not in the fast tier

MODEL = """
import torch.nn as nn


def build():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2),
    )
"""


def run(cmd, **options) -> subprocess.CompletedProcess:
    """``cmd`` with its output captured as text, at most five minutes."""
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **options)


def source_modules() -> set[str]:
    """Every ``.py`` file of the package in the source tree, as wheel paths."""
    return {
        path.relative_to(ROOT).as_posix()
        for path in PACKAGE.rglob("*.py")
        if not IGNORED.intersection(path.relative_to(ROOT).parts)
    }


def source_packages() -> set[str]:
    """Every folder of the package with Python files in it, as a dotted name."""
    return {str(Path(module).parent).replace("/", ".") for module in source_modules()}


def copy_tree(dest: Path) -> Path:
    """The project's files (tracked and untracked-but-not-ignored when git knows the tree),
    so the build sees no stale ``*.egg-info`` or ``build/`` of the working tree."""
    try:
        listed = run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT, check=True)
        listed = listed.stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        listed = None
    if listed is None:
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(*IGNORED, "*.egg-info"))
        return dest
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():  # a deleted but still tracked file is skipped
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("build", reason="python -m build is in the test extra: pip install -e '.[test]'")
    tmp = tmp_path_factory.mktemp("packaging")
    tree = copy_tree(tmp / "tree")
    dist = tmp / "dist"
    proc = run([sys.executable, "-m", "build", "--no-isolation", "--outdir", dist, tree])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, os.listdir(dist)
    return {"wheel": wheels[0], "sdist": sdists[0], "tmp": tmp}


def test_wheel_has_every_module_and_py_typed(built):
    names = set(zipfile.ZipFile(built["wheel"]).namelist())
    modules = source_modules()
    assert len(modules) > 10 and "fxstream/__init__.py" in modules  # the discovery found the package
    missing = sorted(modules - names)
    assert not missing, f"modules of the source tree missing from the wheel: {missing}"
    packages = {str(Path(n).parent).replace("/", ".") for n in names if n.endswith(".py")}
    assert source_packages() <= packages
    assert "fxstream/py.typed" in names
    assert not [n for n in names if n.startswith("tests/")], "tests are not part of the wheel"
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(built["wheel"]).read(metadata).decode()
    assert f"Version: {fxstream.__version__}\n" in text  # pyproject and fxstream.__version__ agree
    assert "License-Expression: Apache-2.0" in text
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "fxstream = fxstream.cli:main" in zipfile.ZipFile(built["wheel"]).read(entry_points).decode()


def test_sdist_has_the_sources_license_and_citation(built):
    with tarfile.open(built["sdist"]) as sdist:
        top = sdist.getnames()[0].split("/")[0]
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    for required in ("pyproject.toml", "README.md", "LICENSE", "CITATION.cff", "CHANGELOG.md", "fxstream/py.typed"):
        assert required in names
    assert not sorted(source_modules() - names)
    tracked = {p.relative_to(ROOT).as_posix() for d in ("tests", "examples") for p in (ROOT / d).glob("*.py")}
    assert not sorted(tracked - names), "the sdist holds the tests and examples (MANIFEST.in)"
    assert top == f"fxstream-{fxstream.__version__}"


def test_installed_wheel_runs_the_command(built, tmp_path):
    """Install the wheel (no dependencies) into a fresh venv whose only other packages are
    the running interpreter's site-packages (torch etc.), then run the ``fxstream`` command
    (``fxstream plan`` on a small model file) from an empty directory, without PYTHONPATH."""
    venv = built["tmp"] / "venv"
    run([sys.executable, "-m", "venv", venv], check=True)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bindir / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    install = run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", built["wheel"]], env=env)
    assert install.returncode == 0, install.stdout + install.stderr
    # Then the dependencies: the running interpreter's site-packages, as plain path lines
    # (after the venv's own, and without running the outer editable install's finder).
    purelib = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True, env=env)
    purelib = purelib.stdout.strip()
    outer = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if os.path.isdir(p)]
    Path(purelib, "outer-site-packages.pth").write_text("\n".join(dict.fromkeys(outer)) + "\n")
    empty = tmp_path / "cwd"
    empty.mkdir()
    probe = (
        "import fxstream, importlib.resources as r; print(fxstream.__file__); print(r.files('fxstream') / 'py.typed')"
    )
    where = run([python, "-c", probe], cwd=empty, env=env)
    assert where.returncode == 0, where.stderr
    location, typed = map(Path, where.stdout.splitlines())
    assert location.is_relative_to(venv) and typed.is_file(), where.stdout  # the wheel's copy, not the tree's
    command = bindir / "fxstream"  # the console script (the entry point), run by its path
    (empty / "model.py").write_text(MODEL)
    plan = run(
        [command, "plan", "model.py:build", "--input-shape", "1,3,64,64", "--tile-size", "32", "--format", "json"],
        cwd=empty,
        env=env,
    )
    assert plan.returncode == 0, plan.stdout + plan.stderr
    report = json.loads(plan.stdout)
    assert report["schema"] == "fxstream.plan/1" and report["num_tiles"] > 1, plan.stdout  # really tiled


def test_version_is_the_same_everywhere():
    """The package version, CITATION.cff's and the CHANGELOG's newest section agree (a
    release bumps all three)."""
    with open(os.path.join(ROOT, "CITATION.cff")) as f:
        cff = re.search(r"^version: (\S+)$", f.read(), re.M).group(1)
    with open(os.path.join(ROOT, "CHANGELOG.md")) as f:
        newest = re.search(r"^## (\S+)", f.read(), re.M).group(1)
    assert cff == newest == fxstream.__version__
