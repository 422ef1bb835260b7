"""What decoding an encoded slice may cost, bounded from its structure before it is decoded.

The header (:mod:`emprocess.imageinfo`) bounds the pixels; this module bounds the work
a small file can ask of a decoder besides its pixels, by walking the file's chunks or
markers (a jump per chunk, a C-speed search through JPEG scan data), never its pixels:

- PNG: the zlib data (IDAT) may be at most what the pixels can take deflated at worst
  (a 16 x 16 PNG followed by a GiB of zlib data is refused, not inflated for minutes),
  at most ``MAX_ANCILLARY_CHUNKS`` ancillary chunks (1,000 zTXt chunks are refused)
  and ``MAX_ANCILLARY_BYTES`` of them, and the file ends at IEND.
- JPEG: at most ``MAX_JPEG_SCANS`` scans (a progressive JPEG whose last scan is
  repeated 1,000 times decodes its whole image 1,000 times), at most
  ``MAX_JPEG_SEGMENTS`` marker segments, and the file ends at EOI.
- Both: at most ``MAX_TRAILING_BYTES`` after the end marker.

TIFF strips and tiles are read by size and offset, so their cost follows the pixels.
"""

from __future__ import annotations

import math
import re
import struct

from emprocess.errors import InvalidInput
from emprocess.imageinfo import PNG_SIGNATURE

MAX_TRAILING_BYTES = 4096
"""Bytes allowed after PNG's IEND or JPEG's EOI (padding some writers add)."""
MAX_ANCILLARY_CHUNKS = 64
"""PNG chunks besides IHDR, PLTE, IDAT and IEND (text, colour profile, ...): a slice has a few."""
MAX_ANCILLARY_BYTES = 8 << 20
MAX_PNG_CHUNKS = 1_000_000
"""All PNG chunks: IDAT is split into chunks of 8 KiB or more, so 8 GB of pixel data."""
MAX_JPEG_SCANS = 64
"""A progressive JPEG has about 10 scans (6 for grey), optimised encoders a few dozen."""
MAX_JPEG_SEGMENTS = 4096
# Deflate at its worst (fixed Huffman codes on incompressible bytes) grows data by 1/8;
# zlib's own bound is 1/4096. Plus a MiB for headers and tiny images.
_DEFLATE_GROWTH = 1.125
_DEFLATE_SLACK = 1 << 20
# Inside JPEG scan data, 0xFF is followed by 0x00 (a stuffed byte), a restart marker
# (0xD0-0xD7) or a fill byte 0xFF; any other byte ends the scan.
_JPEG_MARKER = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9


def check_structure(data: bytes, name: str) -> None:
    """Refuse a PNG or JPEG whose decoding would cost more than its pixels; TIFF passes.

    Args:
        data: the whole file (its header already read and its pixels bounded).
        name: how to call it in error messages (its URL).

    Raises:
        InvalidInput: naming the file and the bound it breaks.
    """
    if data.startswith(PNG_SIGNATURE):
        _check_png(data, name)
    elif data.startswith(b"\xff\xd8"):
        _check_jpeg(data, name)


def _png_max_idat_bytes(width: int, height: int, depth: int, colour: int, interlace: int) -> int:
    samples = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 4)
    row_bytes = 1 + math.ceil(width * samples * depth / 8)
    raw = row_bytes * height + (7 * height if interlace else 0)  # Adam7: a filter byte a pass
    return int(raw * _DEFLATE_GROWTH) + _DEFLATE_SLACK


def _check_png(data: bytes, name: str) -> None:
    if len(data) < 33:
        raise InvalidInput(f"{name} is a PNG cut short ({len(data)} bytes)")
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    max_idat = _png_max_idat_bytes(width, height, depth, colour, interlace)
    idat = ancillary = ancillary_bytes = chunks = 0
    i = 8
    while True:
        if i + 12 > len(data):
            raise InvalidInput(f"{name} is a PNG cut short: no IEND chunk ({len(data)} bytes)")
        length, kind = struct.unpack(">I4s", data[i : i + 8])
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise InvalidInput(f"{name} is a PNG of more than {MAX_PNG_CHUNKS} chunks")
        if kind == b"IDAT":
            idat += length
            if idat > max_idat:
                raise InvalidInput(
                    f"{name} holds more than {idat} bytes of PNG pixel data, over the "
                    f"{max_idat} its {width}x{height} px can take compressed"
                )
        elif kind == b"IEND":
            i += 12 + length
            break
        elif kind[0] & 0x20:  # lower-case first letter: ancillary
            ancillary += 1
            ancillary_bytes += length
            if ancillary > MAX_ANCILLARY_CHUNKS or ancillary_bytes > MAX_ANCILLARY_BYTES:
                raise InvalidInput(
                    f"{name} holds more than {MAX_ANCILLARY_CHUNKS} ancillary PNG chunks or "
                    f"{MAX_ANCILLARY_BYTES} bytes of them ({kind.decode('latin-1')!r} is "
                    f"number {ancillary}, {ancillary_bytes} bytes so far)"
                )
        i += 12 + length
    _check_trailing(len(data) - i, name, "PNG", "IEND")


def _check_jpeg(data: bytes, name: str) -> None:
    scans = segments = 0
    i = 2
    while True:
        if i + 2 > len(data):
            raise InvalidInput(f"{name} is a JPEG cut short: no EOI marker ({len(data)} bytes)")
        if data[i] != 0xFF:
            raise InvalidInput(f"{name} is a JPEG with a broken marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == _JPEG_EOI:
            i += 2
            break
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise InvalidInput(f"{name} is a JPEG of more than {MAX_JPEG_SEGMENTS} segments")
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        if i + 4 > len(data):
            raise InvalidInput(f"{name} is a JPEG cut short at byte {i}")
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        i += 2 + length
        if marker == _JPEG_SOS:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise InvalidInput(
                    f"{name} is a JPEG of more than {MAX_JPEG_SCANS} scans (each decodes the "
                    "whole image again)"
                )
            found = _JPEG_MARKER.search(data, i)
            if found is None:
                raise InvalidInput(f"{name} is a JPEG cut short in scan {scans}: no EOI marker")
            i = found.start()
    _check_trailing(len(data) - i, name, "JPEG", "EOI")


def _check_trailing(extra: int, name: str, kind: str, end: str) -> None:
    if extra > MAX_TRAILING_BYTES:
        raise InvalidInput(
            f"{name} has {extra} bytes after its {kind} {end}, over the limit of "
            f"{MAX_TRAILING_BYTES}"
        )
