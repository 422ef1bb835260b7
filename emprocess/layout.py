"""A run's layout: its bucket names, volume paths, process-bucket records and mini-task names.

The one place that spells them. A run is named by its source bucket and id; its buckets
are ``SOURCE_process`` (records of every run, under ``RUN_ID/``), ``SOURCE_tmp_RUN_ID``
(tiled aligned slices), ``SOURCE_ng_RUN_ID`` (the JPEG volume under ``neuroglancer/jpeg``)
and ``SOURCE_chunk_RUN_ID`` (the lossless volume under ``neuroglancer/raw``, and/or as
OME-Zarr under ``raw.ome.zarr``). The DAG,
the services, the report, ``view``, the benchmarks and the tests ask :class:`RunLayout`
(or the functions below, for a service that knows only a bucket and a run id).

Standard library only: the services and the DAG's parse-time code import it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from emprocess.records import RunRecords

JPEG_PATH = "neuroglancer/jpeg"
"""Path of the JPEG volume in the ng bucket."""
RAW_PATH = "neuroglancer/raw"
"""Path of the lossless volume in the chunk bucket."""
RAW_OME_ZARR_PATH = "raw.ome.zarr"
"""Path of the lossless volume as OME-Zarr 0.5 (conf ``raw_format``) in the chunk bucket."""

TILES_PREFIX = "aligned/"
"""Folder of the tiled aligned slices in the tmp bucket (``aligned/ZZZZZZ.tiles``)."""
SOURCE_TILES_PREFIX = "aligned16/"
"""Folder of the 16-bit tiled slices, for a uint16 lossless volume."""


def tiles_key(z: int) -> str:
    """Name of the tiled aligned slice z under ``TILES_PREFIX`` of the tmp bucket."""
    return f"{z:06d}.tiles"


def channel_prefix(channel: int | None) -> str:
    """Folder of the tmp bucket holding the tiled slices of ``channel`` (None: grey)."""
    return TILES_PREFIX if channel is None else f"{TILES_PREFIX}c{channel}/"


def tile_prefixes(channels: int | None) -> list[str]:
    """The tiles folders of a slice with ``channels`` channels (None: one grey)."""
    return [TILES_PREFIX] if channels is None else [channel_prefix(c) for c in range(channels)]


def jpeg_channel_path(channel: int) -> str:
    """Volume path of channel ``channel``'s own JPEG volume (``jpeg_channels`` "each");
    channel 0's is neuroglancer/jpeg itself."""
    return JPEG_PATH if channel == 0 else f"{JPEG_PATH}_c{channel}"


# Records in the process bucket, relative to RUN_ID/.
INIT = "init.json"
"""What create_env recorded: the conf, width, slice size, window, versions."""
TRANSFORMS = "align/transforms.json"
"""Slice z -> its 6-number affine into the canvas."""
TRANSFORMS_CSV = "align/transforms.csv"
QC = "align/qc.csv"
"""Alignment quality per pair."""
SLICES = "align/slices.csv"
"""Per slice status of the global solve (good, bad, bridged)."""
GAPS = "align/gaps.json"
"""The second align round: pairs asked across runs of bad slices, and the runs."""
FILL = "align/fill.json"
"""Bad slice -> the slice written in its place (null: zeros); {} when all show their own."""
CANVAS = "align/canvas.json"
"""What ``collect`` hands on (``{"bbox": [w, h], "models": {...}, "transforms": URL}``)."""
THUMBNAILS = "align"
"""Folder of the slices' PNG thumbnails (``align/IMG``), written by /alignedslice."""
COMPLETE = "complete.json"
"""Written last by write_status: the run is finished."""
AFFINE_CACHE = "align/affine_cache"
"""Answers of the align pairs, the second round's (across gaps) among them."""
WRITE_CACHE = "align/write_cache"
FEATURES_CACHE = "align/features_cache"
"""Answers of the features mini-tasks (one per slice, before the align pairs)."""
FEATURES = "align/features"
"""Each slice's stored SIFT features (``align/features/STEM.DIGEST.feat``), written by the
alignment service (:func:`features_key`) and read by every pair of that slice."""
NG_CACHE = "neuroglancer/cache"
STATS_CACHE = "align/stats_cache"
"""Answers of /slicestats: each slice's grey statistics (intensity_correction "slice")."""
WINDOW_CACHE = "align/window_cache"
"""Answers of /histogram: each sampled file's grey levels, for the ``auto`` window."""
INTENSITY = "align/intensity.csv"
"""Per slice: its statistics in the common area and the gain and offset applied."""
QUALITY = "align/quality.csv"
"""Per slice: the NCC of the aligned slice with the next (thumbnails, common area), doubtful."""
# Stage names: of the batch stages' logs, summaries, failure records (failures/STAGE/)
# and the report's rows.
STAGE_FEATURES = "features"
"""/features: each slice's SIFT features, stored once."""
STAGE_AFFINE = "affine"
"""/ (align): the pairs, the second round's across gaps among them."""
STAGE_SLICESTATS = "slicestats"
"""/slicestats: each slice's grey statistics (intensity_correction "slice")."""
STAGE_WRITE = "write"
"""/alignedslice: each slice warped into the canvas and tiled."""
STAGE_NGMETA = "ngmeta"
"""/ngmeta: the volumes' info."""
STAGE_NGSHARD = "ngshard"
"""/ngshard: the 1024^3 cubes of the volumes."""

CACHES = {
    STAGE_FEATURES: FEATURES_CACHE,
    STAGE_AFFINE: AFFINE_CACHE,
    STAGE_WRITE: WRITE_CACHE,
    STAGE_NGMETA: NG_CACHE,
    STAGE_NGSHARD: NG_CACHE,
}
"""Cache prefix of each stage's answers (``NAME.DIGEST.json``)."""
FAILURES = "failures"
"""Failure records of mini-tasks: ``RUN_ID/failures/STAGE/NAME.json``."""
NOTIFIED = "notified"
"""Failure mails sent: ``RUN_ID/notified/AIRFLOW_RUN_ID.json``, one mail per Airflow run."""

BUCKET_ROLES = ("source", "process", "tmp", "ng", "chunk")
LONGEST_ROLE = "chunk"
"""SOURCE_chunk_RUN_ID is the longest bucket name of a run."""


def process_bucket(source: str) -> str:
    """``SOURCE_process``: the records of every run of ``source``."""
    return f"{source}_process"


def run_bucket(source: str, role: str, run_id: str) -> str:
    """``SOURCE_ROLE_RUN_ID`` for role tmp, ng or chunk."""
    if role not in ("tmp", "ng", "chunk"):
        raise ValueError(f"no run bucket of role {role!r}; roles: tmp, ng, chunk")
    return f"{source}_{role}_{run_id}"


def thumbnail_key(run_id: str, img: str) -> str:
    """Key in ``SOURCE_process`` of the thumbnail of slice image ``img``."""
    return f"{run_id}/{THUMBNAILS}/{img}"


@dataclass(frozen=True)
class RunLayout:
    """Where run ``run_id`` of source bucket ``source`` keeps everything.

    Attributes:
        source: the source bucket (the slices).
        run_id: the conf's ``id``.
        raw: whether the run writes the lossless volume (then the chunk bucket is one
            of the run's buckets).
    """

    source: str
    run_id: str
    raw: bool = True

    @property
    def process(self) -> str:
        return process_bucket(self.source)

    @property
    def tmp(self) -> str:
        return run_bucket(self.source, "tmp", self.run_id)

    @property
    def ng(self) -> str:
        return run_bucket(self.source, "ng", self.run_id)

    @property
    def chunk(self) -> str:
        """SOURCE_chunk_ID, whether or not the raw volume is written (services want a name)."""
        return run_bucket(self.source, "chunk", self.run_id)

    def bucket_names(self) -> dict[str, str]:
        """The run's buckets by role: source, process, tmp, ng and (with ``raw``) chunk."""
        names = {"source": self.source, "process": self.process, "tmp": self.tmp, "ng": self.ng}
        if self.raw:
            names["chunk"] = self.chunk
        return names

    def process_url(self, *parts: str) -> str:
        """``gs://SOURCE_process/ID/<parts>``."""
        tail = "/".join(p.strip("/") for p in parts if p)
        return f"gs://{self.process}/{self.run_id}" + (f"/{tail}" if tail else "")

    @property
    def records(self) -> RunRecords:
        """The run's records in the process bucket, read and written as their models."""
        from emprocess.records import RunRecords

        return RunRecords(self)

    def failure_url(self, stage: str) -> str:
        """The failure records of ``stage``: ``gs://SOURCE_process/ID/failures/STAGE``."""
        return self.process_url(FAILURES, stage)

    @property
    def jpeg_url(self) -> str:
        """``gs://SOURCE_ng_ID/neuroglancer/jpeg``."""
        return f"gs://{self.ng}/{JPEG_PATH}"

    @property
    def raw_url(self) -> str:
        """``gs://SOURCE_chunk_ID/neuroglancer/raw``."""
        return f"gs://{self.chunk}/{RAW_PATH}"

    @property
    def raw_ome_zarr_url(self) -> str:
        """``gs://SOURCE_chunk_ID/raw.ome.zarr``: the OME-Zarr lossless volume."""
        return f"gs://{self.chunk}/{RAW_OME_ZARR_PATH}"

    def neuroglancer_source(self) -> str:
        """The neuroglancer layer source of the JPEG pyramid."""
        return f"precomputed://{self.jpeg_url}"

    def raw_sources(self, raw_format: str = "precomputed") -> list[str]:
        """The neuroglancer sources of the lossless volume(s) of conf ``raw_format``
        (precomputed, ome-zarr or both); none when ``raw`` is false."""
        if not self.raw:
            return []
        out = [] if raw_format == "ome-zarr" else [f"precomputed://{self.raw_url}"]
        if raw_format in ("ome-zarr", "both"):
            out.append(f"zarr3://{self.raw_ome_zarr_url}/")
        return out


def features_url(slice_bucket: str, run_id: str, slice_key: str, digest: str) -> str:
    """``gs://SOURCE_process/`` + :func:`features_key`: the stored features of slice object
    ``slice_key`` of bucket ``slice_bucket`` (the run's source)."""
    return f"gs://{process_bucket(slice_bucket)}/{features_key(run_id, slice_key, digest)}"


def features_key(run_id: str, slice_key: str, digest: str) -> str:
    """Key in ``SOURCE_process`` of the stored features of slice object ``slice_key`` made
    by the recipe of ``digest``: ``RUN_ID/align/features/STEM.DIGEST.feat`` (STEM: the
    slice's file name without its extension, for people listing the folder)."""
    stem = slice_key.rsplit("/", 1)[-1].rsplit(".", 1)[0] or "slice"
    return f"{run_id}/{FEATURES}/{stem}.{digest}.feat"


# -- mini-task names ------------------------------------------------------------------

NGMETA = "ngmeta"
"""The name of the one /ngmeta request."""


def pair_name(pre: int, post: int) -> str:
    """Mini-task name of the pair (pre, post): ``z000012`` for post = pre + 1 (as before),
    ``z000012-000014`` for farther neighbours and the pairs across gaps."""
    return f"z{pre:06d}" if post == pre + 1 else f"z{pre:06d}-{post:06d}"


def parse_pair_name(name: str) -> tuple[int, int]:
    """(pre, post) of a :func:`pair_name`; raises ValueError for other names."""
    m = re.fullmatch(r"z(\d+)(?:-(\d+))?", name)
    if not m:
        raise ValueError(
            f"{name!r} is not an alignment pair name such as z000012 or z000012-000014"
        )
    pre = int(m.group(1))
    return pre, int(m.group(2)) if m.group(2) else pre + 1


def slice_task_name(z: int) -> str:
    """Mini-task name of slice ``z``'s /alignedslice request: ``z000012``."""
    return f"z{z:06d}"


def parse_slice_task_name(name: str) -> int:
    """z of a :func:`slice_task_name`; raises ValueError for other names."""
    m = re.fullmatch(r"z(\d+)", name)
    if not m:
        raise ValueError(f"{name!r} is not a slice name such as z000012")
    return int(m.group(1))


def cube_name(x: int, y: int, z: int) -> str:
    """Mini-task name of the /ngshard cube starting at (x, y, z) cubes: ``cube_1_0_2``."""
    return f"cube_{x}_{y}_{z}"


def parse_cube_name(name: str) -> tuple[int, int, int]:
    """(x, y, z) of a :func:`cube_name`; raises ValueError for other names."""
    m = re.fullmatch(r"cube_(\d+)_(\d+)_(\d+)", name)
    if not m:
        raise ValueError(f"{name!r} is not a cube name such as cube_1_0_2")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))
