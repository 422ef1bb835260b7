"""Image size, bit depth and channels from the first bytes of a PNG, TIFF or JPEG file.

The one header reader of the project. ``validate`` reads only a slice's header (one range read) to check that all slices
have the same size, bit depth and channel count; a TIFF whose first directory lies
beyond those bytes costs one more range read at the directory's offset.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import NamedTuple

from emprocess.errors import InvalidInput

HEADER_BYTES = 64 * 1024
"""How much of each slice ``validate`` reads."""

ReadRange = Callable[[int, int], bytes]
"""Reads the byte range [start, end) of the same file."""

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_WIDTH, _TIFF_HEIGHT = 256, 257
_TIFF_BITS, _TIFF_SAMPLES = 258, 277
# PNG colour type -> channels as OpenCV decodes them (a palette becomes BGR).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
# TIFF field type -> (struct code, size in bytes) for the integer types a size may use.
_TIFF_INT_TYPES = {1: ("B", 1), 3: ("H", 2), 4: ("I", 4), 16: ("Q", 8)}
# JPEG start-of-frame markers (baseline, progressive, lossless, ...); not DHT/JPG/DAC.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class UnreadableHeader(InvalidInput):
    """The bytes are not a PNG, TIFF or JPEG header this module can read."""


class ImageHeader(NamedTuple):
    """What a slice's header says: size in pixels, bits per sample as decoded, channels."""

    width: int
    height: int
    bits: int  # 8 or 16: the sample size the decoder gives (1-, 2- and 4-bit PNGs give 8)
    channels: int  # 1 grey, 2 grey + alpha, 3 colour, 4 colour + alpha


def image_size_xy(header: bytes, read_range: ReadRange | None = None) -> tuple[int, int]:
    """The (width, height) in pixels of the image whose file starts with ``header``.

    A PNG needs its first 24 bytes; see :func:`image_header` for the other formats.
    """
    if header.startswith(PNG_SIGNATURE) and len(header) >= 24 and header[12:16] == b"IHDR":
        width, height = struct.unpack(">II", header[16:24])
        return int(width), int(height)
    info = image_header(header, read_range)
    return info.width, info.height


def image_header(header: bytes, read_range: ReadRange | None = None) -> ImageHeader:
    """Size, bit depth and channels of the image whose file starts with ``header``.

    Args:
        header: the first bytes of the file (for PNG 24 suffice; ``HEADER_BYTES`` is plenty
            for most TIFF and JPEG files).
        read_range: reads more of the same file when a TIFF directory lies beyond
            ``header``; without it such a file raises UnreadableHeader.

    Raises:
        UnreadableHeader: naming what was found instead of a size.
    """
    if header.startswith(PNG_SIGNATURE):
        return _png_header(header)
    if header[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return _tiff_header(header, read_range)
    if header.startswith(b"\xff\xd8"):
        return _jpeg_header(header)
    raise UnreadableHeader(f"not a PNG, TIFF or JPEG file (starts with {header[:8]!r})")


def _png_header(data: bytes) -> ImageHeader:
    if len(data) < 26 or data[12:16] != b"IHDR":
        raise UnreadableHeader("PNG without an IHDR chunk in its first 26 bytes")
    width, height = struct.unpack(">II", data[16:24])
    depth, colour = data[24], data[25]
    if colour not in _PNG_CHANNELS:
        raise UnreadableHeader(f"PNG with the unknown colour type {colour}")
    return ImageHeader(int(width), int(height), 16 if depth == 16 else 8, _PNG_CHANNELS[colour])


def _tiff_header(data: bytes, read_range: ReadRange | None) -> ImageHeader:
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    if big:
        (ifd,) = struct.unpack(order + "Q", data[8:16])
        count_fmt, count_size, entry_size = "Q", 8, 20
    else:
        (ifd,) = struct.unpack(order + "I", data[4:8])
        count_fmt, count_size, entry_size = "H", 2, 12

    def fetch(start: int, end: int) -> bytes:
        if end <= len(data):
            return data[start:end]
        if read_range is None:
            raise UnreadableHeader(
                f"TIFF whose first directory (bytes {start}..{end}) lies beyond the "
                f"{len(data)} bytes read"
            )
        return read_range(start, end)

    (count,) = struct.unpack(order + count_fmt, fetch(ifd, ifd + count_size))
    entries = fetch(ifd + count_size, ifd + count_size + count * entry_size)
    if len(entries) < count * entry_size:
        raise UnreadableHeader(f"TIFF whose first directory at byte {ifd} is truncated")
    sizes: dict[int, int] = {}
    for i in range(count):
        entry = entries[i * entry_size : (i + 1) * entry_size]
        head = 12 if big else 8
        tag, kind = struct.unpack(order + "HH", entry[:4])
        wanted = (_TIFF_WIDTH, _TIFF_HEIGHT, _TIFF_BITS, _TIFF_SAMPLES)
        if tag in wanted and kind in _TIFF_INT_TYPES:
            code, size = _TIFF_INT_TYPES[kind]
            # The first value: BitsPerSample repeats per sample, all equal in practice.
            (n,) = struct.unpack(order + ("Q" if big else "I"), entry[4:head])
            if n * size <= (8 if big else 4):
                (sizes[tag],) = struct.unpack(order + code, entry[head : head + size])
            else:
                (offset,) = struct.unpack(order + ("Q" if big else "I"), entry[head:])
                (sizes[tag],) = struct.unpack(order + code, fetch(offset, offset + size))
    if _TIFF_WIDTH not in sizes or _TIFF_HEIGHT not in sizes:
        raise UnreadableHeader("TIFF whose first directory has no ImageWidth/ImageLength")
    bits = sizes.get(_TIFF_BITS, 1)
    return ImageHeader(
        int(sizes[_TIFF_WIDTH]),
        int(sizes[_TIFF_HEIGHT]),
        16 if bits > 8 else 8,
        int(sizes.get(_TIFF_SAMPLES, 1)),
    )


def _jpeg_header(data: bytes) -> ImageHeader:
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise UnreadableHeader(f"JPEG with a broken marker at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker in _JPEG_SOF:
            if i + 10 > len(data):
                break
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            bits = 16 if data[i + 4] > 8 else 8
            return ImageHeader(int(width), int(height), bits, int(data[i + 9]))
        i += 2 + length
    raise UnreadableHeader("JPEG whose frame header is not within the bytes read")
