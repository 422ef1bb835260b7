"""Decode slice images (PNG, TIFF; 8- or 16-bit grayscale), refusing oversized ones early."""

from __future__ import annotations

import numpy as np

from emprocess.errors import InvalidInput
from emprocess.imageinfo import HEADER_BYTES, UnreadableHeader, image_size_xy


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
            w, h = image_size_xy(data[:HEADER_BYTES], lambda start, end: data[start:end])
        except UnreadableHeader:
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
