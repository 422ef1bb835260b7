"""Quality along z of a written run: the NCC of each aligned slice with the next, and doubtful slices.

``finish_align`` calls :func:`record_quality` once every slice is written: it reads the
slices' thumbnails from the process bucket (the canvas at 1/4 or less, as written, CLAHE
included), crops them to the canvas's common area, shrinks them to at most
``QUALITY_MAX_PX`` per side, and writes align/quality.csv: per slice z its NCC with
z + 1 (:func:`emprocess.kernels.quality.ncc`) and whether it is doubtful (below the
run's threshold, :func:`emprocess.kernels.quality.ncc_threshold`). Each of 8 threads
holds one decoded thumbnail (at most 4096^2 px) and two shrunk ones at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import cv2
import numpy as np

from emprocess import storage
from emprocess.errors import EmprocessError
from emprocess.images import decode_image
from emprocess.kernels.quality import doubtful_slices, ncc, ncc_threshold
from emprocess.kernels.render import thumbnail_factor
from emprocess.layout import thumbnail_key
from emprocess.records.tables import QualityRow
from emprocess.workflow.conf import RunConf
from emprocess.workflow.corrections import run_common_area

log = logging.getLogger(__name__)

QUALITY_MAX_PX = 512
"""Thumbnails are compared at most this many pixels per side (inside the common area)."""


def _shrunk_thumbnail(conf: RunConf, z: int, area: Sequence[int], factor: int) -> np.ndarray | None:
    url = storage.bucket_url(conf.layout.process, thumbnail_key(conf.id, conf.slice_name(z)))
    try:
        image = decode_image(storage.read_bytes(url), url)
    except EmprocessError as e:
        log.warning("no thumbnail of slice %d for the quality along z: %s", z, e)
        return None
    if image.ndim == 3:
        image = image[:, :, 0]
    x0, y0, x1, y1 = (int(v) // factor for v in area)
    crop = image[y0 : max(y1, y0 + 1), x0 : max(x1, x0 + 1)]
    k = max(1, -(-max(crop.shape) // QUALITY_MAX_PX))
    if k == 1:
        return np.ascontiguousarray(crop)
    size = (-(-crop.shape[1] // k), -(-crop.shape[0] // k))
    return np.asarray(cv2.resize(crop, size, interpolation=cv2.INTER_AREA))


def slice_ncc(
    conf: RunConf,
    transforms: Mapping[int, Sequence[float]],
    slice_size_xy: tuple[int, int],
    bbox_xy: Sequence[int],
    threads: int = 8,
) -> dict[int, float | None]:
    """Slice z -> NCC of its thumbnail with slice z + 1's (None for the last or a missing one)."""
    area = run_common_area(transforms, slice_size_xy, bbox_xy)
    factor = thumbnail_factor(int(bbox_xy[0]), int(bbox_xy[1]))
    zs = list(range(conf.minz, conf.maxz + 1))
    out: dict[int, float | None] = {}

    def pair_values(chunk: list[int]) -> dict[int, float | None]:
        got: dict[int, float | None] = {}
        before = _shrunk_thumbnail(conf, chunk[0], area, factor)
        for z in chunk[1:]:
            after = _shrunk_thumbnail(conf, z, area, factor)
            ok = before is not None and after is not None and before.shape == after.shape
            got[z - 1] = ncc(before, after) if ok else None  # type: ignore[arg-type]
            before = after
        return got

    # Chunks overlap by one slice, so every pair is inside one chunk.
    step = max(2, -(-len(zs) // max(1, threads)))
    chunks = [zs[i : i + step + 1] for i in range(0, len(zs) - 1, step)]
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for got in pool.map(pair_values, chunks):
            out.update(got)
    out[zs[-1]] = None
    return out


def record_quality(
    conf: RunConf,
    transforms: Mapping[int, Sequence[float]],
    slice_size_xy: tuple[int, int],
    bbox_xy: Sequence[int],
) -> dict[str, Any]:
    """Write align/quality.csv; returns ``{"threshold", "median", "doubtful": [z...]}``."""
    values = slice_ncc(conf, transforms, slice_size_xy, bbox_xy)
    limit = ncc_threshold(values)
    doubtful = set(doubtful_slices(values))
    conf.layout.records.write_quality(
        QualityRow(z=z, ncc_next=v, doubtful=z in doubtful) for z, v in sorted(values.items())
    )
    got = [v for v in values.values() if v is not None]
    summary = {
        "threshold": round(limit, 5),
        "median": round(float(np.median(got)), 5) if got else None,
        "doubtful": sorted(doubtful),
    }
    log.info("quality along z: %s", summary)
    return summary
