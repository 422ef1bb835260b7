"""A cube's pyramid written scale by scale, behind one seam for the output format.

:func:`write_pyramid` owns the scales: it reads scale 0 in z-slabs, hands every block
to each :class:`VolumeWriter`, and downsamples per :class:`~emprocess.kernels.ngmeta.ScaleLayout`
(2x2x2, or 2x2x1 while anisotropic voxels keep z). A writer owns the format:
:class:`PrecomputedWriter` writes neuroglancer precomputed shards with tensorstore;
:class:`OmeZarrWriter` writes the OME-Zarr 0.5 multiscale of the lossless volume (sharded
Zarr v3 through tensorstore's ``zarr3`` driver), whose metadata :class:`OmeZarrVolume`
writes (/ngmeta) and checks (/ngshard). :func:`write_cube` wires one /ngshard cube: which
tiled slices (``TiledSlices.reader``) feed which volumes of the request's
(:func:`emprocess.volume.request_volumes`).
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from emprocess import storage
from emprocess.errors import InvalidInput, NotFound
from emprocess.geometry import Box, RectXY
from emprocess.kernels import ngmeta, omezarr
from emprocess.kernels.downsample import downsample_mean_steps
from emprocess.kernels.ngmeta import ScaleLayout
from emprocess.layout import RAW_OME_ZARR_PATH
from emprocess.models import NgMetaRequest, NgShardRequest
from emprocess.services.shardfiles import ShardFiles

if TYPE_CHECKING:
    from emprocess.volume import RequestVolumes

__all__ = ["Box", "RectXY"]  # the geometry's, re-exported for the pyramid's callers

SLAB_Z = ngmeta.MAX_SHARD_PX
"""Slices of a cube read and written at once: one z-layer of scale-0 shards."""


class VolumeWriter(Protocol):
    """Where a cube's blocks go: one output volume in one format."""

    def write(self, scale: int, lo_xyz: tuple[int, int, int], data_zyx: np.ndarray) -> None:
        """Write a (z, y, x) or (z, y, x, channel) block of ``scale`` at voxel ``lo_xyz``."""


class ChannelsWriter:
    """Hands a writer ``count`` channels from ``first`` of (z, y, x, channel) blocks."""

    def __init__(self, inner: VolumeWriter, first: int, count: int) -> None:
        self.inner, self.first, self.count = inner, first, count

    def write(self, scale: int, lo_xyz: tuple[int, int, int], data_zyx: np.ndarray) -> None:
        """Write the block's channels (one channel as a (z, y, x) block)."""
        if self.count == 1:
            part = data_zyx[..., self.first]
        else:
            part = data_zyx[..., self.first : self.first + self.count]
        self.inner.write(scale, lo_xyz, part)


class PrecomputedWriter:
    """A neuroglancer precomputed volume (its ``info`` written already), one shard at a time."""

    def __init__(self, url: str, layouts: Sequence[ScaleLayout], context: Any) -> None:
        import tensorstore as ts

        spec = storage.kvstore_spec(url)
        self.url = url
        self.shards = ShardFiles.of(url)  # stale locks removed, each shard read back
        self.layouts = list(layouts)
        self.stores = [
            ts.open(
                {"driver": "neuroglancer_precomputed", "kvstore": spec, "scale_index": s},
                open=True,
                context=context,
            ).result()
            for s in range(len(self.layouts))
        ]

    def write(self, scale: int, lo_xyz: tuple[int, int, int], data_zyx: np.ndarray) -> None:
        """Write the block, one transaction per shard of the scale's layout.

        ``lo`` lies on the scale's shard grid (blocks start at cube or slab corners), so
        each transaction overwrites every chunk of exactly one shard: tensorstore then
        writes the shard file whole, without reading what is there (a truncated file
        left by a failed request is replaced), and holds one shard's chunks at a time
        (128 MiB uncompressed at 512^3) rather than the block's. A shard whose voxels are
        all 0 is deleted instead: tensorstore stores no chunk equal to the fill value and
        then leaves the file as it was, so old data would still be read back.
        """
        import tensorstore as ts

        store = self.stores[scale]
        nz, ny, nx = data_zyx.shape[:3]
        channels = slice(None) if data_zyx.ndim == 4 else 0
        x, y, z = lo_xyz
        sx, sy, sz = self.layouts[scale].shard
        for dz in range(0, nz, sz):
            for dy in range(0, ny, sy):
                for dx in range(0, nx, sx):
                    part = data_zyx[dz : dz + sz, dy : dy + sy, dx : dx + sx]
                    pz, py, px = part.shape[:3]
                    key = self.shards.key(scale, (x + dx, y + dy, z + dz))
                    if key and not part.any():  # no chunk: the shard goes (20.8)
                        storage.delete(storage.join(self.url, key))
                        continue
                    if key:
                        self.shards.remove_stale_locks(key)
                    txn = ts.Transaction()
                    view = store.with_transaction(txn)[
                        x + dx : x + dx + px, y + dy : y + dy + py, z + dz : z + dz + pz, channels
                    ]
                    view.write(np.swapaxes(part, 0, 2)).result()
                    txn.commit_async().result()
                    if key:
                        self.shards.check(scale, key)


class OmeZarrWriter:
    """The OME-Zarr multiscale at ``url`` (its metadata written already), one shard at a time.

    Blocks come in precomputed coordinates (z from ``minz // f_z``); the arrays start at
    slice ``minz`` (see :mod:`emprocess.kernels.omezarr`), so z is shifted per scale.
    """

    def __init__(self, url: str, layouts: Sequence[ScaleLayout], minz: int, context: Any) -> None:
        import tensorstore as ts

        self.layouts = list(layouts)
        self.z_offsets = [omezarr.z_offset(minz, layout) for layout in self.layouts]
        specs = [
            storage.kvstore_spec(storage.join(url, omezarr.dataset_path(s)))
            for s in range(len(self.layouts))
        ]
        self.stores = [
            ts.open({"driver": "zarr3", "kvstore": spec}, open=True, context=context).result()
            for spec in specs
        ]
        self.kvstores = [ts.KvStore.open(spec, context=context).result() for spec in specs]

    def write(self, scale: int, lo_xyz: tuple[int, int, int], data_zyx: np.ndarray) -> None:
        """Write the block, one transaction per shard, each shard file deleted first.

        As :meth:`PrecomputedWriter.write`, each transaction covers every chunk of one
        shard that lies in the array. A shard that reaches past the array's end (the
        volume's edge, or a stack thinner than a shard) has chunks no one writes, and
        tensorstore then reads the shard to keep them: a truncated or damaged file left by
        a failed request would fail every retry ("DATA_LOSS"). The shard belongs to this
        request alone, so it is deleted first and written anew: a repeated request gives
        the same bytes, and a damaged shard is replaced.
        """
        import tensorstore as ts

        store, kv = self.stores[scale], self.kvstores[scale]
        channels = ["0"] if data_zyx.ndim == 4 else []
        nz, ny, nx = data_zyx.shape[:3]
        x, y, z = lo_xyz
        z -= self.z_offsets[scale]
        sx, sy, sz = self.layouts[scale].shard
        for dz in range(0, nz, sz):
            for dy in range(0, ny, sy):
                for dx in range(0, nx, sx):
                    part = data_zyx[dz : dz + sz, dy : dy + sy, dx : dx + sx]
                    pz, py, px = part.shape[:3]
                    box = (
                        slice(z + dz, z + dz + pz),
                        slice(y + dy, y + dy + py),
                        slice(x + dx, x + dx + px),
                    )
                    grid = [str(b.start // n) for b, n in zip(box, (sz, sy, sx), strict=True)]
                    kv.write("/".join(["c", *channels, *grid]), None).result()  # delete
                    txn = ts.Transaction()
                    if part.ndim == 4:  # (z, y, x, c) -> (c, z, y, x)
                        view = store.with_transaction(txn)[(slice(None), *box)]
                        view.write(np.moveaxis(part, 3, 0)).result()
                    else:
                        store.with_transaction(txn)[box].write(part).result()
                    txn.commit_async().result()


MAX_ZARR_JSON_BYTES = 1 << 20  # a group of 6 scales is about 2 KB


class OmeZarrVolume:
    """The metadata of one OME-Zarr multiscale at ``url``: written once, never replaced.

    Args:
        url: the group's URL (``gs://SOURCE_chunk_ID/raw.ome.zarr``).
        documents: every ``zarr.json`` by key relative to the group
            (:func:`~emprocess.kernels.omezarr.volume_documents`).
    """

    def __init__(self, url: str, documents: dict[str, bytes]) -> None:
        self.url = url.rstrip("/")
        self.documents = documents

    def _stored(self, key: str) -> Any:
        """The parsed document at ``key``; None when absent, ``...`` when not JSON."""
        try:
            data = storage.read_bytes(storage.join(self.url, key), max_bytes=MAX_ZARR_JSON_BYTES)
        except NotFound:
            return None
        try:
            return json.loads(data)
        except ValueError:
            return ...

    def _differing(self) -> dict[str, Any]:
        """Keys whose stored document is absent (None) or another than ours, with it."""
        stored = {key: self._stored(key) for key in self.documents}
        return {key: doc for key, doc in stored.items() if doc != json.loads(self.documents[key])}

    def _require_bucket(self) -> None:
        bucket = storage.parse_url(self.url).bucket
        if not storage.bucket_exists(bucket):
            raise InvalidInput(f"destination bucket {bucket!r} does not exist")

    def check_no_other_volume(self) -> None:
        """Refuse when the bucket is missing, or the group describes another volume that
        already has data.

        Metadata alone (no shard written yet) may be replaced: nothing is lost.
        """
        self._require_bucket()
        differing = [key for key, doc in self._differing().items() if doc is not None]
        if not differing:
            return
        # Shards (S/c/...) sort before S/zarr.json, and scale 0 is written first.
        listed = storage.list_keys(self.url + "/", limit=2 * len(self.documents) + 2)
        prefix = storage.parse_url(self.url + "/").key
        data = [k for k in listed if not k.removeprefix(prefix).endswith(omezarr.ZARR_JSON)]
        if data:
            raise InvalidInput(
                f"{storage.join(self.url, differing[0])} describes another volume that "
                "already has data than this request; an existing volume is never "
                "replaced: use another run id, or delete it first"
            )

    def write_metadata(self) -> None:
        """Write every document (the same request, the same bytes); check first."""
        self.check_no_other_volume()
        for key, data in self.documents.items():
            storage.write_bytes(storage.join(self.url, key), data, "application/json")

    def check_paths(self) -> None:
        """No array folder (nor its ``c`` folder of shards) may be a link out of the bucket:
        tensorstore writes through links, as for the precomputed scale folders."""
        for key in self.documents:
            folder = key.removesuffix(omezarr.ZARR_JSON).rstrip("/")
            if folder:
                storage.check_inside(storage.join(self.url, folder))
                storage.check_inside(storage.join(self.url, folder, "c"))

    def writer(self, layouts: Sequence[ScaleLayout], minz: int, context: Any) -> OmeZarrWriter:
        """The volume's writer (after :meth:`check_metadata`)."""
        return OmeZarrWriter(self.url, layouts, minz, context)

    def check_metadata(self) -> None:
        """The group and its arrays must exist and describe this volume (before /ngshard)."""
        self._require_bucket()
        for key, doc in self._differing().items():
            url = storage.join(self.url, key)
            if doc is None:
                raise InvalidInput(f"{url} does not exist; run /ngmeta first")
            raise InvalidInput(
                f"{url} describes another volume than this request's OME-Zarr volume; run "
                "/ngmeta with the same bbox, minz, maxz, resolution, raw_dtype and channels"
            )


def ome_zarr_volume(
    req: NgMetaRequest | NgShardRequest, num_scales: int, cube: int
) -> OmeZarrVolume | None:
    """The OME-Zarr lossless volume of a /ngmeta or /ngshard request (``raw_format``):
    ``dest_raw``'s ``raw.ome.zarr``, named after that bucket (SOURCE_chunk_RUN_ID); None
    when the request writes none."""
    if not req.writes_ome_zarr:
        return None
    assert req.dest_raw is not None  # writeRaw needs it (the model checks)
    documents = omezarr.volume_documents(
        (req.bbox[0], req.bbox[1]),
        req.minz,
        req.maxz,
        req.resolution,
        num_scales,
        req.raw_dtype or "uint8",
        req.channels or 1,
        req.dest_raw,
        cube,
    )
    return OmeZarrVolume(storage.bucket_url(req.dest_raw, RAW_OME_ZARR_PATH), documents)


ReadSlab = Callable[[int, int, RectXY], np.ndarray]
"""Reads scale-0 slices [z_lo, z_hi) of the cube, within a rectangle (x0, y0, x1, y1), as
a (z, y, x) or (z, y, x, channel) array (``services.tilestore.TileReader``)."""

MAX_BLOCK_BYTES = 1 << 30
"""Largest scale-0 block read at once: a slab of the whole cube when it fits (a grey
8-bit slab is 512 MiB, a 16-bit or two-channel one 1 GiB), else the slab is read and
written in shard-wide columns (an RGBA slab of 2 GiB in 4 blocks of 512 MiB, each of its
tiles then read once per column)."""


def plan_columns(
    box: Box, shard_xy: tuple[int, int], slab_z: int, voxel_bytes: int
) -> list[RectXY]:
    """The (x0, y0, x1, y1) columns each scale-0 slab of ``box`` is read and written in.

    The whole box when a slab of it takes at most ``MAX_BLOCK_BYTES``; else columns one
    scale-0 shard wide (their edges lie on the shard grid, so each writer transaction
    still covers whole shards, and on even voxels, so the 2x downsampling of the columns
    equals that of the whole slab).
    """
    (lx, ly, _), (hx, hy, _) = box
    if slab_z * (hx - lx) * (hy - ly) * voxel_bytes <= MAX_BLOCK_BYTES:
        return [RectXY(lx, ly, hx, hy)]
    sx, sy = shard_xy
    return [
        RectXY(x0, y0, min(hx, x0 + sx), min(hy, y0 + sy))
        for y0 in range(ly, hy, sy)
        for x0 in range(lx, hx, sx)
    ]


def write_pyramid(
    read_slab: ReadSlab,
    boxes: Sequence[Box],
    layouts: Sequence[ScaleLayout],
    writers: Sequence[VolumeWriter],
    slab_z: int,
    voxel_bytes: int = 1,
) -> dict[str, float]:
    """Write every scale of one cube to every writer.

    Scale 0 is read and written in z-slabs of ``slab_z`` (bounded memory), each in
    columns when it is large (:func:`plan_columns`); scale 1 is filled block by block
    into one array, and each further scale is the previous one downsampled.

    Args:
        read_slab: the cube's scale-0 voxels of slices [z_lo, z_hi) within a column.
        boxes: the cube's [lo, hi) box at every scale (``ngmeta.cube_bounds_xyz``).
        layouts: every scale's layout (``ngmeta.scale_layouts``).
        writers: the output volumes.
        slab_z: slices per scale-0 slab, a multiple of the scale-0 shard depth.
        voxel_bytes: bytes of one voxel (channels x bytes per sample), for the columns.

    Returns:
        Seconds spent reading, writing and downsampling.
    """
    steps = [
        (b.factor[2] // a.factor[2], b.factor[1] // a.factor[1], b.factor[0] // a.factor[0])
        for a, b in itertools.pairwise(layouts)
    ]
    (lx, ly, lz), (_, _, hz) = boxes[0]
    shard = layouts[0].shard
    columns = plan_columns(boxes[0], (shard[0], shard[1]), slab_z, voxel_bytes)
    timings = {"read_s": 0.0, "write_s": 0.0, "downsample_s": 0.0}
    level: np.ndarray | None = None
    if steps:
        lo1, hi1 = boxes[1]
        shape1 = (hi1[2] - lo1[2], hi1[1] - lo1[1], hi1[0] - lo1[0])
    for z_lo in range(lz, hz, slab_z):
        for rect in columns:
            x0, y0 = rect.x0, rect.y0
            t = time.perf_counter()
            block = read_slab(z_lo, min(hz, z_lo + slab_z), rect)
            timings["read_s"] += time.perf_counter() - t
            t = time.perf_counter()
            for writer in writers:
                writer.write(0, (x0, y0, z_lo), block)
            timings["write_s"] += time.perf_counter() - t
            if steps:
                t = time.perf_counter()
                half = _downsample(block, steps[0])
                del block
                if level is None:
                    level = np.empty(shape1 + half.shape[3:], half.dtype)
                sz, sy, sx = steps[0]
                oz, oy, ox = (z_lo - lz) // sz, (y0 - ly) // sy, (x0 - lx) // sx
                hz1, hy1, hx1 = half.shape[:3]
                if oz + hz1 > shape1[0] or oy + hy1 > shape1[1] or ox + hx1 > shape1[2]:
                    raise RuntimeError(f"scale 1 block {half.shape} at {(oz, oy, ox)} > {shape1}")
                level[oz : oz + hz1, oy : oy + hy1, ox : ox + hx1] = half
                del half
                timings["downsample_s"] += time.perf_counter() - t
            else:
                del block
    if level is None:
        return timings
    for s in range(1, len(layouts)):
        lo, hi = boxes[s]
        expected = (hi[2] - lo[2], hi[1] - lo[1], hi[0] - lo[0])
        if level.shape[:3] != expected:
            raise RuntimeError(f"scale {s} block is {level.shape}, expected {expected}")
        t = time.perf_counter()
        for writer in writers:
            writer.write(s, lo, level)
        timings["write_s"] += time.perf_counter() - t
        if s < len(steps):
            t = time.perf_counter()
            level = _downsample(level, steps[s])
            timings["downsample_s"] += time.perf_counter() - t
    return timings


def _downsample(volume: np.ndarray, step_zyx: tuple[int, int, int]) -> np.ndarray:
    """:func:`downsample_mean_steps` of a (z, y, x) block, or of each channel of a
    (z, y, x, channel) one."""
    if volume.ndim == 3:
        return downsample_mean_steps(volume, step_zyx)
    return np.stack(
        [
            downsample_mean_steps(np.ascontiguousarray(volume[..., c]), step_zyx)
            for c in range(volume.shape[3])
        ],
        axis=-1,
    )


def write_cube(
    volumes: RequestVolumes,
    tmp_bucket: str,
    write_raw: bool,
    boxes: Sequence[Box],
    context: Any,
    slab_z: int = SLAB_Z,
) -> dict[str, float]:
    """Every scale of one cube, read from the tiles of its slices, to every volume.

    Grey slices take one pass per source of voxels: the 8-bit tiles feed the JPEG volume
    (and the lossless one, unless it keeps the 16-bit tiles, read in a second pass).
    Colour slices take one pass whose blocks are (z, y, x, channel), read from each
    channel's tiles: the lossless volumes take every channel, each JPEG one its own.

    Args:
        volumes: what the request writes (``volume.request_volumes``), checked already.
        tmp_bucket: the bucket of the tiled slices.
        write_raw: whether the lossless volume(s) are written.
        boxes: the cube's box at every scale (``VolumeGeometry.cube_boxes``).
        context: the request's tensorstore context.
        slab_z: scale-0 slices per slab.

    Returns:
        Seconds spent reading, writing and downsampling.
    """
    from emprocess.volume import TiledSlices

    layouts = volumes.geometry.layouts()
    zarr = volumes.ome_zarr
    minz = volumes.geometry.minz
    if volumes.channels is not None:
        readers = [
            t.reader(volumes.geometry.bbox_xy, context) for t in volumes.tiles(tmp_bucket, False)
        ]
        writers: list[VolumeWriter] = [
            ChannelsWriter(v.writer(context), v.first_channel, v.channels)
            for v in volumes.precomputed
        ]
        if zarr is not None:  # the OME-Zarr volume holds every channel
            writers.append(ChannelsWriter(zarr.writer(layouts, minz, context), 0, len(readers)))

        def read(z_lo: int, z_hi: int, rect: RectXY) -> np.ndarray:
            slab = np.empty((z_hi - z_lo, rect.height, rect.width, len(readers)), np.uint8)
            for c, reader in enumerate(readers):
                slab[..., c] = reader(z_lo, z_hi, rect)
            return slab

        return write_pyramid(read, boxes, layouts, writers, slab_z, len(readers))
    wide = volumes.wide
    # (tiles, volumes, whether the pass feeds the lossless volume, its OME-Zarr too)
    passes = [
        (
            TiledSlices.channel(tmp_bucket),
            [v for v in volumes.precomputed if not (wide and v.encoding == "raw")],
            not wide,
        )
    ]
    if wide and write_raw:
        lossless = [v for v in volumes.precomputed if v.encoding == "raw"]
        passes.append((TiledSlices.wide(tmp_bucket), lossless, True))
    timings: dict[str, float] = {}
    for tiles, targets, feeds_lossless in passes:
        writers = [v.writer(context) for v in targets]
        if zarr is not None and feeds_lossless:
            writers.append(zarr.writer(layouts, minz, context))
        reader = tiles.reader(volumes.geometry.bbox_xy, context)
        size = np.dtype(tiles.dtype).itemsize
        part = write_pyramid(reader, boxes, layouts, writers, slab_z, size)
        timings = {k: timings.get(k, 0.0) + v for k, v in part.items()}
    return timings
