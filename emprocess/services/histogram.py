"""POST /histogram of the alignment service: the grey levels of one sampled slice.

The ``auto`` intensity window of a 12/16-bit run is decided once from the summed
histograms of a few slices spread over the stack (:mod:`emprocess.workflow.window`).
Decoding them took the Airflow worker 42 CPU s and 902 MiB at 16-bit 20,000^2; the
DAG's ``measure_window`` task sends one request per sampled file here instead, so the
worker reads headers only. The service reads the header first and refuses a slice over
its limits before reading the file; the file is then decoded a band of rows at a time,
keeping every n-th pixel of every n-th row (n chosen so that at most ``sample_pixels``
are counted), so memory is the file's bytes and the sample.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
from flask import Flask, jsonify

from emprocess import storage
from emprocess.errors import InvalidInput
from emprocess.imageinfo import HEADER_BYTES, UnreadableHeader, image_layout
from emprocess.images import decode_image
from emprocess.kernels.intensity import histogram, sample_step
from emprocess.models import HistogramRequest
from emprocess.services.common import json_body, parse

log = logging.getLogger(__name__)

DECODED_BYTES_PER_PIXEL = 2
"""As the pair requests: a 16-bit grey slice at the pixel limit."""
FILE_SLACK_BYTES = 1 << 20


def slice_histogram(req: HistogramRequest, max_pixels: int) -> dict[str, Any]:
    """The counts of the grey levels of the slice's subsample.

    Returns:
        ``{"width", "height", "bits", "step", "counted", "values", "counts"}``: the slice's
        size and bit depth, the subsampling step, how many samples were counted, and the
        grey levels that occur with their counts (ascending; levels never seen left out).

    Raises:
        InvalidInput: the file is not a PNG/TIFF/JPEG, is over the limits, or has fewer
            channels than ``channels`` asks.
    """
    url = req.img
    header = storage.read_bytes(url, 0, HEADER_BYTES)

    def read_range(start: int, end: int) -> bytes:
        return storage.read_bytes(url, start, end, max_bytes=end - start)

    try:
        layout = image_layout(header, read_range)
    except UnreadableHeader as e:
        raise InvalidInput(f"{url} is not a PNG, TIFF or JPEG image: {e}") from None
    pixels = layout.width * layout.height
    if pixels > max_pixels:
        raise InvalidInput(
            f"{url} is {layout.width}x{layout.height} = {pixels} pixels, over the limit of "
            f"{max_pixels}"
        )
    if req.channels > layout.channels:
        raise InvalidInput(
            f"channels: {req.channels} asked, but {url} has {layout.channels} channel(s)"
        )
    whole = len(header) < HEADER_BYTES  # a small file: the header read was all of it
    file_bytes = layout.decoded_bytes * 9 // 8 + FILE_SLACK_BYTES
    data = header if whole else storage.read_bytes(url, max_bytes=file_bytes)
    del header
    step = sample_step(layout.width, layout.height, req.sample_pixels)
    channels: Literal["all"] | None = "all" if req.channels > 1 else None
    image = decode_image(
        data,
        url,
        max_pixels,
        max_pixels * DECODED_BYTES_PER_PIXEL,
        channels=channels,
        factor=step,
        subsample=True,
    )
    del data
    if req.channels > 1:
        image = image[:, :, : req.channels]
    counts = histogram(np.ascontiguousarray(image))
    seen = np.flatnonzero(counts)
    return {
        "width": layout.width,
        "height": layout.height,
        "bits": 8 if image.dtype == np.uint8 else 16,
        "step": step,
        "counted": int(image.size),
        "values": seen.tolist(),
        "counts": counts[seen].tolist(),
    }


def register_histogram(app: Flask, *, max_pixels: int) -> None:
    """Add POST /histogram to the alignment service's app (``max_pixels``: the service's
    slice limit, read once when the app is created)."""

    @app.post("/histogram")
    def histogram_of_slice() -> Any:
        req = parse(HistogramRequest, json_body())
        return jsonify(slice_histogram(req, max_pixels))
