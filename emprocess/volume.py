"""The run's volumes and their scales: where each lives, what it holds, how it is read and written.

A run has, by the request's fields (CONTRACTS.md, /ngmeta and /ngshard):

- the JPEG volume ``gs://SOURCE_ng_ID/neuroglancer/jpeg`` (grey, or the first three
  channels as RGB), and with ``jpeg_channels`` "each" one grey JPEG volume per channel
  (``neuroglancer/jpeg_cC`` for C >= 1);
- the lossless volume ``gs://SOURCE_chunk_ID/neuroglancer/raw`` (every channel; 16-bit
  with ``raw_dtype`` "uint16"), and/or the same as OME-Zarr in ``raw.ome.zarr``
  (``raw_format``);
- the tiled aligned slices they are built from, in the tmp bucket (:class:`TiledSlices`:
  8-bit grey, each channel's, the 16-bit ones).

Each :class:`PrecomputedVolume` owns its URL, its ``info`` (URL, document, the check
that a stored one describes it) and its scales' URLs; both IO seams hang off the model:
a volume's :meth:`~PrecomputedVolume.writer` (``services.pyramid.VolumeWriter``) and the
tiled slices' :meth:`~TiledSlices.reader` (``services.tilestore.TileReader``) and
:meth:`~TiledSlices.write`. :func:`request_volumes` holds the format rules: which
volumes a request writes, with which channels and data type; which tiles feed which
volume is :func:`emprocess.services.pyramid.write_cube`'s. A second output format is a
second writer (as ``OmeZarrWriter`` beside ``PrecomputedWriter``), not edits across files.

Only the standard library, storage and the naming modules at import: the DAG and
``view`` ask it for URLs; numpy and tensorstore come in with the IO seams.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any, Literal

from emprocess import storage
from emprocess.errors import InvalidInput, NotFound
from emprocess.geometry import CUBE_PX, Box
from emprocess.kernels import ngmeta
from emprocess.layout import (
    RAW_PATH,
    SOURCE_TILES_PREFIX,
    channel_prefix,
    jpeg_channel_path,
    tiles_key,
)

if TYPE_CHECKING:
    from emprocess.kernels.render import StreamedTiles
    from emprocess.models import NgMetaRequest, NgShardRequest
    from emprocess.services.pyramid import OmeZarrVolume, VolumeWriter
    from emprocess.services.tilestore import TileReader

INFO = "info"
"""Key of a precomputed volume's metadata, relative to the volume."""
NUM_SCALES = ngmeta.DEFAULT_NUM_SCALES
"""Scales of every pyramid: 0 (full resolution) to 5."""
MAX_INFO_BYTES = 1 << 20  # an info of 6 scales is about 3 KB

DataType = Literal["uint8", "uint16"]


def info_key(volume_path: str) -> str:
    """Key of the ``info`` of the volume at ``volume_path`` of its bucket
    (``neuroglancer/jpeg/info``)."""
    return f"{volume_path.rstrip('/')}/{INFO}"


def info_url(volume_url: str) -> str:
    """URL of the ``info`` of the volume at ``volume_url``."""
    return storage.join(volume_url, INFO)


def source_slice_url(source: str, name: str = "") -> str:
    """``gs://SOURCE/NAME``: a slice image (or, with no name, the folder of them) in the
    source bucket, as the DAG sends it to the services."""
    return f"gs://{source}/{name}"


# -- the tmp bucket's tiled slices ------------------------------------------------------


@dataclass(frozen=True)
class TiledSlices:
    """One kind of tiled aligned slices in the tmp bucket: ``PREFIX/ZZZZZZ.tiles``.

    Attributes:
        bucket: the tmp bucket (SOURCE_tmp_RUN_ID).
        prefix: ``aligned/`` (8-bit grey), ``aligned/cC/`` (channel C), ``aligned16/``.
        dtype: the tiles' pixel type.
    """

    bucket: str
    prefix: str = channel_prefix(None)
    dtype: DataType = "uint8"

    @classmethod
    def channel(cls, bucket: str, channel: int | None = None) -> TiledSlices:
        """The 8-bit tiles of ``channel`` (None: of a grey slice)."""
        return cls(bucket, channel_prefix(channel))

    @classmethod
    def wide(cls, bucket: str) -> TiledSlices:
        """The 16-bit tiles that keep a slice's values (``raw_dtype`` "uint16")."""
        return cls(bucket, SOURCE_TILES_PREFIX, "uint16")

    @classmethod
    def of_channels(cls, bucket: str, channels: int | None) -> list[TiledSlices]:
        """The 8-bit tiles of a slice of ``channels`` channels (None: one grey), in order."""
        if channels is None:
            return [cls.channel(bucket)]
        return [cls.channel(bucket, c) for c in range(channels)]

    @property
    def folder_url(self) -> str:
        """``gs://TMP/PREFIX``: the folder of these tiles."""
        return storage.bucket_url(self.bucket, self.prefix)

    def url(self, z: int) -> str:
        """``gs://TMP/PREFIX/ZZZZZZ.tiles``: the tiles object of slice ``z``."""
        return storage.bucket_url(self.bucket, self.prefix + tiles_key(z))

    def check_paths(self, zs: range) -> None:
        """The folder, and each slice's object, is a regular file (or missing) inside the
        bucket: tensorstore follows links and opens FIFOs."""
        storage.check_inside(storage.bucket_url(self.bucket, self.prefix.rstrip("/")))
        for z in zs:
            storage.check_inside(self.url(z), regular_file=True)

    def write(self, z: int, streamed: StreamedTiles, compute: list[float]) -> None:
        """Write slice ``z``'s tiles while they are made (the write seam); the seconds
        spent making them are added to ``compute[0]``."""
        from emprocess.services.tilestore import write_streamed

        write_streamed(self.url(z), streamed, compute)

    def reader(self, bbox_xy: tuple[int, int], context: Any) -> TileReader:
        """The read seam: boxes of the canvas ``bbox_xy`` read from these tiles."""
        from emprocess.services.tilestore import TileReader

        return TileReader(self, bbox_xy, context)


# -- precomputed volumes ----------------------------------------------------------------


@dataclass(frozen=True)
class VolumeGeometry:
    """What every volume of a run shares: the canvas, the slices and the voxel size."""

    bbox_xy: tuple[int, int]
    minz: int
    maxz: int
    resolution: ngmeta.ResolutionNm
    num_scales: int = NUM_SCALES

    def layouts(self) -> list[ngmeta.ScaleLayout]:
        """Every scale's factors, cube, chunk and shard sides."""
        return ngmeta.scale_layouts(self.resolution, self.num_scales, cube=CUBE_PX)

    def cube_boxes(self, start: Sequence[int]) -> list[Box]:
        """The [lo, hi) box of cube ``start`` (in units of ``CUBE_PX``) at every scale."""
        return [
            ngmeta.cube_bounds_xyz(
                start, self.bbox_xy, self.minz, self.maxz, s, CUBE_PX, layout.factor
            )
            for s, layout in enumerate(self.layouts())
        ]


@dataclass(frozen=True)
class Scale:
    """One scale of a precomputed volume: its key (``8_8_8``) and folder URL."""

    index: int
    key: str
    url: str


@dataclass(frozen=True)
class PrecomputedVolume:
    """A neuroglancer precomputed volume of the run.

    Attributes:
        url: ``gs://BUCKET/PATH`` of the volume.
        encoding: "jpeg" or "raw" (lossless).
        geometry: the run's canvas, slices and voxel size.
        first_channel: the first channel of the slices it holds.
        channels: how many channels it holds from ``first_channel``.
        data_type: "uint8", or "uint16" for a lossless volume of 16-bit slices.
    """

    url: str
    encoding: ngmeta.Encoding
    geometry: VolumeGeometry
    first_channel: int = 0
    channels: int = 1
    data_type: DataType = "uint8"

    @property
    def info_url(self) -> str:
        return info_url(self.url)

    def info(self) -> dict[str, Any]:
        """The volume's ``info`` document."""
        return self._info

    @cached_property
    def _info(self) -> dict[str, Any]:
        g = self.geometry
        return ngmeta.build_info(
            g.bbox_xy,
            g.minz,
            g.maxz,
            g.resolution,
            self.encoding,
            g.num_scales,
            data_type=self.data_type,
            num_channels=self.channels,
        )

    def info_bytes(self) -> bytes:
        """The ``info`` as written: the same volume, the same bytes."""
        return json.dumps(self.info(), indent=1).encode()

    def scales(self) -> list[Scale]:
        """Every scale, finest first, with its folder URL."""
        keys = [str(s["key"]) for s in self.info()["scales"]]
        return [Scale(i, key, storage.join(self.url, key)) for i, key in enumerate(keys)]

    def check_info(self, *, written: bool) -> None:
        """Check the stored ``info`` against this volume's.

        Args:
            written: True (/ngshard): it must exist and describe this volume. False
                (/ngmeta, before writing it): it may be absent, or describe another
                volume when that has no data yet (nothing is lost); another volume with
                data is never replaced.
        """
        try:
            stored: Any = json.loads(storage.read_bytes(self.info_url, max_bytes=MAX_INFO_BYTES))
        except NotFound:
            if written:
                raise InvalidInput(f"{self.info_url} does not exist; run /ngmeta first") from None
            return
        except ValueError:  # not JSON, or too large: not an info of ours
            if written:
                raise InvalidInput(f"{self.info_url} is not JSON; run /ngmeta again") from None
            stored = None
        if stored is not None and same_geometry(stored, self.info()):
            return
        if written:
            raise InvalidInput(
                f"{self.info_url} describes another volume ({_describe(stored, True)}) than "
                f"this request ({_describe(self.info(), True)}); run /ngmeta with the same "
                "bbox, minz, maxz, resolution and raw_dtype"
            )
        # Keys sort digits before "info", so two listed keys show whether data exists.
        folder = self.url.rstrip("/") + "/"
        prefix = storage.parse_url(folder).key
        if any(key != prefix + INFO for key in storage.list_keys(folder, limit=2)):
            raise InvalidInput(
                f"{self.info_url} describes another volume that already has data "
                f"({_describe(stored)}) than this request ({_describe(self.info())}); "
                "an existing volume is never replaced: use another run id, or delete it first"
            )

    def write_info(self) -> None:
        """Write the ``info`` (after :meth:`check_info`)."""
        storage.write_bytes(self.info_url, self.info_bytes(), "application/json")

    def check_paths(self) -> None:
        """No scale folder may be a link out of its bucket (tensorstore writes through
        it); a link at a shard file is replaced, not followed (written by rename)."""
        for scale in self.scales():
            storage.check_inside(scale.url)

    def writer(self, context: Any) -> VolumeWriter:
        """The write seam: every scale, one shard at a time (its ``info`` written)."""
        from emprocess.services.pyramid import PrecomputedWriter

        return PrecomputedWriter(self.url, self.geometry.layouts(), context)


def same_geometry(a: Any, b: Any) -> bool:
    """Whether two infos describe the same volume: equal but for the chunks' data
    encoding, which writers may choose freely."""
    return _geometry(a) == _geometry(b)


def _geometry(info: Any) -> Any:
    if not isinstance(info, dict) or not isinstance(info.get("scales"), list):
        return info
    scales = [
        {**s, "sharding": {k: v for k, v in s["sharding"].items() if k != "data_encoding"}}
        if isinstance(s, dict) and isinstance(s.get("sharding"), dict)
        else s
        for s in info["scales"]
    ]
    return {**info, "scales": scales}


def _describe(info: Any, data_type: bool = False) -> str:
    """Scale 0's size, voxel offset and resolution (and the data type), for messages."""
    scales = info.get("scales") if isinstance(info, dict) else None
    s0 = scales[0] if isinstance(scales, list) and scales and isinstance(scales[0], dict) else {}
    text = (
        f"size {s0.get('size')}, voxel_offset {s0.get('voxel_offset')}, "
        f"resolution {s0.get('resolution')}"
    )
    if data_type:
        text += f", data_type {info.get('data_type') if isinstance(info, dict) else None}"
    return text


# -- what a request writes --------------------------------------------------------------


@dataclass(frozen=True)
class RequestVolumes:
    """Every volume a /ngmeta or /ngshard request writes, and the tiles it reads.

    Attributes:
        geometry: shared by every volume.
        precomputed: the JPEG volume(s) first, then the lossless one.
        ome_zarr: the OME-Zarr lossless volume, or None.
        channels: the slices' channels (None: grey).
        wide: whether the lossless volumes keep 16-bit values (``raw_dtype``).
    """

    geometry: VolumeGeometry
    precomputed: list[PrecomputedVolume]
    ome_zarr: OmeZarrVolume | None
    channels: int | None
    wide: bool

    def check_before_meta(self) -> None:
        """/ngmeta: nothing written yet would replace another volume with data."""
        for volume in self.precomputed:
            volume.check_info(written=False)
        if self.ome_zarr is not None:
            self.ome_zarr.check_no_other_volume()

    def write_meta(self) -> None:
        """/ngmeta: every volume's metadata (after :meth:`check_before_meta`)."""
        for volume in self.precomputed:
            volume.write_info()
        if self.ome_zarr is not None:
            self.ome_zarr.write_metadata()

    def check_infos(self) -> None:
        """/ngshard: every precomputed volume's info is written and describes it, and no
        scale folder leads out of its bucket."""
        for volume in self.precomputed:
            volume.check_info(written=True)
            volume.check_paths()

    def check_ome_zarr(self) -> None:
        """/ngshard: the OME-Zarr metadata is written and describes it, paths inside."""
        if self.ome_zarr is not None:
            self.ome_zarr.check_metadata()
            self.ome_zarr.check_paths()

    def tiles(self, bucket: str, write_raw: bool) -> list[TiledSlices]:
        """Every tiles kind a cube reads from the tmp ``bucket``."""
        out = TiledSlices.of_channels(bucket, self.channels)
        if self.wide and write_raw:
            out.append(TiledSlices.wide(bucket))
        return out


def request_volumes(req: NgMetaRequest | NgShardRequest) -> RequestVolumes:
    """The volumes of a request, by the format rules.

    The lossless volume holds all channels (16-bit with ``raw_dtype`` "uint16"); the JPEG
    one (the format holds 1 or 3) the first three as RGB, or the first alone when there
    are fewer; with ``jpeg_channels`` "each", every channel has a grey JPEG volume of its
    own. Every URL is built, and so checked, here.
    """
    from emprocess.services.pyramid import ome_zarr_volume

    geometry = VolumeGeometry((req.bbox[0], req.bbox[1]), req.minz, req.maxz, req.resolution)
    c = req.channels or 1
    each = req.jpeg_channels == "each" and req.channels is not None
    jpeg = [(i, 1) for i in range(c)] if each else [(0, 3 if c >= 3 else 1)]
    volumes = [
        PrecomputedVolume(
            storage.bucket_url(req.dest, jpeg_channel_path(first)), "jpeg", geometry, first, n
        )
        for first, n in jpeg
    ]
    wide = req.raw_dtype == "uint16"
    if req.writes_precomputed_raw:
        assert req.dest_raw is not None  # checked by the model
        url = storage.bucket_url(req.dest_raw, RAW_PATH)
        volumes.append(PrecomputedVolume(url, "raw", geometry, 0, c, "uint16" if wide else "uint8"))
    zarr = ome_zarr_volume(req, NUM_SCALES, CUBE_PX)
    return RequestVolumes(geometry, volumes, zarr, req.channels, wide)
