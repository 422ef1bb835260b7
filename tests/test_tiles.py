"""Tiled-slice objects: round trips, one-range-read access, edge tiles, corruption."""

from __future__ import annotations

import itertools
import struct
import zlib
from pathlib import Path

import cv2
import google_crc32c
import numpy as np
import pytest

from emprocess.errors import InvalidInput
from emprocess.kernels.tiles import (
    build_header,
    decode_tile,
    decode_tiled_slice,
    encode_tile,
    encode_tiled_slice,
    header_nbytes,
    parse_header,
    tile_byte_range,
)


def texture(h: int, w: int, dtype: type = np.uint8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 200, (h // 30 + 2, w // 30 + 2)).astype(np.float32)
    img = cv2.resize(coarse, (w, h)) + rng.normal(0, 10, (h, w))
    img = np.clip(img, 0, 255)
    return (img if dtype == np.uint8 else img * 250).astype(dtype)


@pytest.mark.parametrize("codec", ["png", "raw"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_round_trip_with_partial_edge_tiles(codec: str, dtype: type) -> None:
    img = texture(700, 1100, dtype)
    buf = encode_tiled_slice(img, tile_px=256, codec=codec)  # type: ignore[arg-type]
    out = decode_tiled_slice(buf)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, img)
    index = parse_header(buf, width=1100, height=700, tile_px=256)
    assert index.grid_xy == (5, 3)
    assert index.tile_shape_hw(4, 2) == (700 - 512, 1100 - 1024)
    assert index.tile_shape_hw(0, 0) == (256, 256)


def test_one_tile_from_two_range_reads() -> None:
    """What /ngshard does: read the header (length known from bbox), then one tile."""
    width, height, t = 2500, 1900, 1024
    img = texture(height, width, seed=1)
    obj = encode_tiled_slice(img, t, threads=2)
    n_head = header_nbytes(width, height, t)
    assert n_head == 20 + 8 * 7 + 4 * 6 + 4
    head = obj[:n_head]  # range read 1
    for ty in range(2):
        for tx in range(3):
            start, end = tile_byte_range(head, tx, ty)
            index = parse_header(head, width=width, height=height, tile_px=t)
            tile = decode_tile(index, tx, ty, obj[start:end])  # range read 2
            np.testing.assert_array_equal(tile, img[ty * t : (ty + 1) * t, tx * t : (tx + 1) * t])
    assert tile.shape == (1900 - 1024, 2500 - 2048)
    with pytest.raises(InvalidInput, match="outside"):
        tile_byte_range(head, 3, 0)


def test_streamed_assembly_equals_one_shot_encoding() -> None:
    """The service may encode tiles window by window, then write header + tiles."""
    img = texture(300, 500, seed=2)
    tiles = [
        encode_tile(img[y : y + 128, x : x + 128])
        for y in range(0, 300, 128)
        for x in range(0, 500, 128)
    ]
    header = build_header(500, 300, 128, np.uint8, "png", tiles)
    assert header + b"".join(tiles) == encode_tiled_slice(img, 128)
    with pytest.raises(InvalidInput, match="expected 12 tiles"):
        build_header(500, 300, 128, np.uint8, "png", tiles[:-1])


def test_truncated_and_corrupt_buffers_raise() -> None:
    img = texture(300, 260, seed=3)
    obj = encode_tiled_slice(img, 128, codec="png")
    n_head = header_nbytes(260, 300, 128)
    for cut in (0, 10, 19, n_head - 1, len(obj) - 1):
        with pytest.raises(InvalidInput):
            decode_tiled_slice(obj[:cut])
    bad_header = bytearray(obj)
    bad_header[30] ^= 0xFF  # inside the offsets table
    with pytest.raises(InvalidInput, match="corrupt"):
        parse_header(bytes(bad_header))
    index = parse_header(obj)
    start, end = index.byte_range(1, 1)
    payload = bytearray(obj[start:end])
    payload[len(payload) // 2] ^= 0x01
    with pytest.raises(InvalidInput, match="corrupt"):
        decode_tile(index, 1, 1, bytes(payload))
    with pytest.raises(InvalidInput, match="needs"):
        decode_tile(index, 1, 1, obj[start : end - 1])
    with pytest.raises(InvalidInput, match="not a tiled slice"):
        parse_header(b"PNG!" + obj[4:])
    with pytest.raises(InvalidInput, match="width 260, expected 261"):
        parse_header(obj, width=261)


def test_a_payload_that_passes_the_crc_but_does_not_decode_raises() -> None:
    img = texture(64, 64, seed=4)
    garbage = [b"\x89PNG not really"]
    header = build_header(64, 64, 64, np.uint8, "png", garbage)
    index = parse_header(header)
    with pytest.raises(InvalidInput, match="did not decode"):
        decode_tile(index, 0, 0, garbage[0])
    raw = build_header(64, 64, 64, np.uint8, "raw", [img.tobytes()[:-1]])
    with pytest.raises(InvalidInput, match="raw tile"):
        decode_tile(parse_header(raw), 0, 0, img.tobytes()[:-1])


def test_header_layout_is_little_endian_and_documented() -> None:
    obj = encode_tiled_slice(np.zeros((3, 5), np.uint8), 4, codec="raw")
    magic, version, codec, dtype, tile, w, h = struct.unpack_from("<4sHBBIII", obj)
    assert (magic, version, codec, dtype, tile, w, h) == (b"EMTS", 2, 0, 1, 4, 5, 3)
    offsets = struct.unpack_from("<3Q", obj, 20)
    assert offsets == (header_nbytes(5, 3, 4), header_nbytes(5, 3, 4) + 12, len(obj))
    # Version 2 checksums are CRC-32C (google-crc32c), of each tile and of the header.
    size = header_nbytes(5, 3, 4)
    crcs = struct.unpack_from("<3I", obj, 20 + 24)
    assert crcs == (
        google_crc32c.value(obj[offsets[0] : offsets[1]]),
        google_crc32c.value(obj[offsets[1] : offsets[2]]),
        google_crc32c.value(obj[: size - 4]),
    )


def test_version_1_objects_with_zlib_crc32_still_read() -> None:
    img = texture(70, 50, seed=6)
    v2 = encode_tiled_slice(img, 32, codec="raw")
    index = parse_header(v2)  # rebuilt below as a version 1 object
    n = len(index.crcs)
    head = bytearray(v2[: header_nbytes(70, 50, 32)])
    struct.pack_into("<H", head, 4, 1)
    payloads = [v2[a:b] for a, b in itertools.pairwise(index.offsets)]
    struct.pack_into(f"<{n}I", head, 20 + 8 * (n + 1), *(zlib.crc32(p) for p in payloads))
    struct.pack_into("<I", head, len(head) - 4, zlib.crc32(bytes(head[:-4])))
    v1 = bytes(head) + v2[len(head) :]
    assert parse_header(v1).version == 1
    np.testing.assert_array_equal(decode_tiled_slice(v1), img)
    # The version says the checksum: a version 2 header relabelled 1 is refused.
    relabelled = bytearray(v2)
    struct.pack_into("<H", relabelled, 4, 1)
    with pytest.raises(InvalidInput, match="corrupt"):
        parse_header(bytes(relabelled))


def test_png_beats_raw_on_real_em_data(real_slices: tuple[Path, Path]) -> None:
    a = cv2.imread(str(real_slices[0]), cv2.IMREAD_UNCHANGED)
    assert a.dtype == np.uint8
    png = encode_tiled_slice(a, 256, codec="png")
    raw = encode_tiled_slice(a, 256, codec="raw")
    assert len(png) < 0.8 * len(raw)
    np.testing.assert_array_equal(decode_tiled_slice(png), a)
