"""``fxstream plan``: every output format on torchvision resnet34 and on a hand-computed
custom DAG, the JSON schema's geometry against textbook values, and one-line errors with
exit status 2 for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxstream
from fxstream.cli import main

HERE = os.path.abspath(__file__)
ROOT = os.path.dirname(os.path.dirname(HERE))


class HandDAG(nn.Module):
    """A DAG whose geometry is computed by hand (image pixels read by output pixel j):

    a   = conv3 pad1              : [j-1, j+1]
    b1  = conv5 stride2 pad2 (a)  : a[2j-2, 2j+2]   -> image [2j-3, 2j+3]
    b2  = conv3 pad1 (maxpool2(a)): pool[j-1, j+1]  -> a[2j-2, 2j+3] -> image [2j-3, 2j+4]
    add = b1 + b2 (hull)          : image [2j-3, 2j+4]                  RF 8, stride 2
    out = conv3 dil2 pad2 (add)   : add[k-2, k+2]   -> image [2k-7, 2k+8]  RF 16, stride 2

    so the trunk has receptive field 16, stride 2 and halo (7, 7) per axis.
    """

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = nn.Conv2d(8, 8, 5, stride=2, padding=2)
        self.pool = nn.MaxPool2d(2)
        self.b2 = nn.Conv2d(8, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 4, 3, dilation=2, padding=2)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        a = F.relu(self.a(x))
        y = self.b1(a) + self.b2(self.pool(a))
        y = self.out(torch.tanh(y))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


HAND = f"{HERE}:HandDAG"


def run(capsys, *args) -> tuple[int, str, str]:
    code = main(["plan", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_json_resnet34_textbook_geometry(capsys):
    code, out, _ = run(
        capsys, "resnet34", "--input-shape", "1,3,8192,8192", "--tile-size", "2048", "--format", "json",
        "--memory-budget", "8GiB", "--schedule", "recompute",
    )  # fmt: skip
    assert code == 0
    data = json.loads(out)
    assert data["schema"] == "fxstream.plan/1" and data["schedule"] == "recompute"
    assert data["receptive_field"] == [899, 899] and data["stride"] == [32, 32]
    assert data["halo"] == [[449, 418], [449, 418]]
    assert data["tile_size"] == [2048, 2048] and data["output_block"] == [36, 36]
    # Interior tiles: 32*36 + 867 <= 2048. Border tiles read 418 px of halo on one side only,
    # so up to 50 output px fit: 256 = 2 borders + 5 interior blocks, evened out to at most 47.
    assert data["grid"] == [7, 7] and data["num_tiles"] == 49
    assert data["largest_block"] == [47, 47]
    assert data["boundary"] == "layer4_2_relu_1" and data["trunk_output_shape"] == [1, 512, 256, 256]
    assert data["nodes"][0]["name"] == "conv1" and data["nodes"][0]["kernel"] == [7, 7]
    assert data["nodes"][-1]["receptive_field"] == [899, 899]
    memory = data["memory"]
    streamed, plain = memory["streamed"]["training"]["bytes"], memory["plain"]["training"]["bytes"]
    assert streamed < 8 * 2**30 < plain and memory["fits"] is True and memory["budget"] == 8 * 2**30
    assert streamed == sum(memory["streamed"]["training"]["parts"].values())


def test_json_hand_computed_dag(capsys):
    code, out, _ = run(capsys, HAND, "--input-shape", "2,3,300,200", "--tile-size", "64", "--format", "json")
    assert code == 0
    data = json.loads(out)
    assert data["receptive_field"] == [16, 16] and data["stride"] == [2, 2]
    assert data["halo"] == [[7, 7], [7, 7]]
    assert data["output_block"] == [25, 25]  # 2*25 + 7 + 7 <= 64
    # trunk output 150x100: border blocks up to 28 (2*28 + 7 <= 64), interior 25: 6 x 4 blocks,
    # evened out to at most 27
    assert data["grid"] == [6, 4] and data["num_tiles"] == 24
    assert data["largest_block"] == [27, 27]
    nodes = {n["name"]: n for n in data["nodes"]}
    # An interior tile: 25 output pixels need add[-2, +2] = 29; a is read by b1 over 2*29+3 = 61
    # and by the pool over 2*31 = 62 pixels; the image region is the tile, 64.
    assert nodes["add"]["interior_region"] == [29, 29]
    assert nodes["a"]["interior_region"] == [62, 62]
    assert nodes["a"]["activation_bytes"] == 2 * 8 * 62 * 62 * 4  # batch 2, 8 channels, float32
    assert nodes["b1"]["receptive_field"] == [7, 7] and nodes["b2"]["receptive_field"] == [8, 8]
    assert nodes["out"]["dilation"] == [2, 2] and nodes["out"]["kernel"] == [3, 3] and nodes["out"]["extent"] == [5, 5]
    assert nodes["pool"]["kernel"] == [2, 2] and nodes["b1"]["op_stride"] == [2, 2]
    assert nodes["b1"]["padding"] == [[2, 2], [2, 2]] and nodes["add"]["kernel"] is None


def test_dot_marks_trunk_head_and_boundary(capsys):
    code, out, _ = run(capsys, HAND, "--input-shape", "1,3,64,64", "--tile-size", "32", "--format", "dot")
    assert code == 0
    assert out.startswith("digraph fxstream {") and out.rstrip().endswith("}")
    assert '"out" [label="out\\nmodule out", fillcolor="#f4a3a3", color="#c0392b", peripheries=2' in out
    assert '"a" [label="a\\nmodule a", fillcolor="#a9cce3"]' in out  # trunk
    assert '"fc" [label="fc\\nmodule fc", fillcolor="#e5e5e5"]' in out  # head
    assert '"b1" -> "add";' in out


EXPECTED = {
    "text": ["receptive field, stride     899x899 px, 32x32 px", "tile grid                   3x3 = 9 tiles"],
    "json": ['"receptive_field": [\n    899,'],
    "dot": [
        '"layer4_2_relu_1" [label="layer4_2_relu_1\\nrelu", fillcolor="#f4a3a3"',
        '"conv1" [label="conv1\\nmodule conv1", fillcolor="#a9cce3"',
    ],
    "code": ["torch.conv2d(", "fxstream_runtime_kernels_window("],
}


@pytest.fixture(autouse=True)
def recompute_default(monkeypatch):
    """Most figures below are the recompute schedule's (hand-computed grids and halos);
    test_carry_schedule_in_the_report checks the default, carry."""
    monkeypatch.setattr(fxstream.planning.schedule, "DEFAULT", "recompute")


def test_carry_schedule_in_the_report(capsys):
    code, out, _ = run(
        capsys, "resnet18", "--input-shape", "1,3,2048,2048", "--tile-size", "512", "--format", "json",
        "--schedule", "carry",
    )  # fmt: skip
    assert code == 0
    data = json.loads(out)
    assert data["schedule"] == "carry" and data["halo_overhead"] == 1.0
    assert abs(data["predicted_step_ratio"] - 4 / 3) < 1e-9 and data["stripe_store_bytes"] > 0
    code, out, _ = run(
        capsys, "resnet18", "--input-shape", "1,3,2048,2048", "--tile-size", "512", "--schedule", "carry"
    )
    assert "carry (stripes in host memory, prefetched to the device): predicted step time 1.33x plain" in out


def test_plan_of_a_unet_with_size_dependent_pads(capsys):
    """The memory model's probe run evaluates the size nodes of size-dependent pads (the
    usual U-Net fix-up ``F.pad(x, [dx // 2, ...])``); it used to fail on them."""
    unet = os.path.join(os.path.dirname(HERE), "dense_zoo.py") + ":UNet(base=4, depth=3, up='transpose', fixup='pad')"
    code, out, err = run(capsys, unet, "--input-shape", "1,3,301,257", "--tile-size", "160", "--format", "json")
    assert code == 0, err
    data = json.loads(out)
    assert data["num_tiles"] >= 4 and data["memory"]["streamed"]["training"]["bytes"] > 0


@pytest.mark.parametrize("fmt", ["text", "json", "dot", "code"])
@pytest.mark.parametrize("model", ["torchvision.models:resnet34", HAND], ids=["resnet34", "hand_dag"])
def test_every_format_smoke(capsys, model, fmt):
    code, out, err = run(capsys, model, "--input-shape", "1,3,4096,4096", "--tile-size", "2048", "--format", fmt)
    assert code == 0 and err == ""
    first = {"text": "node ", "json": "{", "dot": "digraph fxstream {", "code": "def forward(self, x, geometry, carry)"}
    first = first[fmt]
    assert out.startswith(first)
    if model == HAND:
        return
    for expected in EXPECTED[fmt]:
        assert expected in out
    if fmt == "text":  # one row per trunk node, then the summary
        rows = [line.split()[0] for line in out.split("\n\n")[0].splitlines()[2:]]
        assert rows[0] == "conv1" and rows[-1] == "layer4_2_relu_1" and len(rows) == 122


def test_png_draws_the_tile_grid(capsys, tmp_path):
    path = tmp_path / "tiles.png"
    code, out, _ = run(capsys, HAND, "--input-shape", "1,3,300,200", "--tile-size", "64", "--png", str(path))
    assert code == 0 and "tile grid" in out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_without_matplotlib_says_how_to_install(capsys, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, _, err = run(
        capsys, HAND, "--input-shape", "1,3,64,64", "--tile-size", "32", "--png", str(tmp_path / "x.png")
    )
    assert code == 2
    assert "pip install 'fxstream[plot]'" in err and len(err.strip().splitlines()) == 1


def test_model_kwargs_and_auto_choice(capsys):
    code, out, _ = run(
        capsys, "torchvision.models:resnet18(num_classes=7)", "--input-shape", "1,3,2048,2048", "--tile-size", "auto",
        "--boundary", "auto", "--memory-budget", "1GiB", "--format", "json",
    )  # fmt: skip
    assert code == 0
    data = json.loads(out)
    assert data["choice"].startswith("fxstream: chose tile_size=")
    assert data["memory"]["fits"] is True
    assert data["memory"]["streamed"]["training"]["bytes"] <= 2**30


def test_python_dash_m_subprocess():
    proc = subprocess.run(
        [sys.executable, "-m", "fxstream", "plan", "resnet34", "--input-shape", "1,3,8192,8192", "--tile-size", "2048",
         "--schedule", "recompute"],
        capture_output=True, text=True, cwd=ROOT, check=False, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "899x899 px, 32x32 px" in proc.stdout and "7x7 = 49 tiles" in proc.stdout


BAD = [
    (["no_such_model", "--input-shape", "1,3,64,64", "--tile-size", "64"], "unknown model spec 'no_such_model'"),
    (["resnt34", "--input-shape", "1,3,64,64", "--tile-size", "64"], "did you mean resnet34"),
    (["no.such.module:f", "--input-shape", "1,3,64,64", "--tile-size", "64"], "cannot import module 'no.such.module'"),
    (["torchvision.models:nope", "--input-shape", "1,3,64,64", "--tile-size", "64"], "has no attribute 'nope'"),
    (["/no/file.py:f", "--input-shape", "1,3,64,64", "--tile-size", "64"], "does not exist"),
    (["resnet18(num_classes=)", "--input-shape", "1,3,64,64", "--tile-size", "64"], "keyword=literal"),
    (["resnet18(nonsense=1)", "--input-shape", "1,3,64,64", "--tile-size", "64"], "building"),
    (["resnet18", "--input-shape", "1,3,abc", "--tile-size", "512"], "--input-shape must be"),
    (["resnet18", "--input-shape", "1,3,64", "--tile-size", "512"], "has 1 spatial dims, the trunk has 2"),
    (["resnet18", "--input-shape", "1,3,64,64", "--tile-size", "0"], "--tile-size must be"),
    (
        ["resnet18", "--input-shape", "1,3,64,64", "--tile-size", "100", "--schedule", "recompute"],
        "tile_size=100x100 is too small",
    ),
    (
        ["resnet18", "--input-shape", "1,3,4096,4096", "--tile-size", "100", "--schedule", "carry"],
        "under the carry schedule",
    ),
    (["resnet18", "--input-shape", "1,3,64,64", "--tile-size", "512", "--train"], "cannot stream BatchNorm2d"),
    (["resnet18", "--input-shape", "1,3,64,64", "--tile-size", "512", "--boundary", "nowhere"], "names no node"),
    (["resnet18", "--input-shape", "1,3,64,64", "--tile-size", "auto"], "need --memory-budget"),
    (["resnet18", "--input-shape", "1,3,64,64", "--tile-size", "512", "--memory-budget", "8XB"], "memory budget"),
    (["resnet18", "--input-shape", "1,3,4096,4096", "--tile-size", "auto", "--memory-budget", "1MiB"], "too small"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_input_one_line_exit_2(capsys, args, message):
    code, out, err = run(capsys, *args)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fxstream plan: error: "), err
    assert message in lines[0]
    assert "Traceback" not in err


def test_png_to_a_directory_or_unwritable_path_is_one_line(capsys, tmp_path):
    args = (HAND, "--input-shape", "1,3,64,64", "--tile-size", "32", "--png")
    for target, message in (
        (tmp_path, "is a directory"),
        (tmp_path / "missing" / "x.png", "does not exist"),
    ):
        code, out, err = run(capsys, *args, str(target))
        assert code == 2 and out == "" and message in err and len(err.strip().splitlines()) == 1, err
    assert list(tmp_path.iterdir()) == []  # nothing written, in particular no DIR.png next to it
    assert not os.path.exists(f"{tmp_path}.png")


def test_png_unwritable_is_one_line(capsys, tmp_path, monkeypatch):
    args = (HAND, "--input-shape", "1,3,64,64", "--tile-size", "32", "--png")
    monkeypatch.setattr("fxstream.cli.commands.os.access", lambda path, mode: False)  # as a non-root user would see
    code, _, err = run(capsys, *args, str(tmp_path / "x.png"))
    assert code == 2 and "permission denied" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr("fxstream.cli.commands._check_writable", lambda path: None)  # fail at the write itself
    code, _, err = run(capsys, *args, str(tmp_path / "missing" / "x.png"))
    assert code == 2 and "cannot write" in err and len(err.strip().splitlines()) == 1


def test_png_without_extension_writes_exactly_that_file(capsys, tmp_path):
    path = tmp_path / "tiles"
    code, _, _ = run(capsys, HAND, "--input-shape", "1,3,64,64", "--tile-size", "32", "--png", str(path))
    assert code == 0 and path.read_bytes()[:4] == b"\x89PNG" and not (tmp_path / "tiles.png").exists()


def test_malformed_command_line_is_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["plan", "resnet18", "--tile-size", "64"])  # --input-shape missing
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--input-shape" in err


def _plan_json(capsys, *args) -> dict:
    code, out, err = run(capsys, *args, "--format", "json")
    assert code == 0, err
    return json.loads(out)


def test_plan_splits_the_peak_into_device_and_host(capsys):
    """On an accelerator (the default --device cuda) the input is host-resident and carry's
    stripes live in host memory (stripes auto); --output-device cpu moves the trunk output,
    its gradient and the head there too. On a CPU everything is one memory."""
    args = ("resnet18", "--input-shape", "1,3,2048,2048", "--tile-size", "512", "--schedule", "carry")
    data = _plan_json(capsys, *args)
    training = data["memory"]["streamed"]["training"]
    assert data["device"] == "cuda" and data["stripes"] == "host" and data["output_device"] is None
    for where in ("device", "host"):
        assert training[f"{where}_bytes"] == sum(training[f"{where}_parts"].values()) > 0
    assert "input" in training["host_parts"] and "stripe store (host)" in training["host_parts"]
    assert not any(k in training["device_parts"] for k in ("input", "stripe store (host)", "stripe store"))
    assert max(training["device_bytes"], training["host_bytes"]) <= training["bytes"]
    assert training["bytes"] <= training["device_bytes"] + training["host_bytes"]

    on_host = _plan_json(capsys, *args, "--output-device", "cpu")["memory"]["streamed"]["training"]
    assert on_host["device_bytes"] < training["device_bytes"] and on_host["bytes"] == training["bytes"]
    assert "trunk output grad" in on_host["host_parts"] and "trunk output grad" not in on_host["device_parts"]

    cpu = _plan_json(capsys, *args, "--device", "cpu")
    assert cpu["stripes"] == "device" and cpu["device"] == "cpu"
    cpu_training = cpu["memory"]["streamed"]["training"]
    assert cpu_training["device_bytes"] == cpu_training["bytes"] and cpu_training["host_bytes"] == 0
    assert cpu_training["parts"]["stripe store"] == cpu["stripe_store_bytes"] > 0

    code, out, _ = run(capsys, *args, "--output-device", "cpu")
    assert code == 0 and "cuda device / host" in out and "trunk output and head on the host" in out


def test_plan_shows_banded_stripes_and_their_cost(capsys):
    args = ("resnet18", "--input-shape", "1,3,4096,2048", "--tile-size", "512", "--schedule", "carry")
    banded = _plan_json(capsys, *args, "--stripes", "banded", "--band-rows", "2")
    rows = banded["grid"][0]
    assert banded["stripes"] == "banded" and banded["band_rows"] == 2 and banded["bands"] == -(-rows // 2)
    assert banded["halo_overhead"] > 1.0  # band starts recompute their cones
    assert 4 / 3 < banded["predicted_step_ratio"] < 5 / 3 * banded["halo_overhead"]
    device = _plan_json(capsys, *args, "--stripes", "device")
    assert "stripe store" in device["memory"]["streamed"]["training"]["device_parts"]
    band = banded["memory"]["streamed"]["training"]["device_parts"]["stripe store (one band)"]
    assert 0 < band < device["stripe_store_bytes"] / 2
    code, out, _ = run(capsys, *args, "--stripes", "banded", "--band-rows", "2")
    assert code == 0 and f"banded: 2 tile rows per band, {banded['bands']} bands" in out


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--schedule", "recompute", "--stripes", "host"], "for the carry schedule"),
        (["--schedule", "carry", "--band-rows", "2"], "add --stripes banded"),
        (["--schedule", "carry", "--stripes", "banded", "--band-rows", "0"], "band_rows=0"),
    ],
)
def test_plan_bad_stripe_options(capsys, extra, message):
    code, _, err = run(capsys, "resnet18", "--input-shape", "1,3,512,512", "--tile-size", "256", *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_gigapixel_resnet34_fits_8_gib_on_the_device(capsys):
    """The target of issue 18: ResNet-34 on a 100,000² image at tile 2048, trunk output on the
    host: the device holds at most 8 GiB, whatever the image (a plan only: seconds)."""
    data = _plan_json(
        capsys, "resnet34", "--input-shape", "1,3,100000,100000", "--tile-size", "2048", "--output-device", "cpu",
        "--schedule", "carry",
    )  # fmt: skip
    training = data["memory"]["streamed"]["training"]
    assert data["grid"] == [50, 50] and data["stripes"] == "host"
    assert training["device_bytes"] <= 8 * 2**30
    assert training["host_parts"]["stripe store (host)"] == data["stripe_store_bytes"] > 30 * 2**30
    assert training["host_parts"]["input"] == 3 * 100_000**2 * 4
