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

import functools
import json
import logging
import math
import os
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from flask import Flask

from emprocess import storage
from emprocess.errors import InvalidInput, NotFound
from emprocess.imageinfo import HEADER_BYTES, ImageLayout, UnreadableHeader, image_layout
from emprocess.images import decode_image
from emprocess.kernels import ngmeta, tiles
from emprocess.kernels.correct import SliceCorrection, correct_slice
from emprocess.kernels.intensity import to_uint8
from emprocess.kernels.render import (  # noqa: F401  (THUMB_* : the service's, re-exported)
    THUMB_MAX_PX,
    THUMB_MIN_FACTOR,
    StreamedTiles,
    colour_thumbnail,
    encode_thumbnail,
    render_slice,
    render_source_tiles,
    stream_slice,
    stream_source_tiles,
    thumbnail_factor,
)
from emprocess.kernels.warp import MAX_SOURCE_SIDE_PX
from emprocess.layout import (
    JPEG_PATH,
    RAW_PATH,
    SOURCE_TILES_PREFIX,
    TILES_PREFIX,
    channel_prefix,
    jpeg_channel_path,
    process_bucket,
    thumbnail_key,
    tile_prefixes,
    tiles_key,
)
from emprocess.models import (
    AlignedSliceRequest,
    NgMetaRequest,
    NgShardRequest,
    SliceStatsRequest,
)
from emprocess.services import guard
from emprocess.services.common import create_service_app, json_body, parse
from emprocess.services.pyramid import (
    Box,
    ChannelsWriter,
    OmeZarrVolume,
    PrecomputedWriter,
    VolumeWriter,
    ome_zarr_volume,
    write_pyramid,
)
from emprocess.services.shardfiles import FILE_IO_LOCKING
from emprocess.services.slicestats import slice_stats
from emprocess.settings import ServiceEnv, load

log = logging.getLogger(__name__)

TILE_PX = 1024
CUBE_PX = 1024
# Windows of up to 12288 px (+ one 1024 px CLAHE tile of context per side): a 16384^2
# slice is 2 x 2 windows, and warp and CLAHE redo 26% of its pixels as context
# (3 x 3 windows of 8192 px redid 56%, 14% more CPU) at a peak of 0.9 GiB.
_ENV = load(ServiceEnv)  # read once, at start-up: a bad value stops the service
WINDOW_PX = _ENV.window_px
SLAB_Z = ngmeta.MAX_SHARD_PX  # one z-layer of scale-0 shards
NUM_SCALES = 6
TILE_CODEC: tiles.Codec = _ENV.tile_codec
IO_THREADS = _ENV.io_threads
READ_BATCH = 64  # slices whose tile reads are in flight at once (64 MiB of tiles)
CPU_COUNT = (
    len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
)
MAX_PIXELS = _ENV.emwrite_max_pixels
# A decoded slice (pixels x channels x bytes per sample) may take at most this: a
# 32768^2 8-bit or a 23170^2 16-bit grey slice; a 16384^2 16-bit RGBA PNG needs 2 GiB.
MAX_DECODED_BYTES = _ENV.emwrite_max_image_bytes
MAX_FILE_BYTES = MAX_DECODED_BYTES + (1 << 20)  # an uncompressed TIFF plus its header
# The canvas holds every slice after its transform: a little larger than one slice
# (drift, rotation). Each side may be at most this many times the slice's longer
# side, plus one tile; the bound keeps a request's work in proportion to its input.
MAX_CANVAS_RATIO = 4


def tiles_url(bucket: str, z: int) -> str:
    """Where the tiled aligned slice z lives in the tmp bucket."""
    return storage.bucket_url(bucket, TILES_PREFIX + tiles_key(z))


def source_tiles_url(bucket: str, z: int) -> str:
    """Where the 16-bit tiled slice z lives (``raw_dtype`` "uint16")."""
    return storage.bucket_url(bucket, SOURCE_TILES_PREFIX + tiles_key(z))


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


def aligned_slice(req: AlignedSliceRequest) -> dict[str, Any]:
    """Warp, CLAHE and tile one slice; write the tiles object and the thumbnail.

    Returns:
        Seconds spent reading, computing and writing (also logged).
    """
    if req.shard_size != TILE_PX:
        raise InvalidInput(f"shard-size must be {TILE_PX}, got {req.shard_size}")
    t0 = time.perf_counter()
    width, height = req.bbox
    if width * height > MAX_PIXELS:
        raise InvalidInput(f"bbox {req.bbox} has more than {MAX_PIXELS} pixels")
    # Every name is built (and so checked) before the first read or write.
    source_url = storage.bucket_url(req.dest, req.img)
    outputs = (
        tiles_url(req.dest_tmp, req.slice),
        thumbnail_url(req),
        source_tiles_url(req.dest_tmp, req.slice),
    )
    channel_urls = [
        storage.bucket_url(req.dest_tmp, p + tiles_key(req.slice))
        for p in tile_prefixes(req.channels)
    ]
    guard.check_slice_buckets(req)
    data = storage.read_bytes(source_url, max_bytes=MAX_FILE_BYTES)
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
        image = decode_image(data, source_url, MAX_PIXELS, MAX_DECODED_BYTES, req.channels)
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
            planes[0], req.transform, (width, height), tile_px=TILE_PX, window_px=WINDOW_PX
        )
        _write_streamed(outputs[2], source, compute)
    iw = req.intensity_window
    thumbs = []
    # Every channel: the same transform, its own CLAHE; each channel's tiles are written
    # while they are made, and its source plane is let go once it is mapped to 8 bits, so
    # memory holds one 8-bit channel, one processing window and one row of windows' tiles.
    for c, url in enumerate(channel_urls):
        if planes:
            plane = planes.pop(0)
        else:  # one file per channel: read and decode one at a time (channel 0's is read)
            if c > 0:
                data = storage.read_bytes(channel_files[c], max_bytes=MAX_FILE_BYTES)
            plane = correct_slice(
                decode_image(data, channel_files[c], MAX_PIXELS, MAX_DECODED_BYTES, 1),
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
            window_px=WINDOW_PX,
            codec=TILE_CODEC,
        )
        del plane8
        _write_streamed(url, streamed, compute)
        assert streamed.thumbnail is not None
        thumbs.append(streamed.thumbnail)
    storage.write_bytes(outputs[1], encode_thumbnail(colour_thumbnail(thumbs), req.img))
    end = time.perf_counter()
    timings = {
        "read_s": t_read - t0,
        "compute_s": compute[0],
        "write_s": end - t_read - compute[0],
    }
    log.info("aligned slice %d (%s) %dx%d: %s", req.slice, req.img, width, height, timings)
    return timings


def _write_streamed(url: str, streamed: StreamedTiles, compute: list[float]) -> None:
    """Write a tiles object while it is made; add the seconds spent making it to compute[0]."""

    def timed() -> Iterator[bytes]:
        parts = iter(streamed.parts)
        while True:
            t = time.perf_counter()
            part = next(parts, None)
            compute[0] += time.perf_counter() - t
            if part is None:
                return
            yield part

    storage.write_stream(url, timed(), streamed.header, streamed.header_nbytes)


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


# -- /ngmeta -------------------------------------------------------------------


def _info(
    req: NgMetaRequest | NgShardRequest, encoding: ngmeta.Encoding, num_channels: int = 1
) -> dict[str, Any]:
    wide = encoding == "raw" and req.raw_dtype == "uint16"
    return ngmeta.build_info(
        (req.bbox[0], req.bbox[1]),
        req.minz,
        req.maxz,
        req.resolution,
        encoding,
        NUM_SCALES,
        data_type="uint16" if wide else "uint8",
        num_channels=num_channels,
    )


def target_channels(req: NgMetaRequest | NgShardRequest) -> list[tuple[int, int]]:
    """(first channel, count) of every volume of :func:`volume_targets`, in its order.

    The lossless volume holds all channels; the JPEG one (the format holds 1 or 3) the
    first three as RGB, or the first alone when there are fewer; with ``jpeg_channels``
    "each", every channel has a grey JPEG volume of its own.
    """
    c = req.channels or 1
    each = req.jpeg_channels == "each"
    jpeg = [(i, 1) for i in range(c)] if each else [(0, 3 if c >= 3 else 1)]
    return jpeg + ([(0, c)] if req.writes_precomputed_raw else [])


def volume_targets(req: NgMetaRequest | NgShardRequest) -> list[tuple[str, ngmeta.Encoding]]:
    """(URL, encoding) of every volume the request writes."""
    out: list[tuple[str, ngmeta.Encoding]] = [(storage.bucket_url(req.dest, JPEG_PATH), "jpeg")]
    if req.jpeg_channels == "each" and req.channels is not None:
        for c in range(1, req.channels):
            out.append((storage.bucket_url(req.dest, jpeg_channel_path(c)), "jpeg"))
    if req.writes_precomputed_raw:
        assert req.dest_raw is not None  # checked by the model
        out.append((storage.bucket_url(req.dest_raw, RAW_PATH), "raw"))
    return out


def _require_bucket(bucket: str, role: str) -> None:
    if not storage.bucket_exists(bucket):
        raise InvalidInput(f"{role} bucket {bucket!r} does not exist")


MAX_INFO_BYTES = 1 << 20  # an info of 6 scales is about 3 KB


def _describe_geometry(info: Any) -> str:
    """Scale 0's size, voxel offset and resolution, for messages."""
    scales = info.get("scales") if isinstance(info, dict) else None
    s0 = scales[0] if isinstance(scales, list) and scales and isinstance(scales[0], dict) else {}
    return (
        f"size {s0.get('size')}, voxel_offset {s0.get('voxel_offset')}, "
        f"resolution {s0.get('resolution')}"
    )


def _check_no_other_volume(url: str, info: dict[str, Any]) -> None:
    """Refuse to replace the info of a volume with another geometry that already has data.

    An info alone (no chunk or shard written yet) may be replaced: nothing is lost.
    """
    info_url = storage.join(url, "info")
    try:
        stored: Any = json.loads(storage.read_bytes(info_url, max_bytes=MAX_INFO_BYTES))
    except NotFound:
        return
    except ValueError:  # not JSON, or too large: not an info of ours
        stored = None
    if stored is not None and _volume_geometry(stored) == _volume_geometry(info):
        return
    # Keys sort digits before "info", so two listed keys show whether data exists.
    folder = url.rstrip("/") + "/"
    listed = storage.list_keys(folder, limit=2)
    prefix = storage.parse_url(folder).key
    if any(key != prefix + "info" for key in listed):
        raise InvalidInput(
            f"{info_url} describes another volume that already has data "
            f"({_describe_geometry(stored)}) than this request ({_describe_geometry(info)}); "
            "an existing volume is never replaced: use another run id, or delete it first"
        )


def ng_meta(req: NgMetaRequest) -> None:
    """Write the info files; the same request always writes the same bytes.

    Everything is checked before the first write: the buckets, and that no info
    of another volume with data would be replaced.
    """
    guard.check_volume_buckets(req)
    infos = []
    for (url, encoding), (_, count) in zip(volume_targets(req), target_channels(req), strict=True):
        info = _info(req, encoding, count)
        _check_no_other_volume(url, info)
        infos.append((url, json.dumps(info, indent=1).encode()))
    zarr = ome_zarr_volume(req, NUM_SCALES, CUBE_PX)
    if zarr is not None:
        zarr.check_no_other_volume()
    for url, data in infos:
        storage.write_bytes(storage.join(url, "info"), data, "application/json")
    if zarr is not None:
        zarr.write_metadata()


# -- /ngshard ------------------------------------------------------------------


def _read_range(kv: Any, key: str, lo: int, hi: int) -> Any:
    """Start an async read of bytes [lo, hi) of ``key``."""
    return kv.read(key, byte_range=slice(lo, hi))


def _range_result(future: Any, what: str) -> bytes | None:
    """The bytes of a finished range read; None if the object is missing.

    A range beyond the object's end means the object was cut short: the caller's
    input is bad (400). Other storage errors propagate (500, retried by the DAG).
    """
    try:
        result = future.result()
    except ValueError as e:
        if str(e).startswith("OUT_OF_RANGE"):  # its text may name a local path: left out
            raise InvalidInput(f"{what} is cut short") from None
        raise
    return bytes(result.value) if result.state == "value" else None


def read_cube_slab(
    req: NgShardRequest,
    z_lo: int,
    z_hi: int,
    xy_box: tuple[int, int, int, int],
    kv: Any,
    dtype: type = np.uint8,
    prefix: str = TILES_PREFIX,
) -> np.ndarray:
    """Tiles (start x, start y) of slices z_lo..z_hi-1, within ``xy_box`` (x0, y0, x1, y1,
    canvas pixels inside the tile), as a (z, y, x) ``dtype`` array.

    ``kv`` is a tensorstore kvstore of the tmp bucket's ``aligned/`` folder. Each
    slice costs two range reads, its header and then its tile (the tile's offset
    is in the header); they are issued asynchronously ``READ_BATCH`` slices at a
    time, so on GCS the round trips overlap, and tensorstore's HTTP client costs
    about 0.5 ms of CPU per read where google-cloud-storage's costs 3 ms.
    """
    width, height = req.bbox
    cx, cy = req.start[0], req.start[1]
    x0, y0, x1, y1 = xy_box
    slab: np.ndarray = np.empty((z_hi - z_lo, y1 - y0, x1 - x0), dtype)
    head_len = tiles.header_nbytes(width, height, TILE_PX)
    for b_lo in range(z_lo, z_hi, READ_BATCH):
        zs = range(b_lo, min(z_hi, b_lo + READ_BATCH))
        heads = [_read_range(kv, tiles_key(z), 0, head_len) for z in zs]
        bodies = []
        for z, head in zip(zs, heads, strict=True):
            url = storage.bucket_url(req.source, prefix + tiles_key(z))
            try:
                data = _range_result(head, url)
                index = None if data is None else tiles.parse_header(data, width, height, TILE_PX)
            except InvalidInput as e:
                raise InvalidInput(f"aligned slice {z} ({url}) is unusable: {e}") from None
            if index is None:
                raise InvalidInput(f"aligned slice {z} is missing ({url}); run /alignedslice first")
            bodies.append((index, _read_range(kv, tiles_key(z), *index.byte_range(cx, cy))))
        for z, (index, body) in zip(zs, bodies, strict=True):
            url = storage.bucket_url(req.source, prefix + tiles_key(z))
            try:
                data = _range_result(body, url)
                if data is None:
                    raise InvalidInput("it vanished while it was read")
                tile = tiles.decode_tile(index, cx, cy, data)
            except InvalidInput as e:
                raise InvalidInput(f"aligned slice {z} ({url}) is unusable: {e}") from None
            if tile.dtype != dtype:
                raise InvalidInput(
                    f"aligned slice {z} ({url}) is {tile.dtype}, expected {np.dtype(dtype)}"
                )
            ox, oy = x0 - cx * TILE_PX, y0 - cy * TILE_PX
            slab[z - z_lo] = tile[oy : oy + y1 - y0, ox : ox + x1 - x0]
    return slab


def _volume_geometry(info: Any) -> Any:
    """The info without the chunks' data encoding, which writers may choose freely."""
    if not isinstance(info, dict) or not isinstance(info.get("scales"), list):
        return info
    scales = [
        {**s, "sharding": {k: v for k, v in s["sharding"].items() if k != "data_encoding"}}
        if isinstance(s, dict) and isinstance(s.get("sharding"), dict)
        else s
        for s in info["scales"]
    ]
    return {**info, "scales": scales}


def _check_info(url: str, expected: dict[str, Any]) -> None:
    """The volume's info must exist and describe the request's volume."""
    info_url = storage.join(url, "info")
    try:
        stored = json.loads(storage.read_bytes(info_url))
    except NotFound:
        raise InvalidInput(f"{info_url} does not exist; run /ngmeta first") from None
    except ValueError:
        raise InvalidInput(f"{info_url} is not JSON; run /ngmeta again") from None
    if _volume_geometry(stored) != _volume_geometry(expected):
        s0 = (stored.get("scales") or [{}])[0] if isinstance(stored, dict) else {}
        e0 = expected["scales"][0]
        raise InvalidInput(
            f"{info_url} describes another volume (size {s0.get('size')}, voxel_offset "
            f"{s0.get('voxel_offset')}, resolution {s0.get('resolution')}, data_type "
            f"{stored.get('data_type') if isinstance(stored, dict) else None}) than this "
            f"request (size {e0['size']}, voxel_offset {e0['voxel_offset']}, resolution "
            f"{e0['resolution']}, data_type {expected['data_type']}); run /ngmeta with the "
            "same bbox, minz, maxz, resolution and raw_dtype"
        )


def _ts_context() -> Any:
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
            "file_io_concurrency": {"limit": IO_THREADS},
            "file_io_sync": False,
            "cache_pool": {"total_bytes_limit": 0},
            **FILE_IO_LOCKING,  # a killed writer's lock file is never reused (shardfiles)
        }
    )


def _check_tile_paths(req: NgShardRequest, box: Box) -> None:
    """tensorstore follows links and opens FIFOs: every tiles object the cube reads (8-bit,
    every channel's, and the 16-bit ones of ``raw_dtype``) must be a regular file (or
    missing) inside its bucket, its folders too."""
    prefixes = tile_prefixes(req.channels)
    if req.raw_dtype == "uint16" and req.write_raw:
        prefixes.append(SOURCE_TILES_PREFIX)
    (_, _, z_first), (_, _, z_end) = box
    for prefix in prefixes:
        storage.check_inside(storage.bucket_url(req.source, prefix.rstrip("/")))
        for z in range(z_first, z_end):
            url = storage.bucket_url(req.source, prefix + tiles_key(z))
            storage.check_inside(url, regular_file=True)


def _check_volume_paths(url: str, info: dict[str, Any]) -> None:
    """No scale folder of the volume may be a link out of its bucket (tensorstore writes
    through it); a link at a shard file is replaced, not followed (written by rename)."""
    for scale in info["scales"]:
        storage.check_inside(storage.join(url, scale["key"]))


def ng_shard(req: NgShardRequest) -> dict[str, Any]:
    """Build cube ``start`` from the tiles and write every scale of every volume.

    Returns:
        Seconds spent reading tiles, writing shards and downsampling (also logged).
    """
    t0 = time.perf_counter()
    bbox = (req.bbox[0], req.bbox[1])
    layouts = ngmeta.scale_layouts(req.resolution, NUM_SCALES, cube=CUBE_PX)
    scale_boxes = [
        ngmeta.cube_bounds_xyz(req.start, bbox, req.minz, req.maxz, s, CUBE_PX, layout.factor)
        for s, layout in enumerate(layouts)
    ]
    guard.check_volume_buckets(req)
    targets = volume_targets(req)
    for (url, encoding), (_, count) in zip(targets, target_channels(req), strict=True):
        info = _info(req, encoding, count)
        _check_info(url, info)
        _check_volume_paths(url, info)
    _check_tile_paths(req, scale_boxes[0])
    zarr = ome_zarr_volume(req, NUM_SCALES, CUBE_PX)
    if zarr is not None:
        zarr.check_metadata()
        zarr.check_paths()
    import tensorstore as ts

    context = _ts_context()
    # One pass per source of voxels: the 8-bit tiles feed the JPEG volume (and the
    # lossless one, unless it keeps the 16-bit source tiles, read in a second pass).
    wide = req.raw_dtype == "uint16"
    # The last element: whether the pass feeds the lossless volume (its OME-Zarr too).
    passes: list[tuple[str, type, list[str], bool]] = [
        (TILES_PREFIX, np.uint8, [u for u, e in targets if not (wide and e == "raw")], not wide)
    ]
    if wide and req.write_raw:
        urls = [u for u, e in targets if e == "raw"]
        passes.append((SOURCE_TILES_PREFIX, np.uint16, urls, True))
    timings: dict[str, float] = {}
    if req.channels is not None:
        passes = []  # one pass reads every channel's tiles: voxels (z, y, x, channel)
        timings = _write_channels(req, scale_boxes, layouts, targets, context, zarr)
    for prefix, dtype, urls, lossless in passes:
        writers: list[VolumeWriter] = [PrecomputedWriter(url, layouts, context) for url in urls]
        if zarr is not None and lossless:
            writers.append(zarr.writer(layouts, req.minz, context))
        spec = storage.kvstore_spec(storage.bucket_url(req.source, prefix))
        kv = ts.KvStore.open(spec, context=context).result()

        def read(
            z_lo: int,
            z_hi: int,
            xy_box: tuple[int, int, int, int],
            kv: Any = kv,
            dtype: type = dtype,
            prefix: str = prefix,
        ) -> Any:
            return read_cube_slab(req, z_lo, z_hi, xy_box, kv, dtype, prefix)

        size = np.dtype(dtype).itemsize
        part = write_pyramid(read, scale_boxes, layouts, writers, SLAB_Z, size)
        timings = {k: timings.get(k, 0.0) + v for k, v in part.items()}
    timings["total_s"] = time.perf_counter() - t0
    log.info("cube %s written: %s", req.start, {k: round(v, 3) for k, v in timings.items()})
    return timings


def _write_channels(
    req: NgShardRequest,
    scale_boxes: list[Box],
    layouts: list[ngmeta.ScaleLayout],
    targets: list[tuple[str, ngmeta.Encoding]],
    context: Any,
    zarr: OmeZarrVolume | None = None,
) -> dict[str, float]:
    """Every scale of a colour cube: its slabs are (z, y, x, channel), read from each
    channel's tiles; the lossless volume takes all channels, the JPEG one its own."""
    import tensorstore as ts

    assert req.channels is not None
    kvs = [
        ts.KvStore.open(
            storage.kvstore_spec(storage.bucket_url(req.source, prefix)), context=context
        ).result()
        for prefix in tile_prefixes(req.channels)
    ]
    writers: list[VolumeWriter] = [
        ChannelsWriter(PrecomputedWriter(url, layouts, context), first, count)
        for (url, _), (first, count) in zip(targets, target_channels(req), strict=True)
    ]
    if zarr is not None:  # the OME-Zarr volume holds every channel
        writers.append(ChannelsWriter(zarr.writer(layouts, req.minz, context), 0, req.channels))

    def read(z_lo: int, z_hi: int, xy_box: tuple[int, int, int, int]) -> np.ndarray:
        x0, y0, x1, y1 = xy_box
        slab = np.empty((z_hi - z_lo, y1 - y0, x1 - x0, len(kvs)), np.uint8)
        for c, kv in enumerate(kvs):
            slab[..., c] = read_cube_slab(req, z_lo, z_hi, xy_box, kv, np.uint8, channel_prefix(c))
        return slab

    return write_pyramid(read, scale_boxes, layouts, writers, SLAB_Z, len(kvs))


def create_app() -> Flask:
    """The WSGI app (gunicorn: ``'emprocess.services.emwrite:create_app()'``)."""
    app = create_service_app("emwrite")

    @app.post("/alignedslice")
    def alignedslice() -> Any:
        aligned_slice(parse(AlignedSliceRequest, json_body()))
        return "success", 200, {"Content-Type": "text/plain"}

    @app.post("/slicestats")
    def slicestats() -> Any:
        req = parse(SliceStatsRequest, json_body())
        return slice_stats(req, MAX_PIXELS, MAX_DECODED_BYTES, MAX_FILE_BYTES)

    @app.post("/ngmeta")
    def ngmeta_route() -> Any:
        ng_meta(parse(NgMetaRequest, json_body()))
        return "success", 200, {"Content-Type": "text/plain"}

    @app.post("/ngshard")
    def ngshard() -> Any:
        ng_shard(parse(NgShardRequest, json_body()))
        return "success", 200, {"Content-Type": "text/plain"}

    return app
