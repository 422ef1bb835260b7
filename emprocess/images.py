"""Decode slice images (PNG, TIFF, JPEG; 8- or 16-bit), refusing costly or unknown ones by header."""

from __future__ import annotations

from typing import Literal

import numpy as np

from emprocess.errors import InvalidInput
from emprocess.imageinfo import HEADER_BYTES, UnreadableHeader, image_layout


def decode_image(
    data: bytes,
    name: str = "image",
    max_pixels: int | None = None,
    max_decoded_bytes: int | None = None,
    channels: int | Literal["all"] | None = None,
) -> np.ndarray:
    """Decode PNG, TIFF or JPEG bytes to a uint8 or uint16 array: grey, or every channel.

    The header is read first: any other format is refused without being decoded
    (OpenCV would decode BMP, GIF and more, whatever the file's name), and so is an
    image whose decoded array would exceed the limits, before it is allocated.

    Args:
        data: the encoded file.
        name: how to call it in error messages (its URL).
        max_pixels: refuse images with more pixels than this.
        max_decoded_bytes: refuse images whose decoded array (pixels x channels x
            bytes per sample, as OpenCV lays it out) is larger than this.
        channels: None makes colour grey and returns (H, W); n returns (H, W, n) in
            RGB(A) order (grey + alpha: grey, alpha) and refuses another channel count;
            "all" returns the image's own channels ((H, W) when grey).

    Raises:
        InvalidInput: not a PNG, TIFF or JPEG image, an unsupported pixel type, too
            large, or not ``channels`` channels.
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
    if channels is not None:
        image = _rgb_order(image, layout.file_channels)
        found = 1 if image.ndim == 2 else image.shape[2]
        if channels != "all" and found != channels:
            raise InvalidInput(f"{name} has {found} channel(s), expected {channels}")
    elif image.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        image = cv2.cvtColor(image, code)
    if image.dtype not in (np.uint8, np.uint16):
        raise InvalidInput(
            f"{name} has pixel type {image.dtype}; only 8- and 16-bit images are supported"
        )
    if max_pixels is not None:
        _check_pixels(name, image.shape[1], image.shape[0], max_pixels)
    return image


def _rgb_order(image: np.ndarray, file_channels: int) -> np.ndarray:
    """OpenCV's BGR(A) as RGB(A); grey + alpha (decoded as BGRA) as (grey, alpha)."""
    if image.ndim == 2:
        return image
    if file_channels == 2 and image.shape[2] == 4:
        return np.ascontiguousarray(image[:, :, [0, 3]])
    order = [2, 1, 0] if image.shape[2] == 3 else [2, 1, 0, 3]
    return np.ascontiguousarray(image[:, :, order])


def align_plane(image: np.ndarray, channel: int | str | None) -> np.ndarray:
    """The 2-D image alignment matches: the chosen channel, or the mean of all ("mean").

    Args:
        image: (H, W) or (H, W, C) uint8 / uint16, as :func:`decode_image` returns it.
        channel: a channel index, "mean", or None (``image`` must then be 2-D).
    """
    if image.ndim == 2:
        if channel not in (None, 0, "mean"):
            raise InvalidInput(f"channel {channel!r} asked of a grey (one channel) image")
        return image
    if channel == "mean":
        return np.rint(image.mean(axis=2)).astype(image.dtype)
    if not isinstance(channel, int) or not 0 <= channel < image.shape[2]:
        raise InvalidInput(f"channel {channel!r} asked of an image with {image.shape[2]} channels")
    return np.ascontiguousarray(image[:, :, channel])


def _check_pixels(name: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise InvalidInput(
            f"{name} is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}"
        )
