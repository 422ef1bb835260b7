"""Decode slice images (PNG, TIFF, JPEG; 8- or 16-bit), refusing costly or unknown ones by header."""

from __future__ import annotations

import numpy as np

from emprocess.errors import InvalidInput
from emprocess.imageinfo import HEADER_BYTES, UnreadableHeader, image_layout


def decode_image(
    data: bytes,
    name: str = "image",
    max_pixels: int | None = None,
    max_decoded_bytes: int | None = None,
) -> np.ndarray:
    """Decode PNG, TIFF or JPEG bytes to a 2-D uint8 or uint16 array (colour is made grey).

    The header is read first: any other format is refused without being decoded
    (OpenCV would decode BMP, GIF and more, whatever the file's name), and so is an
    image whose decoded array would exceed the limits, before it is allocated.

    Args:
        data: the encoded file.
        name: how to call it in error messages (its URL).
        max_pixels: refuse images with more pixels than this.
        max_decoded_bytes: refuse images whose decoded array (pixels x channels x
            bytes per sample, as OpenCV lays it out) is larger than this.

    Raises:
        InvalidInput: not a PNG, TIFF or JPEG image, an unsupported pixel type, or too large.
    """
    import cv2  # imported here: the DAG imports this module for header sizes only

    try:
        layout = image_layout(data[:HEADER_BYTES], lambda start, end: data[start:end])
    except UnreadableHeader as e:
        raise InvalidInput(f"{name} is not a PNG, TIFF or JPEG image: {e}") from None
    if max_pixels is not None:
        _check_pixels(name, layout.width, layout.height, max_pixels)
    if max_decoded_bytes is not None and layout.decoded_bytes > max_decoded_bytes:
        raise InvalidInput(
            f"{name} is {layout.width}x{layout.height} px with {layout.channels} channel(s) of "
            f"{layout.sample_bytes} byte(s): {layout.decoded_bytes} bytes decoded, over the "
            f"limit of {max_decoded_bytes}"
        )
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InvalidInput(
            f"{name} is not a PNG, TIFF or JPEG image OpenCV can decode ({len(data)} bytes)"
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
