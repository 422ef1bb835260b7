"""Decode slice images (PNG, TIFF, JPEG; 8- or 16-bit), refusing costly or unknown ones by header.

Decoding is libvips's (``pyvips`` with the ``pyvips-binary`` wheel: no system library),
chosen by measurement (``emprocess bench align-service``, figures in docs/services.md): it
decodes PNG row by row, TIFF strip by strip and JPEG block row by block row
(``access="sequential"``), so a slice read at 1/n of its resolution
(:func:`decode_image` with ``factor``) never holds more than a band of rows at full
resolution: a request holds the files' bytes and the reduced slices. A 20,000^2
16-bit pair aligns at downsample 4 in 1.45 GiB (its two files are 1.2 GB), 8192^2 in
335 MiB where OpenCV's ``imdecode`` held both full slices and peaked at twice each
decoded array (772 MiB). A full decode goes straight into the array numpy then uses
(PNG 1.08x the array at its peak; a progressive JPEG 3x, its coefficients counted by
:func:`emprocess.imageinfo.decoder_peak_bytes`). Files are read from memory, not copied.

Every file passes three checks before its pixels are decoded: the header
(:mod:`emprocess.imageinfo`: format, size, channels, bit depth against the limits),
the structure (:mod:`emprocess.imagebounds`: zlib data, chunks, scans, trailing bytes)
and libvips's own reading of the header, which must agree with ours (a TIFF that
lists its size twice is refused by both). A damaged file is refused, not half decoded:
libvips fails on decoding errors, and for JPEG, whose damaged scan data only makes
libjpeg warn, on any warning.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Literal

import numpy as np

from emprocess.errors import InvalidInput
from emprocess.imagebounds import check_structure
from emprocess.imageinfo import (
    HEADER_BYTES,
    PROGRESSIVE_NOTE,
    ImageLayout,
    UnreadableHeader,
    decoder_peak_bytes,
    image_layout,
)

_FORMATS = {"uchar": np.uint8, "ushort": np.uint16}
# libvips's names of the pixel types it refuses, as numpy spells them in messages.
_OTHER_FORMATS = {
    "char": "int8", "short": "int16", "uint": "uint32", "int": "int32", "float": "float32",
    "double": "float64", "complex": "complex64", "dpcomplex": "complex128",
}  # fmt: skip
# libjpeg only warns on damaged scan data, and libvips puts warnings in its one error
# buffer: JPEG decodes take turns so each one's warnings are its own.
_JPEG_LOCK = threading.Lock()
_VIPS_READY = threading.Lock()
_vips_ready = False


def decode_image(
    data: bytes,
    name: str = "image",
    max_pixels: int | None = None,
    max_decoded_bytes: int | None = None,
    channels: int | Literal["all"] | None = None,
    factor: int = 1,
    subsample: bool = False,
) -> np.ndarray:
    """Decode PNG, TIFF or JPEG bytes to a uint8 or uint16 array: grey, or every channel.

    The header is read first: any other format is refused without being decoded
    (a decoder would take BMP, GIF and more, whatever the file's name), and so is an
    image whose decoded array would exceed the limits, before it is allocated.

    Args:
        data: the encoded file.
        name: how to call it in error messages (its URL).
        max_pixels: refuse images with more pixels than this.
        max_decoded_bytes: refuse images whose decoding holds more than this at its peak
            (:attr:`ImageLayout.peak_bytes`: the full-resolution array, pixels x channels x
            bytes per sample with palette and alpha counted as 4 channels, plus a
            progressive JPEG's coefficients), whatever ``factor``.
        channels: None makes colour grey and returns (H, W); n returns (H, W, n) in
            RGB(A) order (grey + alpha: grey, alpha) and refuses another channel count;
            "all" returns the image's own channels ((H, W) when grey).
        factor: read at 1/factor of the resolution, each output pixel the mean of a
            factor x factor block (right and bottom rows that fill no block dropped), as
            :func:`emprocess.kernels.align.downsample_image` gives it within one grey
            level; full-resolution rows are decoded and averaged a band at a time.
        subsample: with ``factor``, keep the first pixel of each block instead of the
            mean (the values keep their distribution: for histograms).

    Raises:
        InvalidInput: not a PNG, TIFF or JPEG image, an unsupported pixel type, too
            large, costlier than its pixels, damaged, or not ``channels`` channels.
    """
    layout = check_image(data, name, max_pixels, max_decoded_bytes)
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise InvalidInput(f"downsample factor must be an integer >= 1, got {factor!r}")
    if layout.width < factor or layout.height < factor:
        raise InvalidInput(
            f"{name} of {layout.width}x{layout.height} px is smaller than downsample factor "
            f"{factor}"
        )
    image = _decode(data, name, layout, factor, subsample)
    if channels is not None:
        found = 1 if image.ndim == 2 else image.shape[2]
        if channels != "all" and found != channels:
            raise InvalidInput(f"{name} has {found} channel(s), expected {channels}")
    elif image.ndim == 3:
        image = grey(image)
    return image


def check_image(
    data: bytes, name: str, max_pixels: int | None = None, max_decoded_bytes: int | None = None
) -> ImageLayout:
    """The checks :func:`decode_image` makes before decoding: header, limits, structure.

    Returns:
        the image's layout by its header.
    """
    try:
        layout = image_layout(data[:HEADER_BYTES], lambda start, end: data[start:end])
    except UnreadableHeader as e:
        raise InvalidInput(f"{name} is not a PNG, TIFF or JPEG image: {e}") from None
    if max_pixels is not None:
        _check_pixels(name, layout.width, layout.height, max_pixels)
    peak = decoder_peak_bytes(layout, data[:HEADER_BYTES])
    if max_decoded_bytes is not None and peak > max_decoded_bytes:
        raise InvalidInput(
            f"{name} is {layout.width}x{layout.height} px with {layout.channels} channel(s) of "
            f"{layout.sample_bytes} byte(s): {peak} bytes decoded"
            f"{PROGRESSIVE_NOTE if peak > layout.decoded_bytes else ''}, over the "
            f"limit of {max_decoded_bytes}"
        )
    check_structure(data, name)
    return layout


def grey(image: np.ndarray) -> np.ndarray:
    """An (H, W, C) RGB(A) or grey + alpha array as (H, W) grey (OpenCV's weights)."""
    import cv2

    if image.shape[2] == 2:
        return np.ascontiguousarray(image[:, :, 0])
    code = cv2.COLOR_RGBA2GRAY if image.shape[2] == 4 else cv2.COLOR_RGB2GRAY
    return cv2.cvtColor(image, code)


def _pyvips() -> Any:
    """pyvips, with libvips's operation cache off (it would keep decoded files alive)."""
    global _vips_ready
    import pyvips

    with _VIPS_READY:
        if not _vips_ready:
            pyvips.cache_set_max(0)
            pyvips.cache_set_max_mem(0)
            pyvips.cache_set_max_files(0)
            _vips_ready = True
    return pyvips


def _decode(
    data: bytes, name: str, layout: ImageLayout, factor: int, subsample: bool = False
) -> np.ndarray:
    """Decode with libvips (after :func:`check_image`); (H, W) or (H, W, C) in RGB(A) order."""
    pyvips = _pyvips()
    jpeg = data.startswith(b"\xff\xd8")
    loader = (
        pyvips.Image.jpegload_source
        if jpeg
        else pyvips.Image.pngload_source
        if data.startswith(b"\x89PNG")
        else pyvips.Image.tiffload_source
    )
    source = pyvips.Source.new_from_memory(data)  # not copied (a *_buffer loader copies)
    with _JPEG_LOCK if jpeg else contextlib.nullcontext():
        if jpeg:
            pyvips.vips_lib.vips_error_clear()
        try:
            image = loader(source, access="sequential", fail_on="warning" if jpeg else "error")
            _check_agrees(image, layout, name)
            if factor > 1:
                w, h = layout.width // factor, layout.height // factor
                image = image.crop(0, 0, w * factor, h * factor)
                if subsample:
                    image = image.subsample(factor, factor)
                else:
                    image = image.shrink(factor, factor)
            dtype = _FORMATS.get(image.format)
            if dtype is None:
                kind = _OTHER_FORMATS.get(image.format, image.format)
                raise InvalidInput(
                    f"{name} has pixel type {kind}; only 8- and 16-bit images are supported"
                )
            shape = (image.height, image.width, image.bands)
            pixels = np.frombuffer(image.write_to_memory(), dtype).reshape(shape)
        except pyvips.Error as e:
            detail = " ".join(str(e.detail or e.message).split())[:300]
            raise InvalidInput(f"{name} is damaged or cannot be decoded: {detail}") from None
        if jpeg:
            warning = pyvips.ffi.string(pyvips.vips_lib.vips_error_buffer()).decode(
                "utf-8", "replace"
            )
            # libjpeg's own lines ("VipsJpeg: ..."): another thread's PNG or TIFF decode
            # may add its lines to the buffer meanwhile, JPEG decodes do not (the lock).
            jpeg_lines = [line for line in warning.splitlines() if line.startswith("VipsJpeg")]
            if jpeg_lines:
                raise InvalidInput(f"{name} is damaged: {' '.join(jpeg_lines)[:300]}")
    return pixels[:, :, 0] if pixels.shape[2] == 1 else pixels


def _check_agrees(image: Any, layout: ImageLayout, name: str) -> None:
    """The decoder's reading of the header must be ours (the second line of the limits)."""
    if (image.width, image.height) != (layout.width, layout.height):
        raise InvalidInput(
            f"{name} says {layout.width}x{layout.height} px in its header as read here but "
            f"{image.width}x{image.height} px to the decoder: a header that lies is refused"
        )
    if image.bands > max(layout.channels, layout.file_channels):
        raise InvalidInput(
            f"{name} decodes to {image.bands} channels, more than its header's "
            f"{layout.file_channels}"
        )
    if image.interpretation == "cmyk":
        raise InvalidInput(f"{name} is a CMYK image; only grey and RGB(A) slices are supported")


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
