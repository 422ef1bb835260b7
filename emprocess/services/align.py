"""The alignment service (fiji_cloudrun): POST / aligns slice z+1 onto slice z.

Accepts ``{"pre": URL, "post": URL, "downsample": n, "params": {...}}`` and the
legacy Fiji request (``command`` / ``input-map`` / ``input-str``), whose
command and script are read for names only and never executed. Answers with
:class:`emprocess.kernels.align.AlignResult` as JSON.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
from flask import Flask, jsonify

from emprocess import storage
from emprocess.errors import InvalidInput
from emprocess.imageinfo import (
    HEADER_BYTES,
    PROGRESSIVE_NOTE,
    ImageLayout,
    UnreadableHeader,
    decoder_peak_bytes,
    image_layout,
)
from emprocess.images import align_plane, decode_image
from emprocess.kernels.align import AlignParams, align_pair
from emprocess.kernels.intensity import to_uint8
from emprocess.models import AlignRequest
from emprocess.services.common import create_service_app, json_body, parse
from emprocess.settings import ServiceEnv, load

log = logging.getLogger(__name__)

# Adjacent slices of one stack have (nearly) one size; beyond this ratio per axis
# the request almost surely names the wrong files.
MAX_SIZE_RATIO = 1.5
# Bytes a decoded slice may take per pixel of the pixel limit: a 16-bit grey slice
# at the limit, or 8-bit colour of two thirds of it (16-bit RGBA needs 8).
DECODED_BYTES_PER_PIXEL = 2
# A slice file is at most its decoded size plus 1/8 (deflate at its worst) plus this.
FILE_SLACK_BYTES = 1 << 20
# Slices are read at the request's downsample (emprocess.images), so memory is their
# files': files larger than this are read one at a time (two 32,768^2 16-bit TIFFs
# would not fit an instance of 4 GiB together).
BIG_FILE_BYTES = 1 << 30
_BIG_FILE = threading.Lock()


def read_image(
    url: str, channel: int | str | None = None, factor: int = 1, *, max_pixels: int
) -> np.ndarray:
    """Read and decode one slice at 1/``factor`` of its resolution, within the size limits.

    The header is read first (one range read) and the slice refused by it before its
    file is read; the file is then decoded a band of rows at a time, so memory is the
    file's bytes and the reduced slice. With ``channel`` (colour slices), the plane of
    that channel or the mean of all.

    Args:
        max_pixels: the largest slice taken (``ServiceEnv.align_max_pixels``, read once
            when the service starts); it bounds the decoded bytes too.
    """
    limit = max_pixels * DECODED_BYTES_PER_PIXEL
    header = storage.read_bytes(url, 0, HEADER_BYTES)
    layout, peak = _header(url, header)
    _check_limits(url, layout, peak, limit, max_pixels)
    file_bytes = layout.decoded_bytes * 9 // 8 + FILE_SLACK_BYTES
    with _BIG_FILE if file_bytes > BIG_FILE_BYTES else contextlib.nullcontext():
        whole = len(header) < HEADER_BYTES  # a small file: the header read was all of it
        data = header if whole else storage.read_bytes(url, max_bytes=file_bytes)
        del header
        channels: Literal["all"] | None = None if channel is None else "all"
        image = decode_image(data, url, max_pixels, limit, channels=channels, factor=factor)
        del data  # before the next big file may be read
    if channel is None:
        return image
    try:
        return align_plane(image, channel)
    except InvalidInput as e:
        raise InvalidInput(f"{url}: {e}") from None


def source_size(url: str) -> tuple[int, int]:
    """(width, height) of the slice at ``url`` at full resolution, by its header alone."""
    layout, _ = _header(url, storage.read_bytes(url, 0, HEADER_BYTES))
    return layout.width, layout.height


def _header(url: str, header: bytes) -> tuple[ImageLayout, int]:
    """The slice's layout by its ``header`` (the file's first bytes), and the decoder's peak
    bytes (one more range read for a TIFF whose first directory lies beyond ``header``)."""

    def read_range(start: int, end: int) -> bytes:
        return storage.read_bytes(url, start, end, max_bytes=end - start)

    try:
        layout = image_layout(header, read_range)
    except UnreadableHeader as e:
        raise InvalidInput(f"{url} is not a PNG, TIFF or JPEG image: {e}") from None
    return layout, decoder_peak_bytes(layout, header)


def _check_limits(url: str, layout: ImageLayout, peak: int, limit: int, max_pixels: int) -> None:
    pixels = layout.width * layout.height
    if pixels > max_pixels:
        raise InvalidInput(
            f"{url} is {layout.width}x{layout.height} = {pixels} pixels, over the limit of "
            f"{max_pixels}"
        )
    if peak > limit:
        raise InvalidInput(
            f"{url} is {layout.width}x{layout.height} px with {layout.channels} channel(s) of "
            f"{layout.sample_bytes} byte(s): {peak} bytes decoded"
            f"{PROGRESSIVE_NOTE if peak > layout.decoded_bytes else ''}, over the "
            f"limit of {limit}"
        )


def read_channel_files(
    urls: list[str], channel: int | str, factor: int = 1, *, max_pixels: int
) -> np.ndarray:
    """A slice stored as one grey file per channel: the plane of ``channel`` (only that
    file is read) or the mean of all files, each read at 1/``factor`` (as
    :func:`read_image`, within ``max_pixels``)."""
    if isinstance(channel, int):
        return read_image(urls[channel], factor=factor, max_pixels=max_pixels)
    # The mean as align_plane takes it of a colour file (rint of the exact mean: sums of
    # at most 4 x 65535 are exact in float32), one file in memory at a time.
    first = read_image(urls[0], factor=factor, max_pixels=max_pixels)
    total = first.astype(np.float32)
    for url in urls[1:]:
        plane = read_image(url, factor=factor, max_pixels=max_pixels)
        if plane.shape != first.shape or plane.dtype != first.dtype:
            raise InvalidInput(
                f"channel file {url} is {plane.shape[1]}x{plane.shape[0]} {plane.dtype}, but "
                f"{urls[0]} is {first.shape[1]}x{first.shape[0]} {first.dtype} (at 1/{factor})"
            )
        total += plane
        del plane
    total /= len(urls)
    return np.rint(total).astype(first.dtype)


def check_sizes(pre: np.ndarray, post: np.ndarray, req: AlignRequest) -> None:
    """Refuse a pair whose (downsampled) sizes differ too much or leave too few pixels."""
    (h0, w0), (h1, w1) = pre.shape, post.shape
    if max(w0, w1) > MAX_SIZE_RATIO * min(w0, w1) or max(h0, h1) > MAX_SIZE_RATIO * min(h0, h1):
        raise InvalidInput(
            f"pre {req.pre} is {w0}x{h0} but post {req.post} is {w1}x{h1} at 1/{req.downsample}: "
            f"sizes differ by more than {MAX_SIZE_RATIO}x"
        )
    smallest = min(w0, h0, w1, h1)
    if smallest < 16:
        raise InvalidInput(
            f"downsample {req.downsample} leaves fewer than 16 pixels ({smallest}) of a side"
        )


def align_request(req: AlignRequest, *, max_pixels: int) -> dict[str, Any]:
    """Run one alignment request (slices within ``max_pixels``); returns the JSON-ready
    result."""
    params = parse(AlignParams, req.params)
    with ThreadPoolExecutor(2) as pool:
        if req.pre_channels is not None and req.post_channels is not None:
            channel = req.channel
            assert channel is not None  # checked by the model
            files = ([req.pre, *req.pre_channels], [req.post, *req.post_channels])
            pre, post = pool.map(
                lambda urls: read_channel_files(
                    urls, channel, req.downsample, max_pixels=max_pixels
                ),
                files,
            )
        else:
            pre, post = pool.map(
                lambda url: read_image(url, req.channel, req.downsample, max_pixels=max_pixels),
                (req.pre, req.post),
            )
    check_sizes(pre, post, req)
    if req.intensity_window is not None:
        # The run's window, as emwrite applies it: both stages see the same 8-bit pixels
        # (read at the downsample, which averages before the lookup: same within 1 level).
        window = (req.intensity_window[0], req.intensity_window[1])
        pre, post = to_uint8(pre, window), to_uint8(post, window)
    result = align_pair(pre, post, params)
    log.info(
        "aligned %s -> %s at 1/%d: affine %s (%d inliers), translation %s, %.2f s",
        req.post,
        req.pre,
        req.downsample,
        result.affine_found,
        result.affine_inliers,
        result.translation_found,
        result.seconds,
    )
    return result.model_dump(mode="json")


def create_app() -> Flask:
    """The WSGI app (gunicorn: ``'emprocess.services.align:create_app()'``).

    The service's settings are read here, once per process (a bad value stops it,
    named), and handed to the request handlers.
    """
    from emprocess.services.features import align_with_features, register_features
    from emprocess.services.histogram import register_histogram

    env = load(ServiceEnv)
    app = create_service_app("align", env)
    max_pixels = env.align_max_pixels

    @app.post("/")
    def align() -> Any:
        req = AlignRequest.from_payload(json_body())
        if req.run_id is not None:  # features once per slice (services/features.py)
            return jsonify(align_with_features(req, max_pixels=max_pixels))
        return jsonify(align_request(req, max_pixels=max_pixels))

    register_features(app, max_pixels=max_pixels)
    register_histogram(app, max_pixels=max_pixels)

    return app
