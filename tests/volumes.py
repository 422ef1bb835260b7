"""Build a small real run output (sharded JPEG pyramid) in-process, for viewer tests."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from emprocess import storage
from emprocess.kernels.ngmeta import plan_cubes
from emprocess.layout import RunLayout
from emprocess.models import AlignedSliceRequest, NgMetaRequest, NgShardRequest
from emprocess.sample import DEFAULT_TEMPLATE, write_sample
from emprocess.services import emwrite

log = logging.getLogger(__name__)

IDENTITY = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
BAND_VALUE = 200
"""With ``colour_bands``: the left third of every slice is red, the middle green, the
right blue, at this value."""


@dataclass(frozen=True)
class BuiltVolume:
    """Where a test run's output is and what it holds."""

    source: str
    run_id: str
    size_xyz: tuple[int, int, int]
    minz: int
    resolution_nm: float

    @property
    def ng_bucket(self) -> str:
        return RunLayout(self.source, self.run_id).ng

    @property
    def chunk_bucket(self) -> str:
        return RunLayout(self.source, self.run_id).chunk


def build_test_volume(
    source: str = "viewsrc",
    run_id: str = "run1",
    n_slices: int = 64,
    width: int = 256,
    height: int = 256,
    *,
    minz: int = 0,
    resolution_nm: float = 8.0,
    write_raw: bool = False,
    seed: int = 0,
    colour_bands: bool = False,
    raw_format: str | None = None,
) -> BuiltVolume:
    """Write a synthetic stack and the run's pyramids through the emwrite service functions.

    With ``colour_bands`` the slices are RGB bands (:data:`BAND_VALUE`) written as one
    grey JPEG volume per channel (``jpeg_channels`` "each"), CLAHE off.

    The stack is placed with identity transforms (no alignment), with the run's
    bucket layout: SOURCE (slices), SOURCE_process, SOURCE_tmp_RUN_ID (tiles),
    SOURCE_ng_RUN_ID/neuroglancer/jpeg and, with ``write_raw``,
    SOURCE_chunk_RUN_ID/neuroglancer/raw (``raw_format`` "ome-zarr": raw.ome.zarr instead,
    "both": both). Needs ``EMPROCESS_STORAGE_ROOT`` (a
    local storage root), so no cloud is touched.

    Returns:
        The run's names and the volume's scale-0 size (x, y, z) in voxels.
    """
    if storage.local_root() is None:
        raise RuntimeError("build_test_volume needs EMPROCESS_STORAGE_ROOT (a local root)")
    layout = RunLayout(source, run_id)
    tmp_bucket, ng_bucket, chunk_bucket = layout.tmp, layout.ng, layout.chunk
    for bucket in layout.bucket_names().values():
        storage.create_bucket(bucket)
    write_sample(storage.bucket_url(source), n_slices, width, height, seed=seed, first_z=minz)
    maxz = minz + n_slices - 1
    colour: dict[str, Any] = {}
    if colour_bands:  # RGB slices of three bands, each one channel; a JPEG volume each
        colour = {"channels": 3, "jpeg_channels": "each"}
        bands = np.zeros((height, width, 3), np.uint8)
        for c in range(3):
            bands[:, c * width // 3 : (c + 1) * width // 3, c] = BAND_VALUE
        for z in range(minz, maxz + 1):
            storage.write_bytes(
                storage.bucket_url(source, DEFAULT_TEMPLATE % z),
                cv2.imencode(".png", bands[:, :, ::-1])[1].tobytes(),
            )
    for z in range(minz, maxz + 1):
        emwrite.aligned_slice(
            AlignedSliceRequest.model_validate(
                {
                    "img": DEFAULT_TEMPLATE % z,
                    "transform": IDENTITY,
                    "bbox": [width, height],
                    "dest": source,
                    "dest-tmp": tmp_bucket,
                    "slice": z,
                    "run_id": run_id,
                    **({"clip-limit": 0, "channels": 3} if colour_bands else {}),
                }
            )
        )
    volume = {
        "dest": ng_bucket,
        "dest_raw": chunk_bucket if write_raw else None,
        "minz": minz,
        "maxz": maxz,
        "bbox": [width, height],
        "writeRaw": write_raw,
        "resolution": resolution_nm,
        **colour,
        **({"raw_format": raw_format} if raw_format else {}),
    }
    emwrite.ng_meta(NgMetaRequest.model_validate(volume))
    for start in plan_cubes((width, height), minz, maxz):
        emwrite.ng_shard(
            NgShardRequest.model_validate({**volume, "source": tmp_bucket, "start": list(start)})
        )
    log.info("test volume %s written (%dx%dx%d)", ng_bucket, width, height, n_slices)
    return BuiltVolume(source, run_id, (width, height, n_slices), minz, resolution_nm)
