"""Array-like inputs and slide files (fxstream.arrays, fxstream.transfer, fxstream.slides).

An array-like image (numpy array or memmap, zarr array, a TIFF pyramid level opened with
fxstream.open_image) gives bit for bit the outputs and parameter gradients of the same
image as a tensor (float64, several tiles, sizes that are multiples of nothing), reads only
tile regions, pickles as a handle through DataLoader workers, and fails with a clear
FxStreamError that leaves the file untouched. The peak-RSS bound on a 20,000 x 20,000
image runs in a subprocess (tests/slides_rss.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from exactness import RTOL64, rel_err

import fxstream
from fxstream.io import arrays, slides, transfer
from fxstream.runtime import channels

tifffile = pytest.importorskip("tifffile")  # the 'slides' extra, installed by the 'test' extra
zarr = pytest.importorskip("zarr")

try:
    import openslide  # noqa: F401

    HAVE_OPENSLIDE = True
except (ImportError, OSError):  # openslide-python without the library (openslide-bin)
    HAVE_OPENSLIDE = False

MEAN, STD, SCALE = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1 / 255
HERE = pathlib.Path(__file__).resolve().parent


class Net(nn.Module):
    def __init__(self, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2, padding_mode="reflect")
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv2(self.pool(F.relu(self.conv1(x))))).mean((2, 3)))


def make(in_channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return Net(in_channels).double().eval()


def run(smodel, x, seed=3):
    """Output and parameter gradients of ``smodel(x)`` for a fixed output gradient."""
    out = smodel(x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return out.detach(), torch.autograd.grad(out, list(smodel.parameters()), grad)


def assert_identical(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert torch.equal(out_a, out_b)
    assert len(grads_a) == len(grads_b)
    for ga, gb in zip(grads_a, grads_b):
        assert torch.equal(ga, gb)


def write_pyramid(path, image: np.ndarray, tile=16, **options) -> list[np.ndarray]:
    """A tiled pyramidal TIFF of ``image`` (H, W, S): level k is ``image[::2**k, ::2**k]``.
    Returns the levels."""
    levels = [image, image[::2, ::2]]
    with tifffile.TiffWriter(path) as tw:
        tw.write(levels[0], tile=(tile, tile), subifds=1, compression="zlib", **options)
        tw.write(levels[1], tile=(tile, tile), subfiletype=1, compression="zlib", **options)
    return levels


def fingerprint(path) -> tuple:
    data = pathlib.Path(path).read_bytes()
    stat = os.stat(path)
    return hashlib.sha256(data).hexdigest(), stat.st_size, stat.st_mtime_ns


class Recording:
    """A numpy-backed array-like that records every index it is read with, and the thread."""

    def __init__(self, array: np.ndarray):
        self.array, self.shape, self.dtype = array, array.shape, array.dtype
        self.reads: list[tuple] = []
        self.threads: set[str] = set()

    def __getitem__(self, key):
        self.reads.append(key)
        self.threads.add(threading.current_thread().name)
        return self.array[key]


# --- exactness: array-likes against the same image as a tensor ---------------------------


def _numpy(x, tmp_path):
    return x.numpy().copy()


def _memmap(x, tmp_path):
    m = np.lib.format.open_memmap(tmp_path / "image.npy", mode="w+", dtype=np.float64, shape=tuple(x.shape))
    m[...] = x.numpy()
    m.flush()
    return np.load(tmp_path / "image.npy", mmap_mode="r")


def _zarr(x, tmp_path):
    z = zarr.create_array(store={}, shape=tuple(x.shape), chunks=(1, 3, 8, 8), dtype="float64")
    z[...] = x.numpy()
    return z


@pytest.mark.parametrize("make_array", [_numpy, _memmap, _zarr], ids=["numpy", "memmap", "zarr"])
def test_array_like_equals_tensor(schedule, make_array, tmp_path):
    model = make()
    smodel = fxstream.compile(model, tile_size=14)
    x = torch.randn(2, 3, 37, 29, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert len(smodel.shape_plan(37, 29).tiles) >= 4
    array = make_array(x, tmp_path)
    assert_identical(run(smodel, array), run(smodel, x))
    assert rel_err(smodel(array).detach(), model(x).detach()) <= RTOL64  # and exact against the plain model


@pytest.mark.parametrize(
    ("level", "cache_bytes"), [(0, slides.DEFAULT_CACHE_BYTES), (1, slides.DEFAULT_CACHE_BYTES), (0, 0)]
)
def test_tiff_pyramid_level_equals_tensor(schedule, tmp_path, level, cache_bytes):
    """uint8 RGB pyramid, per-tile Normalize; aligned (cached) and direct reads."""
    rng = np.random.default_rng(level)
    path = tmp_path / "slide.tif"
    levels = write_pyramid(path, rng.integers(0, 256, (75, 58, 3), dtype=np.uint8), photometric="rgb")
    smodel = fxstream.compile(make(), tile_size=14, input_transform=fxstream.Normalize(MEAN, STD, scale=SCALE))
    slide = fxstream.open_image(path, level=level, cache_bytes=cache_bytes)
    tensor = torch.from_numpy(levels[level]).permute(2, 0, 1)[None].contiguous()
    assert slide.shape == tuple(tensor.shape) and slide.file_tile == (16, 16)
    assert len(smodel.shape_plan(*slide.shape[2:]).tiles) >= 4
    assert_identical(run(smodel, slide), run(smodel, tensor))


@pytest.mark.parametrize("layout", ["planar", "grey"])
def test_tiff_layouts(tmp_path, layout):
    """Planar RGB (SYX) and single-channel (YX) files read as (1, C, H, W)."""
    rng = np.random.default_rng(5)
    path = tmp_path / "slide.tif"
    if layout == "planar":
        image = rng.integers(0, 256, (3, 40, 35), dtype=np.uint8)
        tifffile.imwrite(path, image, tile=(16, 16), photometric="rgb", planarconfig="separate")
        tensor = torch.from_numpy(image)[None]
    else:
        image = rng.integers(0, 256, (40, 35), dtype=np.uint8)
        tifffile.imwrite(path, image, tile=(16, 16), photometric="minisblack")
        tensor = torch.from_numpy(image)[None, None]
    slide = fxstream.open_image(path)
    assert slide.shape == tuple(tensor.shape)
    assert np.array_equal(slide[0, :, 3:29, 30:35], tensor[0, :, 3:29, 30:35].numpy())
    smodel = fxstream.compile(make(tensor.shape[1]), tile_size=14, input_transform=fxstream.Normalize(scale=SCALE))
    assert_identical(run(smodel, slide), run(smodel, tensor))


def test_slide_slicing_matches_numpy(tmp_path):
    """Basic slicing of a SlideArray (steps, negative steps, ints, ...) equals numpy's."""
    path = tmp_path / "slide.tif"
    image = np.random.default_rng(2).integers(0, 256, (53, 70, 3), dtype=np.uint8)
    write_pyramid(path, image, photometric="rgb")
    ref = image.transpose(2, 0, 1)[None]
    slide = fxstream.open_image(path)
    keys = [(0, slice(None), slice(10, 40), slice(33, 70)), (slice(None), 1, slice(5, 50, 3), slice(None, None, -7))]
    keys += [(..., 5, 7), (0, slice(0, 2), -1), (slice(1, 1),)]
    for key in keys:
        assert np.array_equal(slide[key], ref[key]), key
    assert np.array_equal(np.asarray(slide), ref)
    picked = fxstream.open_image(path, channels=[2, 0])
    assert np.array_equal(picked[0, :, 4:9, 1:60], ref[0, [2, 0], 4:9, 1:60])


def test_tiled_reads_are_aligned_and_decode_shared_file_tiles_once(tmp_path):
    """Reads of a tiled file fetch whole file tiles (aligned boxes), and a neighbouring
    read that overlaps (an fxstream halo) decodes only the file tiles not yet cached."""
    path = tmp_path / "slide.tif"
    image = np.random.default_rng(8).integers(0, 256, (100, 90, 3), dtype=np.uint8)
    write_pyramid(path, image, photometric="rgb")
    slide = fxstream.open_image(path)
    reader = slide._open()
    boxes = []
    read_box = reader._read_box
    reader._read_box = lambda *box: boxes.append(box) or read_box(*box)
    ref = image.transpose(2, 0, 1)[None]
    assert np.array_equal(slide[0, :, 5:40, 3:37], ref[0, :, 5:40, 3:37])
    assert np.array_equal(slide[0, :, 5:40, 20:70], ref[0, :, 5:40, 20:70])  # overlaps columns 20..37
    assert np.array_equal(slide[0, :, 5:40, 21:60], ref[0, :, 5:40, 21:60])  # all cached
    assert boxes == [(0, 48, 0, 48), (0, 48, 48, 80)]  # (y0, y1, x0, x1) on the 16-pixel grid


@pytest.mark.skipif(
    not HAVE_OPENSLIDE, reason="openslide-python/openslide-bin not installed (the 'test' extra has them)"
)
def test_openslide_backend_reads_the_same_pixels(tmp_path):
    """A generic tiled TIFF through OpenSlide equals tifffile's pixels (level 0, and a
    level whose downsample is exactly 2)."""
    path = tmp_path / "slide.tif"
    image = np.random.default_rng(4).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    with tifffile.TiffWriter(path) as tw:  # levels as top-level pages: OpenSlide's generic TIFF layout
        tw.write(image, tile=(16, 16), photometric="rgb", compression="zlib")
        tw.write(image[::2, ::2], tile=(16, 16), photometric="rgb", compression="zlib", subfiletype=1)
    for level in (0, 1):
        via_openslide = fxstream.open_image(path, level, backend="openslide")
        via_tifffile = fxstream.open_image(path, level, backend="tifffile")
        assert via_openslide.backend == "openslide" and via_openslide.shape == via_tifffile.shape
        assert np.array_equal(via_openslide[0, :, 3:30, 5:41], via_tifffile[0, :, 3:30, 5:41])


# --- what is read, and when ----------------------------------------------------------------


def test_reads_only_tile_regions_in_a_background_thread():
    smodel = fxstream.compile(make(), tile_size=14)
    x = np.random.default_rng(0).standard_normal((1, 3, 37, 29))
    recording = Recording(x)
    out = smodel(recording)
    torch.autograd.grad(out.sum(), list(smodel.parameters()))
    tiles = smodel.shape_plan(37, 29).tiles
    regions = [tuple(slice(lo, hi) for lo, hi in tile.region) for tile in tiles]
    assert all(key[:2] == (slice(None), slice(None)) for key in recording.reads)
    forward, backward = recording.reads[: len(tiles)], recording.reads[len(tiles) :]
    assert [key[2:] for key in forward] == regions  # every tile once, in order
    assert len(backward) <= len(tiles) and all(key[2:] in regions for key in backward)
    assert recording.threads == {"fxstream-read_0"}


def test_memmap_regions_are_read_through_the_file(tmp_path):
    """Memmap views of any layout (header offset, channel-last, reversed and strided axes,
    big-endian) read the same pixels as numpy, as native tensors."""
    rng = np.random.default_rng(6)
    image = rng.integers(0, 2**16, (2, 3, 23, 19), dtype=np.uint16)
    path = tmp_path / "image.raw"
    path.write_bytes(b"header!" + image.transpose(0, 2, 3, 1).astype(">u2").tobytes())
    channel_last = np.memmap(path, dtype=">u2", mode="r", offset=7, shape=(2, 23, 19, 3))
    views = [channel_last.transpose(0, 3, 1, 2), channel_last.transpose(0, 3, 1, 2)[:, ::-1, 2:, ::3]]
    refs = [image, image[:, ::-1, 2:, ::3]]
    for view, ref in zip(views, refs):
        for index in [(slice(None),) * 4, (slice(1, 2), slice(0, 2), slice(5, 17), slice(1, 6)), (0, 2, 3)]:
            assert isinstance(view[index], np.memmap) and arrays.read_memmap(view[index]) is not None
            tile = arrays.read_region(view, index)
            assert tile.dtype == torch.uint16 and np.array_equal(tile.numpy(), ref[index])


def test_load_tiles_yields_fresh_tensors_for_any_source():
    x = torch.arange(2 * 3 * 9 * 7, dtype=torch.float64).view(2, 3, 9, 7)
    regions = [((0, 4), (1, 7)), ((3, 9), (0, 5))]
    for image in (x, x.numpy(), transfer.as_source(x.numpy())):
        loaded = list(transfer.load_tiles(image, regions, (2, 3), torch.device("cpu")))
        assert [region for region, _ in loaded] == regions
        for region, tile in loaded:
            assert torch.equal(tile, transfer.crop(x, (2, 3), region))
            assert not np.shares_memory(tile.numpy(), x.numpy())
    source = transfer.as_source(x.numpy())
    assert (source.batch, source.channels, source.spatial_size) == (2, 3, (9, 7))
    assert not source.differentiable and source.dtype == torch.float64


def test_no_input_gradient_for_array_likes():
    """An array-like is data: gradients flow to the parameters only (documented)."""
    smodel = fxstream.compile(make(), tile_size=14)
    out = smodel(np.random.default_rng(0).standard_normal((1, 3, 30, 22)))
    assert out.requires_grad and out.grad_fn is not None
    with torch.no_grad():
        assert not smodel(np.zeros((1, 3, 30, 22))).requires_grad


# --- batches --------------------------------------------------------------------------------


@pytest.mark.parametrize("whole_batch_head", [False, True])
def test_list_batch_of_array_likes(schedule, tmp_path, whole_batch_head):
    """Images of different kinds (and sizes, unless the head takes the whole batch) as one
    batch: the gradients of the same list of tensors, and of the plain model; a label
    tensor is split per image."""
    rng = np.random.default_rng(7)
    sizes = [(33, 26)] * 3 if whole_batch_head else [(21, 17), (33, 26), (15, 30)]
    path = tmp_path / "slide.tif"
    write_pyramid(path, rng.integers(0, 256, (*sizes[1], 3), dtype=np.uint8), photometric="rgb")
    slide = fxstream.open_image(path)
    tensors = [
        torch.from_numpy(rng.integers(0, 256, (1, 3, *sizes[0]), dtype=np.uint8)),
        torch.from_numpy(np.asarray(slide)),
        torch.from_numpy(rng.integers(0, 256, (1, 3, *sizes[2]), dtype=np.uint8)),
    ]
    z = zarr.create_array(store={}, shape=(1, 3, *sizes[2]), chunks=(1, 3, 4, 4), dtype="uint8")
    z[...] = tensors[2].numpy()
    images = [tensors[0].numpy(), slide, z]
    labels = torch.tensor([0, 1, 1])
    normalize = fxstream.Normalize(MEAN, STD, scale=SCALE)
    grads = []
    for inputs in (images, tensors):
        model = make()
        smodel = fxstream.compile(model, tile_size=14, input_transform=normalize)
        fxstream.serial_backward(smodel, F.cross_entropy, inputs, labels, whole_batch_head=whole_batch_head)
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    plain = make()
    loss = sum(F.cross_entropy(plain(normalize(t, torch.float64)), y[None]) for t, y in zip(tensors, labels))
    (loss / 3).backward()
    for a, p in zip(grads[0], plain.parameters()):
        assert rel_err(a, p.grad) <= RTOL64


def test_array_like_batch_is_split_without_reading():
    """A (3, C, H, W) array-like batch in micro-batches of 2: each read is one tile region
    of one micro-batch, never the whole batch."""
    x = np.random.default_rng(3).standard_normal((3, 3, 21, 17))
    y = torch.tensor([0, 1, 1])
    model = make()
    fxstream.serial_backward(fxstream.compile(model, tile_size=14), F.cross_entropy, torch.from_numpy(x), y, 2)
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    recording = Recording(x)
    fxstream.serial_backward(fxstream.compile(model, tile_size=14), F.cross_entropy, recording, y, 2)
    for a, p in zip(ref, model.parameters()):
        assert torch.equal(a, p.grad)
    assert {(key[0].start, key[0].stop) for key in recording.reads} == {(0, 2), (2, 3)}
    assert all(key[2] != slice(0, 21, 1) or key[3] != slice(0, 17, 1) for key in recording.reads)


def test_batch_view_slices_like_numpy():
    x = np.arange(4 * 2 * 5 * 3).reshape(4, 2, 5, 3)
    view = arrays.batch_slice(Recording(x), 1, 3)
    assert isinstance(view, arrays.BatchView) and view.shape == (2, 2, 5, 3) and len(view) == 2
    for key in [(1, slice(None), slice(2, 5)), (slice(None, None, -1), 0), (..., 1), (slice(1, 2), 1, -1, 0)]:
        assert np.array_equal(view[key], x[1:3][key]), key
    with pytest.raises(IndexError):
        view[None]
    assert isinstance(arrays.batch_slice(x, 1, 3), np.ndarray)  # numpy views are lazy already


def test_dataloader_workers_receive_and_send_handles(tmp_path):
    """SlideDataset through a DataLoader worker: the samples pickle as handles (no
    pixels), stay lazy after collate, and train."""
    rng = np.random.default_rng(9)
    items = []
    for i, size in enumerate([(40, 31), (27, 45)]):
        path = tmp_path / f"slide{i}.tif"
        write_pyramid(path, rng.integers(0, 256, (*size, 3), dtype=np.uint8), photometric="rgb")
        items.append((path, i % 2))
    dataset = fxstream.SlideDataset(items)
    assert len(pickle.dumps(dataset[0][0])) < 1024  # a handle: path, level, options, shape
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=1, collate_fn=slides.collate)
    ((images, labels),) = list(loader)
    assert [type(image) for image in images] == [fxstream.SlideArray] * 2
    assert all(image._reader is None for image in images)  # unpickled, not yet reopened
    assert [image.shape for image in images] == [(1, 3, 40, 31), (1, 3, 27, 45)]
    assert torch.equal(labels, torch.tensor([0, 1]))
    model = make()
    smodel = fxstream.compile(model, tile_size=14, input_transform=fxstream.Normalize(MEAN, STD, scale=SCALE))
    loss = fxstream.serial_backward(smodel, F.cross_entropy, images, labels)
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())


# --- errors -----------------------------------------------------------------------------------


def test_not_an_image(tmp_path):
    for name, data in [("notes.txt", b"hello, not pixels\n"), ("broken.tif", b"II*\x00garbage")]:
        path = tmp_path / name
        path.write_bytes(data)
        before = fingerprint(path)
        with pytest.raises(fxstream.ImageFileError, match="not an image fxstream can read") as info:
            fxstream.open_image(path)
        assert info.value.path == str(path) and isinstance(info.value, fxstream.FxStreamError)
        assert fingerprint(path) == before
    with pytest.raises(fxstream.ImageFileError, match="no such file"):
        fxstream.open_image(tmp_path / "missing.tif")


def test_missing_level(tmp_path):
    path = tmp_path / "slide.tif"
    write_pyramid(path, np.zeros((40, 36, 3), dtype=np.uint8), photometric="rgb")
    before = fingerprint(path)
    with pytest.raises(fxstream.LevelError, match=r"no level 2; its 2 levels .* 0: 40x36, 1: 20x18") as info:
        fxstream.open_image(path, level=2)
    assert info.value.levels == ((40, 36), (20, 18)) and isinstance(info.value, fxstream.ImageFileError)
    assert fingerprint(path) == before


def test_wrong_channel_count_before_any_read(tmp_path):
    """An RGBA file into an RGB model: a ChannelError naming the conv, raised before any
    pixel is read; the file is unchanged; channels=range(3) is the fix it names."""
    path = tmp_path / "rgba.tif"
    write_pyramid(path, np.random.default_rng(0).integers(0, 256, (40, 33, 4), dtype=np.uint8), photometric="rgb")
    before = fingerprint(path)
    smodel = fxstream.compile(make(), tile_size=14, input_transform=fxstream.Normalize(scale=SCALE))
    slide = fxstream.open_image(path)
    with pytest.raises(fxstream.ChannelError, match=r"4 channels, but module 'conv1' \(node 'conv1'\) reads 3") as info:
        smodel(slide)
    assert (info.value.expected, info.value.got, info.value.module_path) == (3, 4, "conv1")
    assert "channels=range(3)" in str(info.value)
    recording = Recording(np.zeros((1, 4, 40, 33)))
    with pytest.raises(fxstream.ChannelError):
        smodel(recording)
    assert recording.reads == []
    smodel(fxstream.open_image(path, channels=range(3)))  # the fix works
    normalize = fxstream.Normalize(MEAN, STD, scale=SCALE)
    with pytest.raises(fxstream.ChannelError, match="normalises 3"):
        fxstream.compile(make(4), tile_size=14, input_transform=normalize)(slide)
    assert fingerprint(path) == before


def test_array_like_of_a_dtype_torch_lacks():
    smodel = fxstream.compile(make(), tile_size=14)
    with pytest.raises(fxstream.InputShapeError, match="dtype <U1"):
        smodel(np.full((1, 3, 20, 20), "a"))


def test_expected_channels_is_unknown_through_pointwise_ops():
    """The channel check only trusts convolutions the image reaches through windows."""

    class Shifted(Net):
        def forward(self, x):
            return super().forward(x - 0.5)

    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    for model, want in [(Net(), 3), (Shifted(), None), (grouped, 4)]:
        tile = fxstream.compile(model.double().eval(), tile_size=14).streamed_trunk.tile
        found = channels.expected(tile)
        assert (found.channels if found else None) == want


# --- memory ---------------------------------------------------------------------------------


def test_training_step_on_a_memmap_does_not_hold_the_image(tmp_path):
    """One training step on a 20,000 x 20,000 RGB uint8 memmap (1.2 GB): the process's
    peak RSS rises by at most 300 MB (measured in a fresh process, tests/slides_rss.py)."""
    size = 20_000
    shm = pathlib.Path("/dev/shm")  # a RAM file system: writing 1.2 GB there takes a second, not 15
    room = shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > 4 * 3 * size * size
    path = (shm / f"fxstream-test-{os.getpid()}.u8") if room else tmp_path / "image.u8"
    try:
        _write_image_file(path, size)
        result = _run_rss(path, size)
    finally:
        path.unlink(missing_ok=True)
    print(result)
    assert result["image_bytes"] == 3 * size * size
    assert result["tiles_per_pass"] >= 25
    assert result["peak_rise_bytes"] <= 300e6, result


def _run_rss(path, size: int) -> dict:
    cmd = [sys.executable, str(HERE / "slides_rss.py"), "--source", "memmap", "--path", str(path), "--size", str(size)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _write_image_file(path, size: int) -> None:
    """A (1, 3, size, size) uint8 raw file: a random block of an odd length, repeated."""
    block = np.random.default_rng(0).integers(0, 256, (16 << 20) + 4099, dtype=np.uint8).tobytes()
    remaining = 3 * size * size
    with open(path, "wb") as f:
        while remaining:
            n = min(len(block), remaining)
            f.write(block[:n])
            remaining -= n
