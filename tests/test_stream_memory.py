"""A slice in bounded memory gives the same bytes: block-wise intensity mapping, tiles
handed on in order while they are made, and objects written while they are made."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from emprocess import storage
from emprocess.errors import InvalidInput
from emprocess.kernels import intensity, tiles
from emprocess.kernels.clahe import clahe_source_region, clahe_window
from emprocess.kernels.downsample import shrink_mean
from emprocess.kernels.ngmeta import ScaleLayout
from emprocess.kernels.render import (
    render_slice,
    stream_slice,
    stream_source_tiles,
    thumbnail_factor,
)
from emprocess.kernels.warp import warp_window
from emprocess.services import pyramid
from emprocess.services.pyramid import Box, write_pyramid
from emprocess.storage import gcs as gcs_backend


def vectorised_to_uint8(image: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """The previous whole-array mapping (4x and 4.5x temporaries): the reference."""
    if window is None:
        if image.dtype == np.uint8:
            return image
        return ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    lut = intensity.window_lut(window, 256 if image.dtype == np.uint8 else 65536)
    return np.take(lut, image)


WINDOWS_16 = [None, (0.0, 65535.0), (100.0, 355.0), (1000.5, 1200.25), (2000.0, 53000.0)]
WINDOWS_8 = [None, (0.0, 255.0), (10.0, 30.0), (3.3, 4.4), (100.0, 101.0)]


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (97, 61), (40, 33, 3)])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_blockwise_mapping_equals_the_vectorised_one(
    shape: tuple[int, ...], dtype: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Blocks of 7 rows' worth (or one row when rows are longer), a partial last block.
    monkeypatch.setattr(intensity, "BLOCK_PIXELS", 7 * shape[1])
    rng = np.random.default_rng(sum(shape))
    top = np.iinfo(dtype).max
    image = rng.integers(0, top + 1, shape).astype(dtype)
    image.flat[:2] = [0, top]  # both ends of the range
    for window in WINDOWS_8 if dtype == np.uint8 else WINDOWS_16:
        got = intensity.to_uint8(image, window)
        want = vectorised_to_uint8(image, window)
        assert got.dtype == np.uint8 and got.shape == want.shape
        np.testing.assert_array_equal(got, want, err_msg=f"{dtype} {shape} {window}")


def test_blockwise_mapping_of_a_strided_channel() -> None:
    rgb = np.random.default_rng(1).integers(0, 65536, (50, 40, 3)).astype(np.uint16)
    plane = rgb[:, :, 1]  # a view, as the service's channels are
    np.testing.assert_array_equal(
        intensity.to_uint8(plane, (500.0, 60000.0)), vectorised_to_uint8(plane, (500.0, 60000.0))
    )
    np.testing.assert_array_equal(intensity.to_uint8(plane), vectorised_to_uint8(plane))


def test_tile_order_hands_tiles_on_row_major_as_soon_as_they_can() -> None:
    payloads = [bytes([i]) * (i + 1) for i in range(12)]  # 4 x 3 tiles of a 400 x 300 slice
    order = tiles.TileOrder(400, 300, 100, np.uint8, "raw")
    assert order.header_nbytes == tiles.header_nbytes(400, 300, 100)
    assert order.add(1, payloads[1]) == []  # waits for tile 0
    assert order.add(0, payloads[0]) == payloads[:2]
    with pytest.raises(InvalidInput, match="given twice"):
        order.add(1, payloads[1])
    rest = list(range(2, 12))
    random.Random(0).shuffle(rest)
    out = payloads[:2]
    for i in rest:
        with pytest.raises(InvalidInput, match="of 12 tiles"):
            order.header()
        out += order.add(i, payloads[i])
    assert out == payloads
    assert order.header() == tiles.build_header(400, 300, 100, np.uint8, "raw", payloads)


def reference_canvas(
    image8: np.ndarray, transform: list[float], bbox: tuple[int, int], clip: float
) -> np.ndarray:
    """The whole canvas in one piece (warp, CLAHE), held in memory: the reference."""
    width, height = bbox
    whole = (0, 0, width, height)
    canvas = warp_window(image8, transform, clahe_source_region(whole, (height, width)))
    return clahe_window(canvas, (0, 0), (height, width), whole, clip, preserve_zero=True)


TRANSFORM = [0.9986, 0.0523, -0.0523, 0.9986, 60.3, 20.7]  # 3 degrees, shifted


@pytest.mark.parametrize("codec", ["raw", "png"])
def test_streamed_tiles_equal_the_whole_canvas_tiled_at_once(codec: tiles.Codec) -> None:
    rng = np.random.default_rng(2)
    base = rng.integers(0, 4096, (60, 55)).astype(np.float32)
    image = cv2.resize(base, (2300, 2200), interpolation=cv2.INTER_CUBIC)
    image16 = np.clip(image * 8 + rng.normal(0, 30, image.shape), 0, 65535).astype(np.uint16)
    window = (1500.0, 30000.0)
    bbox = (2500, 2400)  # 3 x 3 windows of 1024 px, 3 x 3 tiles: rows wait for their band
    image8 = vectorised_to_uint8(image16, window)
    want_canvas = reference_canvas(image8, TRANSFORM, bbox, 0.02)
    want = tiles.encode_tiled_slice(want_canvas, 1024, codec)

    streamed = stream_slice(
        image16, TRANSFORM, bbox, 0.02, window, tile_px=1024, window_px=1024, codec=codec
    )
    parts = []
    for part in streamed.parts:
        parts.append(part)
    assert b"".join([streamed.header(), *parts]) == want
    f = thumbnail_factor(*bbox)
    np.testing.assert_array_equal(streamed.thumbnail, shrink_mean(want_canvas, f))
    held = render_slice(image8, TRANSFORM, bbox, 0.02, tile_px=1024, window_px=2048, codec=codec)
    assert held.tiles_object == want


def test_streamed_source_tiles_equal_the_whole_warp() -> None:
    image = np.random.default_rng(3).integers(0, 65536, (1500, 1300)).astype(np.uint16)
    bbox = (2100, 1700)
    want = tiles.encode_tiled_slice(warp_window(image, TRANSFORM, (0, 0, *bbox)), 1024, "raw")
    got = stream_source_tiles(image, TRANSFORM, bbox, tile_px=1024, window_px=1024)
    assert got.join() == want


def test_written_while_made_reads_back_whole(
    bucket: str, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gcs_backend, "STREAM_CHUNK_BYTES", 256 << 10)  # 8 chunks on GCS
    url = f"gs://{bucket}/run/aligned/000001.tiles"
    parts = [bytes([i]) * 100_000 for i in range(20)]
    made = []

    def each() -> Iterator[bytes]:
        for p in parts:
            made.append(p)
            yield p

    storage.write_stream(url, each(), lambda: b"HEAD" * 4, 16)
    assert storage.read_bytes(url) == b"HEAD" * 4 + b"".join(parts)
    assert made == parts
    # Again with other bytes: the object is replaced whole, no temporary object is left.
    storage.write_stream(url, iter([b"xyz"]), lambda: b"ab", 2)
    assert storage.read_bytes(url) == b"abxyz"
    assert storage.list_keys(f"gs://{bucket}/run/") == ["run/aligned/000001.tiles"]


def test_a_failed_stream_leaves_the_old_object(bucket: str, local_root: Path, backend: str) -> None:
    url = f"gs://{bucket}/run/x.tiles"
    storage.write_bytes(url, b"old")

    def broken() -> Iterator[bytes]:
        yield b"part"
        raise RuntimeError("rendering failed")

    with pytest.raises(RuntimeError, match="rendering failed"):
        storage.write_stream(url, broken(), lambda: b"h", 1)
    with pytest.raises(storage.StorageError, match="reserved"):
        storage.write_stream(url, iter([b"p"]), lambda: b"too long", 1)
    assert storage.read_bytes(url) == b"old"
    assert storage.list_keys(f"gs://{bucket}/run/") == ["run/x.tiles"]
    if backend == "local":
        assert sorted(p.name for p in (local_root / bucket / "run").iterdir()) == ["x.tiles"]


class VolumeInMemory:
    """A writer that places every block into one array per scale, counting the blocks."""

    def __init__(self, boxes: list[Box], channels: int) -> None:
        self.lo = [lo for lo, _ in boxes]
        self.scales = [
            np.full((hi[2] - lo[2], hi[1] - lo[1], hi[0] - lo[0], channels), 7, np.uint8)
            for lo, hi in boxes
        ]
        self.blocks = [0] * len(boxes)

    def write(self, scale: int, lo_xyz: tuple[int, int, int], data_zyx: np.ndarray) -> None:
        x, y, z = (a - b for a, b in zip(lo_xyz, self.lo[scale], strict=True))
        nz, ny, nx = data_zyx.shape[:3]
        self.scales[scale][z : z + nz, y : y + ny, x : x + nx] = data_zyx
        self.blocks[scale] += 1


@pytest.mark.parametrize("anisotropic", [False, True])
def test_a_big_cube_written_in_columns_equals_one_slab(
    anisotropic: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 64 x 60 (an edge cube) x 40 cube of 4 channels; scale-0 shards of 32^3.
    steps = [(1, 1, 1), (2, 2, 1 if anisotropic else 2), (4, 4, 2 if anisotropic else 4)]
    layouts = [ScaleLayout(f, (64 // f[0], 64 // f[1], 64 // f[2]), (8, 8, 8), (32, 32, 32)) for f in steps]  # fmt: skip
    boxes: list[Box] = [((0, 0, 0), (64 // f[0], -(-60 // f[1]), -(-40 // f[2]))) for f in steps]
    vol = np.random.default_rng(4).integers(0, 256, (40, 60, 64, 4), np.uint8)
    reads: list[tuple[int, int, tuple[int, int, int, int]]] = []

    def read(z_lo: int, z_hi: int, box: tuple[int, int, int, int]) -> np.ndarray:
        reads.append((z_lo, z_hi, box))
        x0, y0, x1, y1 = box
        return vol[z_lo:z_hi, y0:y1, x0:x1].copy()

    whole = VolumeInMemory(boxes, 4)
    write_pyramid(read, boxes, layouts, [whole], 32, voxel_bytes=4)
    assert [r[2] for r in reads] == [(0, 0, 64, 60)] * 2  # 2 slabs, each whole
    reads.clear()
    monkeypatch.setattr(pyramid, "MAX_BLOCK_BYTES", 32 * 64 * 60 * 4 - 1)
    columns = VolumeInMemory(boxes, 4)
    write_pyramid(read, boxes, layouts, [columns], 32, voxel_bytes=4)
    assert [r[2] for r in reads[:4]] == [(0, 0, 32, 32), (32, 0, 64, 32), (0, 32, 32, 60), (32, 32, 64, 60)]  # fmt: skip
    assert len(reads) == 8 and columns.blocks == [8, 1, 1]
    for s in range(3):
        np.testing.assert_array_equal(columns.scales[s], whole.scales[s], err_msg=f"scale {s}")
    assert (whole.scales[0] == vol).all()
