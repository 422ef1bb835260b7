"""Image size, bit depth and pixel layout from the first bytes of a PNG, TIFF or JPEG file.

The one header reader of the project. The services size every image from its header
(:func:`image_layout`: pixels, channels and bytes per sample as OpenCV will decode it)
before decoding it, and refuse any other format by its header. ``validate`` reads only
a slice's header (one range read, :func:`image_header`) to check that all slices have
the same size, bit depth and channel count; a TIFF whose first directory lies beyond
those bytes costs one more range read at the directory's offset.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from typing import NamedTuple

from emprocess.errors import InvalidInput

HEADER_BYTES = 64 * 1024
"""How much of each slice ``validate`` reads."""

ReadRange = Callable[[int, int], bytes]
"""Reads the byte range [start, end) of the same file."""

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_WIDTH, _TIFF_HEIGHT, _TIFF_BITS, _TIFF_PHOTOMETRIC, _TIFF_SAMPLES = 256, 257, 258, 262, 277
_TIFF_TAGS = (_TIFF_WIDTH, _TIFF_HEIGHT, _TIFF_BITS, _TIFF_PHOTOMETRIC, _TIFF_SAMPLES)
# TIFF field type -> (struct code, size in bytes): every integer type libtiff reads a size
# from (BYTE, SHORT, LONG, SBYTE, SSHORT, SLONG, IFD, LONG8, SLONG8, IFD8). A size tag of
# another type (ASCII, RATIONAL, FLOAT, ...) is refused, not skipped.
_TIFF_INT_TYPES = {
    1: ("B", 1), 3: ("H", 2), 4: ("I", 4), 6: ("b", 1), 8: ("h", 2), 9: ("i", 4),
    13: ("I", 4), 16: ("Q", 8), 17: ("q", 8), 18: ("Q", 8),
}  # fmt: skip
# No slice file is a TiB: an offset beyond this is a lie (BigTIFF offsets reach 2^64).
_TIFF_MAX_OFFSET = 1 << 40
# A first directory with more entries than this is not a slice's (a real one has ~20).
_TIFF_MAX_ENTRIES = 4096
# PNG colour type -> channels OpenCV decodes (IMREAD_UNCHANGED): palette and grey+alpha
# become BGR(A), so 4 is the bound; tRNS transparency adds an alpha channel.
_PNG_CHANNELS = {0: 1, 2: 3, 3: 4, 4: 4, 6: 4}
# PNG colour type -> channels the file stores (a palette is one colour image).
_PNG_FILE_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}
# JPEG start-of-frame markers (baseline, progressive, lossless, ...); not DHT/JPG/DAC.
_JPEG_PROGRESSIVE = {0xC2, 0xC6, 0xCA, 0xCE}
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


class UnreadableHeader(InvalidInput):
    """The bytes are not a PNG, TIFF or JPEG header this module can read."""


class ImageLayout(NamedTuple):
    """What decoding an image costs: its size and how OpenCV lays out its pixels."""

    width: int
    height: int
    channels: int
    """Channels of the decoded array (an upper bound: palette and alpha become BGRA)."""
    sample_bytes: int
    """Bytes per channel of the decoded array (1, or 2 for 16-bit samples)."""
    file_channels: int
    """Channels the file stores: 1 grey, 2 grey + alpha, 3 colour, 4 colour + alpha."""

    @property
    def decoded_bytes(self) -> int:
        """Bytes of the array the decoder allocates: pixels x channels x bytes per sample."""
        return self.width * self.height * self.channels * self.sample_bytes


class ImageHeader(NamedTuple):
    """What a slice's header says: size in pixels, bits per sample as decoded, channels."""

    width: int
    height: int
    bits: int  # 8 or 16: the sample size the decoder gives (1-, 2- and 4-bit PNGs give 8)
    channels: int  # 1 grey, 2 grey + alpha, 3 colour, 4 colour + alpha


def image_header(header: bytes, read_range: ReadRange | None = None) -> ImageHeader:
    """Size, bit depth and channel count of the image whose file starts with ``header``.

    Arguments and errors as :func:`image_layout`.
    """
    layout = image_layout(header, read_range)
    bits = 16 if layout.sample_bytes > 1 else 8
    return ImageHeader(layout.width, layout.height, bits, layout.file_channels)


def image_size_xy(header: bytes, read_range: ReadRange | None = None) -> tuple[int, int]:
    """The (width, height) in pixels of the image whose file starts with ``header``.

    Args:
        header: the first bytes of the file (for PNG 24 suffice; ``HEADER_BYTES`` is plenty
            for most TIFF and JPEG files).
        read_range: reads more of the same file when a TIFF directory lies beyond
            ``header``; without it such a file raises UnreadableHeader.

    Raises:
        UnreadableHeader: naming what was found instead of a size.
    """
    layout = image_layout(header, read_range)
    return layout.width, layout.height


def image_layout(header: bytes, read_range: ReadRange | None = None) -> ImageLayout:
    """Size, channels and sample bytes of the image whose file starts with ``header``.

    Arguments as :func:`image_size_xy`.

    Raises:
        UnreadableHeader: not a PNG, TIFF or JPEG file, or a header that does not hold.
    """
    if header.startswith(PNG_SIGNATURE):
        return _png_layout(header)
    if header[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        try:
            return _tiff_layout(header, read_range)
        except struct.error:
            raise UnreadableHeader("TIFF whose first directory is cut short") from None
    if header.startswith(b"\xff\xd8"):
        return _jpeg_layout(header)
    raise UnreadableHeader(f"not a PNG, TIFF or JPEG file (starts with {header[:8]!r})")


def _png_layout(data: bytes) -> ImageLayout:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise UnreadableHeader("PNG without an IHDR chunk in its first 24 bytes")
    width, height = struct.unpack(">II", data[16:24])
    if len(data) < 26:  # the size alone: assume the costliest layout
        return ImageLayout(int(width), int(height), 4, 2, 4)
    depth, colour = data[24], data[25]
    if colour not in _PNG_CHANNELS or depth not in (1, 2, 4, 8, 16):
        raise UnreadableHeader(f"PNG with colour type {colour} and bit depth {depth}")
    channels = _PNG_CHANNELS[colour]
    if channels < 4 and _png_has_trns(data):
        channels = 4
    sample_bytes = 2 if depth == 16 else 1
    return ImageLayout(int(width), int(height), channels, sample_bytes, _PNG_FILE_CHANNELS[colour])


def _png_has_trns(data: bytes) -> bool:
    """Whether a tRNS chunk comes before the first IDAT (as far as ``data`` reaches)."""
    i = 8
    while i + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[i : i + 8])
        if kind == b"tRNS":
            return True
        if kind == b"IDAT":
            return False
        i += 12 + length
    return True  # not known: assume the worst


def _tiff_layout(data: bytes, read_range: ReadRange | None) -> ImageLayout:
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    if big:
        (ifd,) = struct.unpack(order + "Q", data[8:16])
        count_fmt, count_size, entry_size = "Q", 8, 20
    else:
        (ifd,) = struct.unpack(order + "I", data[4:8])
        count_fmt, count_size, entry_size = "H", 2, 12

    def fetch(start: int, end: int) -> bytes:
        if end > _TIFF_MAX_OFFSET:
            raise UnreadableHeader(
                f"TIFF whose first directory points at byte {start}, beyond any slice file"
            )
        if end <= len(data):
            return data[start:end]
        if read_range is None:
            raise UnreadableHeader(
                f"TIFF whose first directory (bytes {start}..{end}) lies beyond the "
                f"{len(data)} bytes read"
            )
        got = read_range(start, end)
        if len(got) < end - start:
            raise UnreadableHeader(
                f"TIFF whose first directory (bytes {start}..{end}) lies past the end of the file"
            )
        return got

    (count,) = struct.unpack(order + count_fmt, fetch(ifd, ifd + count_size))
    if count > _TIFF_MAX_ENTRIES:
        raise UnreadableHeader(f"TIFF whose first directory claims {count} entries")
    entries = fetch(ifd + count_size, ifd + count_size + count * entry_size)
    if len(entries) < count * entry_size:
        raise UnreadableHeader(f"TIFF whose first directory at byte {ifd} is truncated")
    head, inline = (12, 8) if big else (8, 4)
    values: dict[int, list[int]] = {}
    for i in range(count):
        entry = entries[i * entry_size : (i + 1) * entry_size]
        tag, kind = struct.unpack(order + "HH", entry[:4])
        if tag not in _TIFF_TAGS:
            continue
        if kind not in _TIFF_INT_TYPES:
            raise UnreadableHeader(f"TIFF whose tag {tag} has the non-integer field type {kind}")
        if tag in values:  # libtiff takes the first, another reader the last: a lie
            raise UnreadableHeader(f"TIFF whose first directory lists tag {tag} twice")
        (n,) = struct.unpack(order + ("Q" if big else "I"), entry[4:head])
        code, size = _TIFF_INT_TYPES[kind]
        n = min(int(n), 16)  # a per-sample list: more than 16 samples is refused below
        raw = entry[head : head + n * size]
        if n * size > inline:  # the values are stored at an offset
            (at,) = struct.unpack(order + ("Q" if big else "I"), entry[head : head + inline])
            raw = fetch(at, at + n * size)
        values[tag] = list(struct.unpack(order + code * n, raw))
        if any(v < 0 for v in values[tag]):
            raise UnreadableHeader(f"TIFF whose tag {tag} holds a negative value {values[tag]}")
    for tag in (_TIFF_WIDTH, _TIFF_HEIGHT, _TIFF_PHOTOMETRIC, _TIFF_SAMPLES):
        if len(values.get(tag, ())) > 1:
            raise UnreadableHeader(f"TIFF whose tag {tag} holds {len(values[tag])} values")
    if not values.get(_TIFF_WIDTH) or not values.get(_TIFF_HEIGHT):
        raise UnreadableHeader("TIFF whose first directory has no ImageWidth/ImageLength")
    samples = (values.get(_TIFF_SAMPLES) or [1])[0]
    bits = max(values.get(_TIFF_BITS) or [1])
    if not 1 <= samples <= 16 or not 1 <= bits <= 64:
        raise UnreadableHeader(f"TIFF with {samples} samples of {bits} bits per pixel")
    photometric = (values.get(_TIFF_PHOTOMETRIC) or [1])[0]
    # OpenCV decodes every colour TIFF (RGB, palette, YCbCr, alpha) as BGR or BGRA.
    channels = 1 if samples == 1 and photometric in (0, 1) else max(4, samples)
    width, height = int(values[_TIFF_WIDTH][0]), int(values[_TIFF_HEIGHT][0])
    return ImageLayout(width, height, channels, math.ceil(bits / 8), int(samples))


PROGRESSIVE_NOTE = " (with the progressive JPEG's coefficients)"
"""What messages add when :func:`decoder_peak_bytes` counts more than the array."""


def decoder_peak_bytes(layout: ImageLayout, header: bytes) -> int:
    """Bytes the decoder holds at its peak (libvips, :mod:`emprocess.images`): the array,
    plus for a progressive JPEG its coefficients (2 bytes per sample of each component),
    which it holds at any reduced resolution too. Measured on 8192^2 slices: PNG 1.08x
    the array, baseline JPEG 1.3x, progressive JPEG 3.1x.

    Args:
        layout: the image's, by :func:`image_layout` of ``header``.
        header: the first bytes of the file (up to the JPEG frame header).
    """
    progressive = header.startswith(b"\xff\xd8") and _jpeg_frame(header)[0] in _JPEG_PROGRESSIVE
    coefficients = 2 * layout.width * layout.height * layout.file_channels
    return layout.decoded_bytes + (coefficients if progressive else 0)


def _jpeg_layout(data: bytes) -> ImageLayout:
    _, precision, height, width, components = _jpeg_frame(data)
    channels = 1 if components == 1 else 3
    sample_bytes = 2 if precision > 8 else 1
    return ImageLayout(int(width), int(height), channels, sample_bytes, int(components))


def _jpeg_frame(data: bytes) -> tuple[int, int, int, int, int]:
    """(SOF marker, precision, height, width, components) of a JPEG's frame header."""
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
            precision, height, width, components = struct.unpack(">BHHB", data[i + 4 : i + 10])
            return marker, precision, height, width, components
        i += 2 + length
    raise UnreadableHeader("JPEG whose frame header is not within the bytes read")
