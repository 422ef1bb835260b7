"""Hostile image files against both services (issue 20 items 2, 4, 9): headers that lie,
CPU bombs and damaged files, each refused before its pixels are decoded.

Each case asserts, as tests/test_hostile.py does (its ``attack``), a fast 400 whose
message names the file and what is wrong, the gunicorn worker's peak RSS bounded, and
/health afterwards. The files are small and built here: a TIFF listing its size twice
(libtiff would take the first, 32,768^2), BitsPerSample stored as SSHORT, a BigTIFF
whose directory lies near 2^64, a progressive JPEG whose last scan is repeated 1,000
times, bytes after IEND / EOI, a 16 x 16 PNG followed by 8 MB of zlib data, 1,000 zTXt
chunks, and a JPEG whose scan data was cut (OpenCV decodes it silently).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from conftest import point_storage, unique_bucket
from test_hostile import (  # noqa: F401  (fixtures)
    RUN_ID,
    Service,
    _chunk,
    _local_root,
    align,
    attack,
    emwrite,
    zero_png,
)

from emprocess import storage
from emprocess.errors import InvalidInput
from emprocess.imagebounds import MAX_JPEG_SCANS, check_structure
from emprocess.imageinfo import UnreadableHeader, image_header
from emprocess.images import check_image, decode_image
from emprocess.layout import RunLayout

# -- crafted files ---------------------------------------------------------------------


def _texture(side: int = 256, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 255, (side, side), np.uint8), (0, 0), 2.0)


def tiff(entries: list[tuple[int, int, int, bytes]], pixels: bytes = bytes(16)) -> bytes:
    """A little-endian classic TIFF: ``entries`` as (tag, type, count, 4 inline bytes), in
    the order given, and one strip of ``pixels`` after the directory."""
    ifd = 8
    data_at = ifd + 2 + 12 * (len(entries) + 2) + 4
    all_entries = [
        *entries,
        (273, 4, 1, struct.pack("<I", data_at)),  # StripOffsets
        (279, 4, 1, struct.pack("<I", len(pixels))),  # StripByteCounts
    ]
    body = struct.pack("<H", len(all_entries))
    for tag, kind, count, value in all_entries:
        body += struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\x00")
    return b"II*\x00" + struct.pack("<I", ifd) + body + b"\x00" * 4 + pixels


def _short(v: int) -> bytes:
    return struct.pack("<H", v)


def duplicated_size_tiff() -> bytes:
    """ImageWidth and ImageLength listed twice: 32,768 first (libtiff's), 4 last."""
    return tiff(
        [
            (256, 3, 1, _short(32768)),
            (256, 3, 1, _short(4)),
            (257, 3, 1, _short(32768)),
            (257, 3, 1, _short(4)),
            (258, 3, 1, _short(8)),
            (262, 3, 1, _short(1)),
        ]
    )


def sshort_bits_tiff() -> bytes:
    """A valid 4 x 2 16-bit grey TIFF whose BitsPerSample is stored as SSHORT (type 8)."""
    return tiff(
        [(256, 3, 1, _short(4)), (257, 3, 1, _short(2)), (258, 8, 1, _short(16)),
         (262, 3, 1, _short(1))],
        pixels=np.arange(8, dtype="<u2").tobytes(),
    )  # fmt: skip


def far_bigtiff() -> bytes:
    """A BigTIFF whose first directory is at byte 2^64 - 16."""
    return b"II+\x00" + struct.pack("<HHQ", 8, 0, 2**64 - 16) + bytes(16)


def repeated_scan_jpeg(repeats: int = 1000) -> bytes:
    """A progressive JPEG whose last scan is repeated ``repeats`` times before EOI."""
    ok, encoded = cv2.imencode(".jpg", _texture(), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert ok
    data = encoded.tobytes()
    last = data.rindex(b"\xff\xda")
    return data[:last] + data[last:-2] * repeats + b"\xff\xd9"


def trailing(data: bytes, extra: int = 1 << 20) -> bytes:
    return data + bytes(extra)


def zlib_tail_png(extra: int = 8 << 20) -> bytes:
    """A 16 x 16 grey PNG whose pixel data goes on with ``extra`` bytes of zlib data."""
    raw = b"".join(b"\x00" + bytes(range(16)) for _ in range(16))
    ihdr = _chunk(b"IHDR", struct.pack(">IIBBBBB", 16, 16, 8, 0, 0, 0, 0))
    noise = np.random.default_rng(0).bytes(extra)  # incompressible: zlib data of its size
    stream = zlib.compressobj(1)
    body = stream.compress(raw) + stream.compress(noise) + stream.flush()
    idats = b"".join(_chunk(b"IDAT", body[i : i + (1 << 20)]) for i in range(0, len(body), 1 << 20))
    return b"\x89PNG\r\n\x1a\n" + ihdr + idats + _chunk(b"IEND", b"")


def ztxt_png(chunks: int = 1000) -> bytes:
    """A valid 16 x 16 PNG with ``chunks`` zTXt chunks before its pixels."""
    png = cv2.imencode(".png", _texture(16))[1].tobytes()
    text = _chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"a" * 100_000))
    return png[:33] + text * chunks + png[33:]


def cut_scan_jpeg() -> bytes:
    """A JPEG with 2,000 bytes cut from the middle of its scan data (EOI kept)."""
    data = cv2.imencode(".jpg", _texture(512))[1].tobytes()
    middle = (data.index(b"\xff\xda") + len(data)) // 2
    return data[:middle] + data[middle + 2000 :]


FILES = {
    "dup.tif": duplicated_size_tiff,
    "far.tif": far_bigtiff,
    "scans.jpg": lambda: repeated_scan_jpeg(100),  # 1,000 is over align's file bound here
    "tail.png": lambda: trailing(cv2.imencode(".png", _texture())[1].tobytes()),
    "tail.jpg": lambda: trailing(cv2.imencode(".jpg", _texture())[1].tobytes()),
    "zlib.png": zlib_tail_png,
    "ztxt.png": ztxt_png,
    "cut.jpg": cut_scan_jpeg,
}
REFUSALS = [
    ("dup.tif", "lists tag 256 twice"),
    ("far.tif", "beyond any slice file"),
    ("scans.jpg", f"more than {MAX_JPEG_SCANS} scans"),
    ("tail.png", "bytes after its PNG IEND"),
    ("tail.jpg", "bytes after its JPEG EOI"),
    ("zlib.png", "bytes of PNG pixel data"),
    ("ztxt.png", "ancillary PNG chunks"),
    ("cut.jpg", "is damaged"),
]


def test_crafted_files_are_what_they_claim() -> None:
    """Each file does what it is built to: the decoders that trust it are fooled."""

    import pyvips  # libtiff reads the header (lazily: no pixel is decoded)

    assert pyvips.Image.tiffload_buffer(duplicated_size_tiff()).width == 32768
    assert image_header(sshort_bits_tiff()).bits == 16  # libtiff reads SSHORT too
    scans = repeated_scan_jpeg()
    assert scans.count(b"\xff\xda") > 1000
    with pytest.raises(InvalidInput, match=f"more than {MAX_JPEG_SCANS} scans"):
        check_structure(scans, "scans.jpg")
    assert cv2.imdecode(np.frombuffer(cut_scan_jpeg(), np.uint8), 0) is not None  # silently
    png = zlib_tail_png()
    assert len(png) > 8 << 20
    assert cv2.imdecode(np.frombuffer(png, np.uint8), 0).shape == (16, 16)
    assert ztxt_png().count(b"zTXt") == 1000


@pytest.mark.parametrize(("key", "message"), REFUSALS)
def test_refused_in_process(key: str, message: str) -> None:
    """decode_image (both services' decoder) refuses each file, naming it."""
    with pytest.raises(InvalidInput, match=message) as caught:
        decode_image(FILES[key](), key)
    assert key in str(caught.value)


def test_header_reads_every_integer_type_and_refuses_lies() -> None:
    assert decode_image(sshort_bits_tiff(), "s.tif").tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(UnreadableHeader, match="tag 256 twice"):
        image_header(duplicated_size_tiff())
    with pytest.raises(UnreadableHeader, match="non-integer field type 5"):
        image_header(tiff([(256, 5, 1, _short(4)), (257, 3, 1, _short(4))]))
    with pytest.raises(UnreadableHeader, match="negative value"):
        image_header(tiff([(256, 8, 1, _short(0xFFFF)), (257, 3, 1, _short(4))]))


def test_valid_files_pass_the_structure_check() -> None:
    image = _texture()
    for ext, params in [
        (".png", []),
        (".jpg", []),
        (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
        (".tif", []),
    ]:
        data = cv2.imencode(ext, image, params)[1].tobytes()
        check_structure(data, ext)
        assert decode_image(data, ext).shape == image.shape
    # a few bytes of padding after the end marker are allowed
    check_structure(cv2.imencode(".png", image)[1].tobytes() + bytes(100), "pad.png")


def test_bounds_count_the_decoders_peak() -> None:
    """A progressive JPEG holds its coefficients (2 bytes a sample) besides the array."""
    image = _texture()
    baseline = cv2.imencode(".jpg", image)[1].tobytes()
    progressive = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    assert decode_image(baseline, "b.jpg", max_decoded_bytes=256 * 256).shape == (256, 256)
    with pytest.raises(
        InvalidInput, match=r"196608 bytes decoded \(with the progressive JPEG.s coefficients"
    ):
        decode_image(progressive, "p.jpg", max_decoded_bytes=256 * 256)
    assert decode_image(progressive, "p.jpg", max_decoded_bytes=3 * 256 * 256).shape == (256, 256)


def test_the_largest_documented_slice_is_judged_by_its_header() -> None:
    """emwrite's largest slice, 32,768^2 8-bit, passes every check before decoding (its
    peak is its array); one row more, or 16 bits, is refused by the header alone."""
    limits = {"max_pixels": 32768 * 32768, "max_decoded_bytes": 1 << 30}
    assert check_image(zero_png(32768, 32768, 8, 0), "big.png", **limits).width == 32768
    for width, depth in ((32769, 8), (32768, 16)):
        with pytest.raises(InvalidInput, match="over the limit"):
            check_image(zero_png(width, 32768, depth, 0), "big.png", **limits)


# -- through the services ---------------------------------------------------------------


@pytest.fixture(scope="module")
def env(local_root: Path) -> Iterator[dict[str, Any]]:
    with pytest.MonkeyPatch.context() as mp:
        point_storage(mp, str(local_root))
        src = unique_bucket("hostile-img")
        run = RunLayout(src, RUN_ID)
        for b in (src, run.process, run.tmp):
            storage.create_bucket(b)
        storage.write_bytes(f"gs://{src}/good.png", cv2.imencode(".png", _texture())[1])
        for key, make in FILES.items():
            storage.write_bytes(f"gs://{src}/{key}", make())
        yield {
            "src": src,
            "tmp": run.tmp,
            "slice": {
                "transform": [1, 0, 0, 1, 0, 0], "bbox": [256, 256], "dest": src,
                "dest-tmp": run.tmp, "slice": 0, "run_id": RUN_ID,
            },
        }  # fmt: skip


@pytest.mark.parametrize(("key", "message"), REFUSALS)
def test_align_refuses(align: Service, env: dict, key: str, message: str) -> None:  # noqa: F811
    if key == "zlib.png":  # the file is over what its header allows align to read
        message = "bytes, the limit"
    pre, post = f"gs://{env['src']}/{key}", f"gs://{env['src']}/good.png"
    attack(align, "/", {"pre": pre, "post": post}, names=(pre, message), what=key)


@pytest.mark.parametrize(("key", "message"), REFUSALS)
def test_emwrite_refuses(emwrite: Service, env: dict, key: str, message: str) -> None:  # noqa: F811
    body = {**env["slice"], "img": key}
    attack(emwrite, "/alignedslice", body, names=(key, message), what=key)
    assert not storage.list_keys(f"gs://{env['tmp']}/")


def test_emwrite_refuses_a_slice_wider_than_the_warp_by_its_header(
    emwrite: Service,  # noqa: F811
    env: dict,
) -> None:
    """OpenCV's warp takes source sides up to 32,766 px: a 32,767 px wide slice (a few KB
    of PNG) is refused before it is decoded, naming the limit."""
    storage.write_bytes(f"gs://{env['src']}/wide.png", zero_png(32767, 16, 8, 0))
    body = {**env["slice"], "img": "wide.png", "bbox": [32767, 1024]}
    attack(emwrite, "/alignedslice", body, names=("wide.png", "32766 px"), what="wide.png")
    assert not storage.list_keys(f"gs://{env['tmp']}/")
