"""The emwrite service: aligned slices to tiles, tiles to neuroglancer pyramids.

POST /alignedslice  warp one slice into the global canvas, CLAHE, thumbnail, tiles
POST /ngmeta        write the ``info`` of neuroglancer/jpeg (and neuroglancer/raw, and/or the
                    OME-Zarr metadata of raw.ome.zarr: ``raw_format``)
POST /ngshard       build one 1024^3 cube from the tiles and write its pyramid shards

The service parses, checks, reads and writes; the work is elsewhere: a slice's
rendering (intensity window, warp, CLAHE, tiles, thumbnail) in
:mod:`emprocess.kernels.render`, a cube's scales and their output format in
:mod:`emprocess.services.pyramid`.

Memory stays bounded: a slice is mapped to 8 bits in row blocks (its 16-bit source
let go), processed in windows of at most ``WINDOW_PX`` per side (plus one CLAHE tile
of context), and its tiles object is written while it is made
(``storage.write_stream``), never whole in memory; a cube is read
and written in z-slabs of ``SLAB_Z`` slices (one z-layer of scale-0 shards; a slab
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

Codecs, chosen by measurement (``emprocess bench emwrite``, benchmarks/emwrite.py): tiles in
the tmp bucket are "raw" (PNG tiles cost 1.4x the /alignedslice CPU and 2x the
/ngshard CPU, to save a third of the bytes of a bucket that a lifecycle rule
empties), the JPEG pyramid uses tensorstore's JPEG (quality 75), and the
lossless pyramid stores raw chunks without gzip (``ngmeta.RAW_DATA_ENCODING``):
gzip cost 35 ns of CPU per voxel, seven times JPEG, for 0.81 of the bytes.
/ngshard reads the tiles through a tensorstore kvstore, two range reads per
slice (header, then tile) in asynchronous batches.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from typing import Any

import numpy as np
from flask import Flask

from emprocess import storage
from emprocess.errors import InvalidInput
from emprocess.geometry import TILE_PX
from emprocess.imageinfo import HEADER_BYTES, ImageLayout, UnreadableHeader, image_layout
from emprocess.images import decode_image
from emprocess.kernels.correct import SliceCorrection, correct_slice
from emprocess.kernels.intensity import to_uint8
from emprocess.kernels.render import (  # noqa: F401  (THUMB_* : the service's, re-exported)
    THUMB_MAX_PX,
    THUMB_MIN_FACTOR,
    colour_thumbnail,
    encode_thumbnail,
    stream_slice,
    stream_source_tiles,
)
from emprocess.kernels.warp import MAX_SOURCE_SIDE_PX
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
from emprocess.settings import ServiceEnv, load
from emprocess.volume import TiledSlices, request_volumes

log = logging.getLogger(__name__)

CPU_COUNT = (
    len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
)
# The canvas holds every slice after its transform: a little larger than one slice
# (drift, rotation). Each side may be at most this many times the slice's longer
# side, plus one tile; the bound keeps a request's work in proportion to its input.
MAX_CANVAS_RATIO = 4


def max_file_bytes(env: ServiceEnv) -> int:
    """Largest slice file read: an uncompressed TIFF of the largest decoded slice plus its
    header (``emwrite_max_image_bytes``: a 32768^2 8-bit or a 23170^2 16-bit grey slice;
    a 16384^2 16-bit RGBA PNG needs 2 GiB)."""
    return env.emwrite_max_image_bytes + (1 << 20)


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


def check_canvas(bbox: list[int], layout: ImageLayout, img: str) -> None:
    """The canvas ``bbox`` [width, height] must be in proportion to the slice.

    Each side at most ``MAX_CANVAS_RATIO`` x the slice's longer side + one tile (a turned
    slice keeps its longer side), and the area at most that of the square whose side is
    ``MAX_CANVAS_RATIO`` x the side of the slice's own square (sqrt(width x height)) +
    one tile: for a square slice both say the same; a 7936 x 1 px slice gets at most
    1380^2 px, not 32768^2, so a request's work stays in proportion to its input.
    """
    width, height = bbox
    longest = max(layout.width, layout.height)
    if max(width, height) > MAX_CANVAS_RATIO * longest + TILE_PX:
        raise InvalidInput(
            f"bbox {bbox} is more than {MAX_CANVAS_RATIO}x (+{TILE_PX} px) the "
            f"{layout.width}x{layout.height} slice {img}"
        )
    side = MAX_CANVAS_RATIO * math.isqrt(layout.width * layout.height) + TILE_PX
    if width * height > side * side:
        raise InvalidInput(
            f"bbox {bbox} has {width * height} pixels, more than the {side}^2 = {side * side} "
            f"allowed for the {layout.width}x{layout.height} slice {img} ({MAX_CANVAS_RATIO}x "
            f"the side of its square + {TILE_PX} px)"
        )


def _layout(data: bytes, url: str) -> ImageLayout:
    """The slice's header; another format than PNG, TIFF or JPEG is refused here."""
    try:
        return image_layout(data[:HEADER_BYTES], lambda start, end: data[start:end])
    except UnreadableHeader as e:
        raise InvalidInput(f"{url} is not a PNG, TIFF or JPEG image: {e}") from None


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
    max_pixels, max_decoded, max_file = (
        env.emwrite_max_pixels,
        env.emwrite_max_image_bytes,
        max_file_bytes(env),
    )
    width, height = req.bbox
    if width * height > max_pixels:
        raise InvalidInput(f"bbox {req.bbox} has more than {max_pixels} pixels")
    # Every name is built (and so checked) before the first read or write.
    source_url = storage.bucket_url(req.dest, req.img)
    thumbnail = thumbnail_url(req)
    wide_tiles = TiledSlices.wide(req.dest_tmp)
    tiles_of = TiledSlices.of_channels(req.dest_tmp, req.channels)
    for kind in (*tiles_of, wide_tiles):
        kind.url(req.slice)
    guard.check_slice_buckets(req)
    data = storage.read_bytes(source_url, max_bytes=max_file)
    layout = _layout(data, source_url)
    if max(layout.width, layout.height) > MAX_SOURCE_SIDE_PX:  # before decoding it
        raise InvalidInput(
            f"{source_url} is {layout.width}x{layout.height} px; the warp takes slices of at "
            f"most {MAX_SOURCE_SIDE_PX} px a side (OpenCV's int16 source coordinates)"
        )
    check_canvas(req.bbox, layout, req.img)
    correction = SliceCorrection(req.destreak, *(req.intensity_gain_offset or (1.0, 0.0)))
    if req.channel_imgs is not None:
        channel_files = _check_channel_files(req, source_url, layout)
        planes: list[np.ndarray] = []
    else:
        image = decode_image(data, source_url, max_pixels, max_decoded, req.channels)
        del data
        planes = [image] if image.ndim == 2 else [image[:, :, c] for c in range(image.shape[2])]
        del image  # the planes keep it; each is dropped once rendered
        planes = [correct_slice(p, correction) for p in planes]
    t_read = time.perf_counter()
    compute = [0.0]  # seconds spent making tiles while they are written
    if req.raw_dtype is not None:  # one grey file (channels exclude raw_dtype)
        if planes[0].dtype != np.dtype(req.raw_dtype):
            raise InvalidInput(
                f"raw_dtype {req.raw_dtype!r} keeps a 16-bit slice's values, but {source_url} "
                f"is {planes[0].dtype}"
            )
        source = stream_source_tiles(
            planes[0], req.transform, (width, height), tile_px=TILE_PX, window_px=env.window_px
        )
        wide_tiles.write(req.slice, source, compute)
    iw = req.intensity_window
    thumbs = []
    # Every channel: the same transform, its own CLAHE; each channel's tiles are written
    # while they are made, and its source plane is let go once it is mapped to 8 bits, so
    # memory holds one 8-bit channel, one processing window and one row of windows' tiles.
    for c, channel_tiles in enumerate(tiles_of):
        if planes:
            plane = planes.pop(0)
        else:  # one file per channel: read and decode one at a time (channel 0's is read)
            if c > 0:
                data = storage.read_bytes(channel_files[c], max_bytes=max_file)
            plane = correct_slice(
                decode_image(data, channel_files[c], max_pixels, max_decoded, 1),
                correction,
            )
            data = b""
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


def _check_channel_files(req: AlignedSliceRequest, first_url: str, first: ImageLayout) -> list[str]:
    """URLs of every channel's file of a slice stored one grey file per channel, each
    checked by its header (grey, the size and bit depth of the first) before any is
    read whole: the files are then read and decoded one at a time."""
    assert req.channel_imgs is not None
    found = [(first_url, first)]
    for img in req.channel_imgs:
        url = storage.bucket_url(req.dest, img)
        try:
            layout = image_layout(
                storage.read_bytes(url, 0, HEADER_BYTES), functools.partial(storage.read_bytes, url)
            )
        except UnreadableHeader as e:
            raise InvalidInput(f"{url} is not a PNG, TIFF or JPEG image: {e}") from None
        found.append((url, layout))
    for url, layout in found:
        if layout.file_channels != 1:
            raise InvalidInput(
                f"{url} has {layout.file_channels} channels; a slice stored one file per "
                "channel needs a grey file for each"
            )
        if (layout.width, layout.height, layout.sample_bytes) != (
            first.width,
            first.height,
            first.sample_bytes,
        ):
            raise InvalidInput(
                f"channel file {url} is {layout.width}x{layout.height} px, "
                f"{8 * layout.sample_bytes}-bit, but {first_url} is {first.width}x"
                f"{first.height} px, {8 * first.sample_bytes}-bit"
            )
    return [url for url, _ in found]


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
    app = create_service_app("emwrite")

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
