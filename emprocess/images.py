"""Decode slice images (PNG, TIFF; 8- or 16-bit grayscale) and read their size from the header."""

from __future__ import annotations

import struct

import numpy as np

from emprocess.errors import InvalidInput

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HEADER_BYTES = 65536  # enough for a PNG IHDR and, nearly always, a TIFF's first IFD


def image_size_from_header(header: bytes, name: str = "image") -> tuple[int, int]:
    """(width, height) of a PNG or TIFF from its first bytes, without decoding pixels.

    Raises:
        InvalidInput: the bytes are not a PNG or TIFF header this reader understands.
    """
    if header.startswith(PNG_SIGNATURE) and header[12:16] == b"IHDR":
        width, height = struct.unpack(">II", header[16:24])
        return int(width), int(height)
    if header[:4] in (b"II*\x00", b"MM\x00*"):
        return _tiff_size(header, name)
    raise InvalidInput(f"{name} is not a PNG or TIFF image (starts with {header[:8]!r})")


def _tiff_size(buf: bytes, name: str) -> tuple[int, int]:
    end = "<" if buf[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack(end + "I", buf[4:8])
        (count,) = struct.unpack(end + "H", buf[ifd : ifd + 2])
        tags: dict[int, int] = {}
        for i in range(count):
            entry = buf[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
            tag, typ = struct.unpack(end + "HH", entry[:4])
            if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4)
                fmt = "H" if typ == 3 else "I"
                tags[tag] = struct.unpack(end + fmt, entry[8 : 8 + struct.calcsize(fmt)])[0]
        return tags[256], tags[257]
    except (struct.error, KeyError):
        raise InvalidInput(
            f"{name}: cannot read the TIFF size from its first {len(buf)} bytes"
        ) from None


def decode_image(data: bytes, name: str = "image", max_pixels: int | None = None) -> np.ndarray:
    """Decode PNG or TIFF bytes to a 2-D uint8 or uint16 array (colour is made grey).

    Args:
        data: the encoded file.
        name: how to call it in error messages (its URL).
        max_pixels: refuse images with more pixels than this, before decoding
            when the header tells the size.

    Raises:
        InvalidInput: not an image, an unsupported pixel type, or too large.
    """
    import cv2  # imported here: the DAG imports this module for header sizes only

    if max_pixels is not None:
        try:
            w, h = image_size_from_header(data[:HEADER_BYTES], name)
        except InvalidInput:
            pass  # decoding below gives the definitive answer
        else:
            _check_pixels(name, w, h, max_pixels)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InvalidInput(
            f"{name} is not a PNG or TIFF image OpenCV can decode ({len(data)} bytes)"
        )
    if image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.dtype not in (np.uint8, np.uint16):
        raise InvalidInput(
            f"{name} has pixel type {image.dtype}; only 8- and 16-bit images are supported"
        )
    if max_pixels is not None:
        _check_pixels(name, image.shape[1], image.shape[0], max_pixels)
    return image


def _check_pixels(name: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise InvalidInput(
            f"{name} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
        )
