"""POST /slicestats of the emwrite service: one slice's grey statistics in the run's common area.

The measurement mini-task of per-slice intensity correction
(:mod:`emprocess.workflow.corrections`): read and decode the slice with /alignedslice's
limits, measure it warped into the canvas at reduced resolution
(:func:`emprocess.kernels.normalise.measure_slice`), answer the figures as JSON.
"""

from __future__ import annotations

from typing import Any

from emprocess import storage
from emprocess.images import decode_image
from emprocess.kernels.normalise import measure_slice
from emprocess.models import SliceStatsRequest


def slice_stats(
    req: SliceStatsRequest, max_pixels: int, max_decoded_bytes: int, max_file_bytes: int
) -> dict[str, Any]:
    """``{"mean", "std", "pixels"}`` of the slice inside ``req.area`` (slice grey units)."""
    url = storage.bucket_url(req.dest, req.img)
    data = storage.read_bytes(url, max_bytes=max_file_bytes)
    image = decode_image(data, url, max_pixels, max_decoded_bytes, None)  # colour: made grey
    del data
    stats = measure_slice(image, req.transform, req.area)
    return {"mean": stats.mean, "std": stats.std, "pixels": stats.pixels}
