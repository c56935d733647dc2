"""Issue 19 on image files (fxstream.slides): each case failed before its fix.

1. a TIFF rewritten between the forward and the backward pass raises InputChangedError
   (or, where the decoded tiles are still cached, gives the forward image's gradients);
6. a truncated or corrupt TIFF raises ImageFileError naming the path, the level and the
   region; a directory and a non-integer level are refused by name;
7. a pickled SlideArray reopened after its file changed shape raises ImageFileError.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from exactness import RTOL64, rel_err

import fxstream

tifffile = pytest.importorskip("tifffile")
pytest.importorskip("zarr")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 2, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


def compiled(tile_size=12):
    torch.manual_seed(0)
    return fxstream.compile(Net().double(), tile_size=tile_size, input_transform=fxstream.Normalize(scale=1 / 255))


def write_tiff(path, image: np.ndarray, compression="zlib") -> None:
    """A tiled two-level TIFF of ``image`` (H, W, 3 uint8); level 1 is ``image[::2, ::2]``."""
    with tifffile.TiffWriter(path) as tw:
        for level, data in enumerate((image, image[::2, ::2])):
            extra = {"subifds": 1} if level == 0 else {"subfiletype": 1}
            tw.write(data, tile=(16, 16), photometric="rgb", compression=compression, **extra)


def rgb(seed: int, shape=(40, 36)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def backward(smodel, image):
    out = smodel(image)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return torch.autograd.grad(out, list(smodel.parameters()), grad)


def as_tensor(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]


# --- 1. a file rewritten between the forward and the backward pass ------------------------------


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_tiff_rewritten_between_forward_and_backward_raises(tmp_path, compression):
    """Without a decoded-tile cache the backward pass reads the file again: the rewritten
    pixels raise InputChangedError, or, where the rewrite moved the compressed tiles, the
    reader fails with ImageFileError. Never gradients of a mix of two images."""
    path = tmp_path / "slide.tif"
    write_tiff(path, rgb(0), compression)
    smodel = compiled()
    out = smodel(fxstream.open_image(path, cache_bytes=0))
    write_tiff(path, rgb(1), compression)  # in place: the open reader now reads the new bytes
    changed = fxstream.InputChangedError
    with pytest.raises(changed if compression is None else (changed, fxstream.ImageFileError)) as info:
        out.sum().backward()
    assert str(path) in str(info.value) or isinstance(info.value, fxstream.InputChangedError)
    assert all(p.grad is None for p in smodel.parameters())


def test_tiff_rewritten_with_the_tiles_cached_gives_the_forward_images_gradients(tmp_path):
    path = tmp_path / "slide.tif"
    write_tiff(path, rgb(0), None)
    smodel = compiled()
    reference = backward(smodel, as_tensor(rgb(0)))
    slide = fxstream.open_image(path)  # the default cache holds every decoded tile of this small file
    out = smodel(slide)
    write_tiff(path, rgb(1), None)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    try:
        grads = torch.autograd.grad(out, list(smodel.parameters()), grad)
    except fxstream.InputChangedError:
        return  # also not silent
    assert max(rel_err(a, b) for a, b in zip(grads, reference)) <= RTOL64


# --- 6. corrupt files, directories, levels -----------------------------------------------------


def test_truncated_tiff_names_the_path_level_and_region(tmp_path):
    path = tmp_path / "truncated.tif"
    write_tiff(path, rgb(0, (64, 48)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    slide = fxstream.open_image(path, cache_bytes=0)  # the header is intact
    with pytest.raises(fxstream.ImageFileError) as info:
        compiled()(slide)
    message = str(info.value)
    assert info.value.path == str(path) and str(path) in message
    assert "level 0" in message and "truncated or corrupt" in message
    assert "rows [" in message and "columns [" in message, message


def test_corrupt_tiff_tile_names_the_path_level_and_region(tmp_path):
    path = tmp_path / "corrupt.tif"
    write_tiff(path, rgb(0, (64, 48)))
    tile_offset = tifffile.TiffFile(path).pages[0].dataoffsets[5]
    data = bytearray(path.read_bytes())
    data[tile_offset : tile_offset + 16] = bytes(range(16))  # garbage in one compressed tile
    path.write_bytes(bytes(data))
    slide = fxstream.open_image(path, cache_bytes=0)
    with pytest.raises(fxstream.ImageFileError, match=r"level 0, rows \[\d+, \d+\), columns \[\d+, \d+\)") as info:
        slide[:, :, 10:30, 5:40]
    assert str(path) in str(info.value) and "Error" in str(info.value)  # the reader's own error is named
    with pytest.raises(fxstream.ImageFileError):
        compiled()(slide)


def test_corrupt_tiff_metadata_names_the_path_and_level(tmp_path):
    path = tmp_path / "metadata.tif"
    write_tiff(path, rgb(0))
    data = path.read_bytes()
    assert data.count(b'"shape": [40, 36, 3]') == 1
    path.write_bytes(data.replace(b'"shape": [40, 36, 3]', b'"shape": [40,: W, 3]'))  # tifffile's own JSON
    with pytest.raises(fxstream.ImageFileError, match="opening level 0.*truncated or corrupt") as info:
        fxstream.open_image(path)
    assert info.value.path == str(path) and str(path) in str(info.value)


def test_directory_and_non_integer_level(tmp_path):
    with pytest.raises(fxstream.ImageFileError, match="is a directory") as info:
        fxstream.open_image(tmp_path)
    assert "no such file" not in str(info.value)
    path = tmp_path / "slide.tif"
    write_tiff(path, rgb(0))
    with pytest.raises(fxstream.ArgumentError, match=r"level must be an int.*1\.7"):
        fxstream.open_image(path, level=1.7)
    with pytest.raises(fxstream.ArgumentError, match="backend"):
        fxstream.open_image(path, backend="pillow")
    assert fxstream.open_image(path, level=np.int64(1)).shape == (1, 3, 20, 18)  # integers of any kind


# --- 7. a pickled handle reopened after its file changed ----------------------------------------


def test_pickled_slide_reopened_after_its_file_shrank(tmp_path):
    path = tmp_path / "slide.tif"
    write_tiff(path, rgb(0, (40, 36)))
    handle = pickle.dumps(fxstream.open_image(path))
    write_tiff(path, rgb(0, (24, 20)))
    slide = pickle.loads(handle)
    with pytest.raises(fxstream.ImageFileError, match="changed since it was opened") as info:
        slide[:, :, :4, :4]
    message = str(info.value)
    assert "40x36" in message and "24x20" in message and "fix:" in message and info.value.path == str(path)
    # a closed handle reopens with the same check
    same = fxstream.open_image(path)
    same.close()
    write_tiff(path, rgb(0, (40, 36)))
    with pytest.raises(fxstream.ImageFileError, match="changed since it was opened"):
        compiled()(same)
    # unchanged: reopening reads as before
    again = pickle.loads(handle)
    assert np.array_equal(again[0], rgb(0, (40, 36)).transpose(2, 0, 1))
