"""The emwrite service: aligned slices to tiles, tiles to neuroglancer pyramids.

POST /alignedslice  warp one slice into the global canvas, CLAHE, thumbnail, tiles
POST /ngmeta        write the ``info`` of neuroglancer/jpeg (and neuroglancer/raw, and/or the
                    OME-Zarr metadata of raw.ome.zarr: ``raw_format``)
POST /ngshard       build one 1024^3 cube from the tiles and write its pyramid shards

The service parses the requests and calls the model; the work is elsewhere: which
volumes a request writes, their URLs, ``info`` and checks, and the tmp bucket's tiled
slices in :mod:`emprocess.volume`; a slice's file(s) read and checked in
:mod:`emprocess.services.sourceslice`; its rendering (intensity window, warp, CLAHE,
tiles, thumbnail) in :mod:`emprocess.kernels.render`; tiles written and read back in
:mod:`emprocess.services.tilestore`; a cube's scales and their output formats in
:mod:`emprocess.services.pyramid`. The service settings (:class:`~emprocess.settings.ServiceEnv`)
are read once, by :func:`create_app`, and handed to every request.

Memory stays bounded: a slice is mapped to 8 bits in row blocks (its 16-bit source
let go), processed in windows of at most ``window_px`` (a setting) per side (plus one CLAHE tile
of context), and its tiles object is written while it is made
(``storage.write_stream``), never whole in memory; a cube is read
and written in z-slabs of ``pyramid.SLAB_Z`` slices (one z-layer of scale-0 shards; a slab
over 1 GiB, as of an RGB(A) cube, in shard-wide columns),
each shard committed in its own tensorstore transaction so every shard file is
written once, whole: a repeated request rewrites the same bytes, also over a
shard that a failed request left truncated. Peak RSS measured 0.9 GiB for a
16384^2 slice and 1.1 GiB for a full 1024^3 cube with both pyramids (with
MALLOC_ARENA_MAX=2, as the container sets it). With anisotropic voxels the first
scales keep every slice (x and y halve, z does not), so scale 1 of a cube is 1024 x
512 x 512 voxels, 128 MiB more than the isotropic 512^3. Colour (``channels``) multiplies a
cube's voxels by the channel count: slabs are (z, y, x, channel), so a full 1024^3 RGB
cube peaked at 2.8 GiB (``bench emwrite --cube --channels 3``) before such slabs were
read in columns, and 1.7 GiB after, with a JPEG volume per channel (``bench memory
--cube-channels 3``). A slice stored one grey
file per channel (``channel_imgs``) is checked by its files' headers, then each file is
read, decoded and rendered in turn, so one channel is in memory at a time.

Codecs, chosen by measurement (``emprocess bench emwrite``, emprocess_bench/emwrite.py): tiles in
the tmp bucket are "raw" (PNG tiles cost 1.4x the /alignedslice CPU and 2x the
/ngshard CPU, to save a third of the bytes of a bucket that a lifecycle rule
empties), the JPEG pyramid uses tensorstore's JPEG (quality 75), and the
lossless pyramid stores raw chunks without gzip (``ngmeta.RAW_DATA_ENCODING``):
gzip cost 35 ns of CPU per voxel, seven times JPEG, for 0.81 of the bytes.
/ngshard reads the tiles through a tensorstore kvstore, two range reads per
slice (header, then tile) in asynchronous batches.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
from flask import Flask

from emprocess import storage
from emprocess.errors import InvalidInput
from emprocess.geometry import TILE_PX
from emprocess.kernels.intensity import to_uint8
from emprocess.kernels.render import (  # noqa: F401  (THUMB_* : the service's, re-exported)
    THUMB_MAX_PX,
    THUMB_MIN_FACTOR,
    colour_thumbnail,
    encode_thumbnail,
    stream_slice,
    stream_source_tiles,
)
from emprocess.layout import process_bucket, thumbnail_key
from emprocess.models import (
    AlignedSliceRequest,
    NgMetaRequest,
    NgShardRequest,
    SliceStatsRequest,
)
from emprocess.services import guard
from emprocess.services.common import create_service_app, json_body, parse
from emprocess.services.pyramid import write_cube
from emprocess.services.shardfiles import FILE_IO_LOCKING
from emprocess.services.slicestats import slice_stats
from emprocess.services.sourceslice import SourceSlice, max_file_bytes
from emprocess.settings import ServiceEnv, load
from emprocess.volume import TiledSlices, request_volumes

log = logging.getLogger(__name__)

CPU_COUNT = (
    len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
)


def _settings(env: ServiceEnv | None) -> ServiceEnv:
    """The app's settings; in-process callers (tests, benchmarks) may pass none, and then
    the environment's are read for the call."""
    return load(ServiceEnv) if env is None else env


def tiles_url(bucket: str, z: int) -> str:
    """Where the tiled aligned slice z lives in the tmp bucket."""
    return TiledSlices.channel(bucket).url(z)


def source_tiles_url(bucket: str, z: int) -> str:
    """Where the 16-bit tiled slice z lives (``raw_dtype`` "uint16")."""
    return TiledSlices.wide(bucket).url(z)


def thumbnail_url(req: AlignedSliceRequest) -> str:
    """Where the thumbnail of the request's slice goes (DEST_process/RUN_ID/align/IMG)."""
    return storage.bucket_url(process_bucket(req.dest), thumbnail_key(req.run_id, req.img))


# -- /alignedslice -------------------------------------------------------------


def aligned_slice(req: AlignedSliceRequest, env: ServiceEnv | None = None) -> dict[str, Any]:
    """Warp, CLAHE and tile one slice; write the tiles object and the thumbnail.

    Args:
        req: the request.
        env: the service settings (limits, window, tile codec); None reads them.

    Returns:
        Seconds spent reading, computing and writing (also logged).
    """
    if req.shard_size != TILE_PX:
        raise InvalidInput(f"shard-size must be {TILE_PX}, got {req.shard_size}")
    t0 = time.perf_counter()
    env = _settings(env)
    width, height = req.bbox
    if width * height > env.emwrite_max_pixels:
        raise InvalidInput(f"bbox {req.bbox} has more than {env.emwrite_max_pixels} pixels")
    # Every name is built (and so checked) before the first read or write.
    thumbnail = thumbnail_url(req)
    wide_tiles = TiledSlices.wide(req.dest_tmp)
    tiles_of = TiledSlices.of_channels(req.dest_tmp, req.channels)
    for kind in (*tiles_of, wide_tiles):
        kind.url(req.slice)
    guard.check_slice_buckets(req)
    source = SourceSlice(req, env)
    t_read = time.perf_counter()
    compute = [0.0]  # seconds spent making tiles while they are written
    if req.raw_dtype is not None:  # one grey file (channels exclude raw_dtype)
        first = source.first_plane()
        if first.dtype != np.dtype(req.raw_dtype):
            raise InvalidInput(
                f"raw_dtype {req.raw_dtype!r} keeps a 16-bit slice's values, but {source.url} "
                f"is {first.dtype}"
            )
        streamed = stream_source_tiles(
            first, req.transform, (width, height), tile_px=TILE_PX, window_px=env.window_px
        )
        del first
        wide_tiles.write(req.slice, streamed, compute)
    iw = req.intensity_window
    thumbs = []
    # Every channel: the same transform, its own CLAHE; each channel's tiles are written
    # while they are made, and its source plane is let go once it is mapped to 8 bits, so
    # memory holds one 8-bit channel, one processing window and one row of windows' tiles.
    for c, channel_tiles in enumerate(tiles_of):
        plane = source.take_plane(c)
        t = time.perf_counter()
        plane8 = np.ascontiguousarray(to_uint8(plane, None if iw is None else (iw[0], iw[1])))
        compute[0] += time.perf_counter() - t
        del plane
        streamed = stream_slice(
            plane8,
            req.transform,
            (width, height),
            req.clip_limit,
            tile_px=TILE_PX,
            window_px=env.window_px,
            codec=env.tile_codec,
        )
        del plane8
        channel_tiles.write(req.slice, streamed, compute)
        assert streamed.thumbnail is not None
        thumbs.append(streamed.thumbnail)
    storage.write_bytes(thumbnail, encode_thumbnail(colour_thumbnail(thumbs), req.img))
    end = time.perf_counter()
    timings = {
        "read_s": t_read - t0,
        "compute_s": compute[0],
        "write_s": end - t_read - compute[0],
    }
    log.info("aligned slice %d (%s) %dx%d: %s", req.slice, req.img, width, height, timings)
    return timings


# -- /ngmeta, /ngshard ---------------------------------------------------------


def ng_meta(req: NgMetaRequest) -> None:
    """Write the volumes' metadata; the same request always writes the same bytes.

    Everything is checked before the first write: the buckets, and that no metadata
    of another volume with data would be replaced.
    """
    guard.check_volume_buckets(req)
    volumes = request_volumes(req)
    volumes.check_before_meta()
    volumes.write_meta()


def _ts_context(env: ServiceEnv) -> Any:
    """One tensorstore context per request: bounded threads, no read cache (we only write).

    Under a local storage root, shard files are not fsync'ed (``file_io_sync``), as the
    local backend's own writes are not: tensorstore's default syncs each of a cube's
    ~36 files, and the worker waited on the disk for a fifth of a full cube's time
    (0.2-0.25 s against about 1 s of CPU), so the shards stage of a local run left that
    share of the cores idle. A file still appears whole or not at all (tensorstore
    renames a finished temporary file into place); only a power loss could drop the
    last seconds of writes, as for every other object of a local run. GCS is untouched.
    """
    import tensorstore as ts

    return ts.Context(
        {
            "data_copy_concurrency": {"limit": CPU_COUNT},
            "file_io_concurrency": {"limit": env.io_threads},
            "file_io_sync": False,
            "cache_pool": {"total_bytes_limit": 0},
            **FILE_IO_LOCKING,  # a killed writer's lock file is never reused (shardfiles)
        }
    )


def ng_shard(req: NgShardRequest, env: ServiceEnv | None = None) -> dict[str, Any]:
    """Build cube ``start`` from the tiles and write every scale of every volume.

    Everything is checked before the first write: the cube's place in the volume, the
    buckets, each volume's metadata and that no path leads out of its bucket.

    Returns:
        Seconds spent reading tiles, writing shards and downsampling (also logged).
    """
    t0 = time.perf_counter()
    volumes = request_volumes(req)
    boxes = volumes.geometry.cube_boxes(req.start)
    guard.check_volume_buckets(req)
    volumes.check_infos()
    (_, _, z_first), (_, _, z_end) = boxes[0]
    for tiles in volumes.tiles(req.source, req.write_raw):
        tiles.check_paths(range(z_first, z_end))
    volumes.check_ome_zarr()
    timings = write_cube(volumes, req.source, req.write_raw, boxes, _ts_context(_settings(env)))
    timings["total_s"] = time.perf_counter() - t0
    log.info("cube %s written: %s", req.start, {k: round(v, 3) for k, v in timings.items()})
    return timings


def create_app(env: ServiceEnv | None = None) -> Flask:
    """The WSGI app (gunicorn: ``'emprocess.services.emwrite:create_app()'``).

    The service settings are read here, once (a bad value stops the service), and
    handed to every request.
    """
    env = _settings(env)
    app = create_service_app("emwrite", env)

    @app.post("/alignedslice")
    def alignedslice() -> Any:
        aligned_slice(parse(AlignedSliceRequest, json_body()), env)
        return "success", 200, {"Content-Type": "text/plain"}

    @app.post("/slicestats")
    def slicestats() -> Any:
        req = parse(SliceStatsRequest, json_body())
        return slice_stats(
            req, env.emwrite_max_pixels, env.emwrite_max_image_bytes, max_file_bytes(env)
        )

    @app.post("/ngmeta")
    def ngmeta_route() -> Any:
        ng_meta(parse(NgMetaRequest, json_body()))
        return "success", 200, {"Content-Type": "text/plain"}

    @app.post("/ngshard")
    def ngshard() -> Any:
        ng_shard(parse(NgShardRequest, json_body()), env)
        return "success", 200, {"Content-Type": "text/plain"}

    return app
